"""`itmkit import vsrn`: official VSRN checkpoints (both dataset branches) in, itmkit checkpoints that score like them out."""

from __future__ import annotations

import argparse
import collections
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, gru_text_layout, import_checkpoint
from itmkit.testing import Python2Pickler, save_like_python2
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_vsrn.importer import image_layout
from itmkit_vsrn.tests import official

EMBED, IMG_DIM, WORD_DIM = 8, 12, 6
WORDS = [*Vocabulary.SPECIALS, "a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "two", "men", "sit"]
V = len(WORDS)


def options(data_name: str = "f30k_precomp", **overrides) -> argparse.Namespace:
    """The Namespace VSRN's train.py pickles as 'opt': its defaults, the README's flags."""
    opt = dict(data_path="/data", data_name=data_name, vocab_path="./vocab/", margin=0.2, num_epochs=30,
               batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, crop_size=224, num_layers=1,
               learning_rate=0.0002, lr_update=10 if data_name == "f30k_precomp" else 15, workers=10, log_step=10,
               val_step=500, logger_name="runs/flickr_VSRN", resume="", max_violation=True, img_dim=IMG_DIM,
               finetune=False, cnn_type="vgg19", use_restval=False, measure="cosine", use_abs=False,
               no_imgnorm=False, reset_train=False, dim_vid=2048, dim_hidden=512, bidirectional=0,
               input_dropout_p=0.2, rnn_type="gru", rnn_dropout_p=0.5, dim_word=300, max_len=60, vocab_size=V)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def official_weights(opt: argparse.Namespace, seed: int = 0) -> list[dict]:
    """Random weights in the official layout [img_enc.state_dict(), txt_enc.state_dict()]."""
    g = torch.Generator().manual_seed(seed)
    layout = image_layout(opt.embed_size, opt.img_dim, opt.data_name == "f30k_precomp")
    img = collections.OrderedDict()
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            img[key] = torch.tensor(4321)
        elif key.endswith("running_var"):
            img[key] = torch.rand(shape, generator=g) + 0.5
        else:
            img[key] = torch.randn(shape, generator=g) * 0.4
    txt = collections.OrderedDict((k, torch.randn(s, generator=g) * 0.4)
                                  for k, s in gru_text_layout(V, opt.word_dim, opt.embed_size, 1, False).items())
    return [img, txt]


def save_official(path: Path, opt: argparse.Namespace, model: list, python2: bool = False) -> Path:
    state = {"epoch": 17, "model": model, "best_rsum": 469.9, "opt": opt, "Eiters": 40000}
    (save_like_python2 if python2 else torch.save)(state, path)
    return path


class OfficialVocabulary:
    def __init__(self):
        self.word2idx, self.idx2word, self.idx = {}, {}, 0


@pytest.fixture
def vocab_pkl(tmp_path, monkeypatch):
    """vocab/f30k_precomp_vocab.pkl as VSRN's vocab.py writes it (Python 2, the class as __main__.Vocabulary)."""
    cls = type("Vocabulary", (OfficialVocabulary,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Vocabulary", cls, raising=False)
    vocab = cls()
    for i, word in enumerate(WORDS):
        vocab.word2idx[word], vocab.idx2word[i] = i, word
    vocab.idx = len(WORDS)
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(vocab)
    path = tmp_path / "f30k_precomp_vocab.pkl"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def vocab_json(tmp_path):
    path = tmp_path / "vocab.json"
    Vocabulary(WORDS).save(path)
    return path


def random_images(seed: int, n: int = 4, regions: int = 36) -> torch.Tensor:
    return torch.rand(n, regions, IMG_DIM, generator=torch.Generator().manual_seed(seed))


def random_captions(seed: int, n: int = 6, words: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, words + 1, (n,), generator=g)
    lengths[0] = words
    ids = torch.randint(1, V, (n, words), generator=g)
    return ids.masked_fill(~lengths_to_mask(lengths, words), 0), lengths


def official_scores(opt, model, images, ids, lengths) -> torch.Tensor:
    sd_img = {k: v.double() for k, v in model[0].items()}
    sd_txt = {k: v.double() for k, v in model[1].items()}
    img, _ = official.encode_images(sd_img, images.double(), opt.data_name == "f30k_precomp", training=False,
                                    no_imgnorm=opt.no_imgnorm)
    cap = official.encode_texts(sd_txt, ids, lengths)
    return (img @ cap.T).float()  # cosine_sim: im.mm(s.t())


def our_scores(path: Path, images, ids, lengths) -> torch.Tensor:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(images, torch.full((images.shape[0],), images.shape[1])))
        return model.score(image, model.encode_texts(Tokens(ids, lengths)))


# ======================================================================== both branches


@pytest.mark.parametrize("data_name", ["f30k_precomp", "coco_precomp"])
def test_an_imported_model_scores_like_the_official_forward_pass(tmp_path, vocab_pkl, data_name):
    opt = options(data_name)
    model = official_weights(opt, seed=1)
    source = save_official(tmp_path / "model_best.pth.tar", opt, model, python2=True)
    out = import_checkpoint("vsrn", source, vocab_pkl, tmp_path / "vsrn.safetensors", get_importers())
    images, (ids, lengths) = random_images(1), random_captions(1)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("data_name", ["f30k_precomp", "coco_precomp"])
def test_the_recipe_follows_the_branch_and_the_options(tmp_path, vocab_json, data_name):
    opt = options(data_name, num_epochs=25, learning_rate=1e-4)
    source = save_official(tmp_path / "model_best.pth.tar", opt, official_weights(opt))
    notes: list[str] = []
    out = import_checkpoint("vsrn", source, vocab_json, tmp_path / "vsrn.safetensors", get_importers(), notes.append)
    loaded = load_checkpoint(out)
    r = loaded.model.recipe
    f30k = data_name == "f30k_precomp"
    names = [s.spec.name for s in r.image.reasoners]
    assert names == ([] if f30k else ["vsrn.l2norm"]) + ["vsrn.rsgcn"] * 4 + ["vsrn.l2norm"]
    assert all(s.spec.axis == "regions" for s in r.image.reasoners if s.spec.name == "vsrn.l2norm")
    assert (r.image.encoder.spec.name, r.image.encoder.spec.normalize) == ("core.precomp", False)
    assert (r.image.pool.spec.name, r.image.pool.spec.batch_norm) == ("vsrn.gru", f30k)
    enc = r.text.encoder.spec
    assert (enc.name, enc.bidirectional, enc.word_dim, r.text.pool.spec.name) == ("core.bigru", False, WORD_DIM,
                                                                                  "core.last")
    assert r.match[0].similarity.spec.name == "core.dot"
    assert (r.loss.spec.margin, r.loss.spec.max_violation) == (0.2, True)
    assert (r.train.epochs, r.train.lr, r.train.lr_update, r.train.grad_clip) == (25, 1e-4, 10 if f30k else 15, 2.0)
    assert r.objectives == ()
    assert any("no caption decoder" in line for line in notes)
    assert "no caption decoder" in loaded.meta["import_notes"]
    assert (r.data.protocol, r.data.test_split) == (("f30k-1k", "test") if f30k else ("coco-1k-5fold", "testall"))


def test_gcn_weights_land_in_their_blocks_with_the_kernel_axis_squeezed(tmp_path, vocab_json):
    opt = options("coco_precomp")
    model = official_weights(opt, seed=2)
    source = save_official(tmp_path / "model_best.pth.tar", opt, model)
    state = load_checkpoint(import_checkpoint("vsrn", source, vocab_json, tmp_path / "o.safetensors",
                                              get_importers())).model.state_dict()
    for k in range(1, 5):  # the COCO branch's reasoners[0] is the region-axis l2norm
        torch.testing.assert_close(state[f"image.reasoners.{k}.theta.weight"], model[0][f"Rs_GCN_{k}.theta.weight"][..., 0])
        torch.testing.assert_close(state[f"image.reasoners.{k}.W.1.running_var"], model[0][f"Rs_GCN_{k}.W.1.running_var"])
    assert int(state["image.reasoners.1.W.1.num_batches_tracked"]) == 4321


def test_a_pytorch_040_checkpoint_without_batch_counts_imports(tmp_path, vocab_json):
    opt = options()
    model = official_weights(opt, seed=3)
    model[0] = collections.OrderedDict((k, v) for k, v in model[0].items() if not k.endswith("num_batches_tracked"))
    source = save_official(tmp_path / "model_best.pth.tar", opt, model)
    out = import_checkpoint("vsrn", source, vocab_json, tmp_path / "o.safetensors", get_importers())
    images, (ids, lengths) = random_images(3), random_captions(3)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


def test_without_data_name_the_weights_decide_the_branch(tmp_path, vocab_json):
    for data_name in ("f30k_precomp", "coco_precomp"):
        opt = options(data_name)
        model = official_weights(opt, seed=4)
        stripped = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "data_name"})
        source = save_official(tmp_path / f"{data_name}.pth.tar", stripped, model)
        out = import_checkpoint("vsrn", source, vocab_json, tmp_path / f"{data_name}.safetensors", get_importers())
        images, (ids, lengths) = random_images(4), random_captions(4)
        torch.testing.assert_close(our_scores(out, images, ids, lengths),
                                   official_scores(opt, model, images, ids, lengths), rtol=0, atol=1e-5)


def test_no_imgnorm_leaves_the_image_vector_unnormalised(tmp_path, vocab_json):
    opt = options("coco_precomp", no_imgnorm=True)
    model = official_weights(opt, seed=5)
    source = save_official(tmp_path / "model_best.pth.tar", opt, model)
    out = import_checkpoint("vsrn", source, vocab_json, tmp_path / "o.safetensors", get_importers())
    images, (ids, lengths) = random_images(5), random_captions(5)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


# ============================================================================ the CLI

ITMKIT = Path(sys.executable).with_name("itmkit")


def test_the_cli_imports_with_the_pickled_vocabulary(tmp_path, vocab_pkl):
    opt = options("coco_precomp")
    model = official_weights(opt, seed=6)
    source = save_official(tmp_path / "model_best.pth.tar", opt, model, python2=True)
    out = tmp_path / "vsrn.safetensors"
    result = subprocess.run([str(ITMKIT), "import", "vsrn", str(source), "--vocab", str(vocab_pkl), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no caption decoder" in result.stdout + result.stderr
    images, (ids, lengths) = random_images(6), random_captions(6)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


# ============================================================================ errors


def _broken(kind: str) -> tuple[argparse.Namespace, list]:
    opt = options()
    model = official_weights(opt)
    if kind == "missing key":
        del model[0]["Rs_GCN_3.phi.bias"]
    elif kind == "wrong shape":
        model[0]["Rs_GCN_2.g.weight"] = torch.zeros(EMBED, EMBED)
    elif kind == "branch and weights disagree":
        opt = argparse.Namespace(**{**vars(opt), "data_name": "coco_precomp"})
    elif kind == "f30k without bn":
        model[0] = collections.OrderedDict((k, v) for k, v in model[0].items() if not k.startswith("bn."))
    elif kind == "full-image model":
        opt = argparse.Namespace(**{**vars(opt), "data_name": "f30k"})
    elif kind == "vocabulary size":
        model[1]["embed.weight"] = torch.zeros(8481, WORD_DIM)
    elif kind == "three modules":
        model.append({"fc.weight": torch.zeros(1)})
    elif kind == "order embeddings":
        opt = argparse.Namespace(**{**vars(opt), "measure": "order"})
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "embed_size"})
    return opt, model


ERRORS = {
    "missing key": r"model\[0\] \(img_enc\): the weights do not match the official layout\n  missing: Rs_GCN_3.phi.bias",
    "wrong shape": r"shape of Rs_GCN_2.g.weight: \(8, 8\), expected \(8, 8, 1\)",
    "branch and weights disagree": r"data_name='coco_precomp' says the COCO branch.* has bn.\* keys",
    "f30k without bn": r"data_name='f30k_precomp' says the F30K branch.* no bn.\* keys",
    "full-image model": r"data_name='f30k' is a full-image model",
    "vocabulary size": r"the vocabulary has 16 words but the checkpoint's word embedding .* has 8481 rows",
    "three modules": r"'model' holds 2 state dicts \[img_enc, txt_enc\], this one holds 3",
    "order embeddings": r"measure='order'",
    "missing option": r"the checkpoint's options lack 'embed_size'",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, vocab_json, kind):
    opt, model = _broken(kind)
    source = save_official(tmp_path / "model_best.pth.tar", opt, model)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("vsrn", source, vocab_json, tmp_path / "vsrn.safetensors", get_importers())
    assert not (tmp_path / "vsrn.safetensors").exists()


def test_the_importer_is_registered():
    from itmkit_vsrn.importer import convert

    assert get_importers()["vsrn"] is convert


@pytest.mark.skipif(not Path("/tmp/vsrn/vocab/coco_precomp_vocab.pkl").is_file(), reason="official vocabulary absent")
def test_the_official_coco_vocabulary_pickle_reads_with_its_10006_words():
    """Read by itmkit's restricted reader (never pickle.load); VSRN's COCO vocabulary is VSE++'s, not SCAN's."""
    assert len(Vocabulary.load("/tmp/vsrn/vocab/coco_precomp_vocab.pkl")) == 10006
