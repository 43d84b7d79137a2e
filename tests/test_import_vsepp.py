"""`itmkit import vsepp`: official VSE++ precomp checkpoints score like the official forward pass.

The reference below is a slow, literal re-statement of fartashf/vsepp model.py's forward (one
caption at a time through the GRU, the pairwise order violation in a double loop), run on
weights with the official key names and shapes and the options Namespace train.py pickles.
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import sys
import tomllib

import pytest
import torch

from itmkit.checkpoint import load_checkpoint, read_metadata
from itmkit.core_stages import ORDER_CHUNK_BYTES, DotHead, OrderHead
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, gru_text_layout, import_checkpoint
from itmkit.testing import Python2Pickler, save_like_python2
from itmkit.types import Regions, Tokens, lengths_to_mask

EMBED, IMG_DIM, WORD_DIM = 8, 12, 6
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "on", "the", "grass", "red", "caf\xe9"]


def options(**overrides) -> argparse.Namespace:
    """The Namespace fartashf/vsepp's train.py pickles as 'opt' (its defaults at small sizes, the VSE++ row)."""
    opt = dict(data_path="/w/31/faghri/vsepp_data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2,
               num_epochs=30, batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, crop_size=224,
               num_layers=1, learning_rate=2e-4, lr_update=15, workers=10, log_step=10, val_step=500,
               logger_name="runs/f30k_vse++_pr\xe9comp", resume="", max_violation=True, img_dim=IMG_DIM,
               finetune=False, cnn_type="vgg19", use_restval=False, measure="cosine", use_abs=False,
               no_imgnorm=False, reset_train=False, vocab_size=len(WORDS))
    opt.update(overrides)
    return argparse.Namespace(**opt)


def official_weights(opt: argparse.Namespace, seed: int = 0) -> list[collections.OrderedDict]:
    """[img_enc.state_dict(), txt_enc.state_dict()] of EncoderImagePrecomp and EncoderText, random values."""
    g = torch.Generator().manual_seed(seed)
    img = collections.OrderedDict([("fc.weight", torch.randn(opt.embed_size, opt.img_dim, generator=g) * 0.3),
                                   ("fc.bias", torch.randn(opt.embed_size, generator=g) * 0.3)])
    layout = gru_text_layout(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, False)
    txt = collections.OrderedDict((k, torch.randn(shape, generator=g) * 0.4) for k, shape in layout.items())
    return [img, txt]


# ------------------------------------------------------------------------ the official forward, slowly


def official_images(sd, feats: torch.Tensor, opt) -> torch.Tensor:
    """EncoderImagePrecomp.forward: fc, l2norm unless no_imgnorm, abs if use_abs (feats: one row per image)."""
    features = feats @ sd["fc.weight"].T + sd["fc.bias"]
    if not opt.no_imgnorm:
        features = features / features.pow(2).sum(dim=1, keepdim=True).sqrt()
    return features.abs() if opt.use_abs else features


def official_captions(sd, ids: torch.Tensor, lengths: torch.Tensor, opt) -> torch.Tensor:
    """EncoderText.forward one caption at a time: the GRU output at the last word, l2norm, abs if use_abs."""
    rnn = torch.nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True)
    rnn.load_state_dict({k[len("rnn."):]: v for k, v in sd.items() if k.startswith("rnn.")})
    out = []
    for row, n in zip(ids, lengths.tolist()):
        words = sd["embed.weight"][row[:n]][None]  # (1, n, word_dim)
        last = rnn(words)[0][0, n - 1]
        last = last / last.pow(2).sum().sqrt()
        out.append(last.abs() if opt.use_abs else last)
    return torch.stack(out)


def cosine_sim(im: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return im.mm(s.t())


def order_sim(im: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """-sqrt(sum(max(0, s - im)^2)) for every pair, in a double loop."""
    score = torch.empty(im.shape[0], s.shape[0], dtype=im.dtype)
    for i in range(im.shape[0]):
        for j in range(s.shape[0]):
            score[i, j] = -(s[j] - im[i]).clamp(min=0).pow(2).sum().sqrt()
    return score


def official_scores(opt, model, feats, ids, lengths) -> torch.Tensor:
    with torch.no_grad():
        im = official_images(model[0], feats, opt)
        s = official_captions(model[1], ids, lengths, opt)
        return (order_sim if opt.measure == "order" else cosine_sim)(im, s)


def random_inputs(seed: int, n_images=4, n_captions=6, words=7):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(n_images, IMG_DIM, generator=g)
    lengths = torch.randint(2, words + 1, (n_captions,), generator=g)
    lengths[0] = words
    ids = torch.randint(1, len(WORDS), (n_captions, words), generator=g).masked_fill(~lengths_to_mask(lengths, words), 0)
    return feats, ids, lengths


def our_scores(path, feats, ids, lengths) -> torch.Tensor:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(feats[:, None], torch.ones(feats.shape[0], dtype=torch.long)))  # 1 region
        return model.score(image, model.encode_texts(Tokens(ids, lengths)))


# ------------------------------------------------------------------------------ the vocabulary pickle


class OfficialVocabulary:
    def __init__(self):
        self.word2idx, self.idx2word, self.idx = {}, {}, 0


def write_vocab_pickle(path, monkeypatch, words=WORDS, python2=True):
    """vocab/{data_name}_vocab.pkl as `python vocab.py` writes it (the class pickles as __main__.Vocabulary)."""
    cls = type("Vocabulary", (OfficialVocabulary,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Vocabulary", cls, raising=False)
    vocab = cls()
    for i, word in enumerate(words):
        vocab.word2idx[word], vocab.idx2word[i] = i, word
    vocab.idx = len(words)
    buffer = io.BytesIO()
    (Python2Pickler(buffer, protocol=2) if python2 else __import__("pickle").Pickler(buffer, protocol=2)).dump(vocab)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def vocab_pkl(tmp_path, monkeypatch):
    return write_vocab_pickle(tmp_path / "f30k_precomp_vocab.pkl", monkeypatch)


def imported(tmp_path, vocab, opt, model, python2=False):
    source = tmp_path / "model_best.pth.tar"
    checkpoint = {"epoch": 17, "model": model, "best_rsum": 389.5, "opt": opt, "Eiters": 40000}
    if python2:
        save_like_python2(checkpoint, source)
    else:
        torch.save(checkpoint, source)
    return import_checkpoint("vsepp", source, vocab, tmp_path / "vsepp.safetensors", get_importers())


CASES = {
    "VSE++ (cosine, max violation)": dict(),
    "VSE0 (no_imgnorm: a dot product)": dict(no_imgnorm=True, max_violation=False),
    "cosine with use_abs": dict(use_abs=True),
    "no_imgnorm with use_abs": dict(no_imgnorm=True, use_abs=True),
    "Order0 (order, use_abs)": dict(measure="order", use_abs=True, margin=0.05, learning_rate=0.001,
                                    max_violation=False),
    "Order++ (order, no abs)": dict(measure="order"),
    "order, no_imgnorm": dict(measure="order", no_imgnorm=True),
    "two GRU layers": dict(num_layers=2, word_dim=5),
}


@pytest.mark.filterwarnings("ignore:pickle_load_args only works")
@pytest.mark.parametrize("case", CASES)
def test_an_imported_checkpoint_scores_like_the_official_forward(tmp_path, vocab_pkl, case):
    opt = options(**CASES[case])
    model = official_weights(opt, seed=len(case))
    out = imported(tmp_path, vocab_pkl, opt, model, python2=True)  # the official repo is Python 2 era
    feats, ids, lengths = random_inputs(seed=len(case))
    torch.testing.assert_close(our_scores(out, feats, ids, lengths), official_scores(opt, model, feats, ids, lengths),
                               rtol=0, atol=1e-5)


def test_the_recipe_maps_the_options_to_core_stages(tmp_path, vocab_pkl):
    opt = options(measure="order", use_abs=True, margin=0.05, learning_rate=0.001, max_violation=False,
                  data_name="coco_precomp")
    out = imported(tmp_path, vocab_pkl, opt, official_weights(opt))
    recipe = tomllib.loads(read_metadata(out)["recipe"])
    assert recipe["image"]["encoder"]["stage"] == "core.precomp" and recipe["image"]["encoder"]["absolute"] is True
    assert recipe["image"]["pool"]["stage"] == "core.mean" and recipe["text"]["pool"]["stage"] == "core.last"
    assert recipe["text"]["encoder"]["bidirectional"] is False and recipe["text"]["encoder"]["absolute"] is True
    assert recipe["match"][0]["similarity"]["stage"] == "core.order"
    assert recipe["loss"]["margin"] == 0.05 and recipe["loss"]["max_violation"] is False
    assert recipe["train"]["lr"] == 0.001
    assert recipe["data"]["protocol"] == "coco-1k-5fold" and recipe["data"]["test_split"] == "testall"
    assert recipe["recipe"]["name"] == "vsepp-coco-order-imported"
    assert load_checkpoint(out).vocab.idx2word == WORDS  # the pickled vocabulary travels in the checkpoint


def test_a_checkpoint_from_before_the_order_flags_is_a_cosine_model(tmp_path, vocab_pkl):
    opt = options()
    old = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k not in ("measure", "use_abs", "no_imgnorm")})
    model = official_weights(opt, seed=2)
    out = imported(tmp_path, vocab_pkl, old, model)
    feats, ids, lengths = random_inputs(seed=2)
    torch.testing.assert_close(our_scores(out, feats, ids, lengths), official_scores(opt, model, feats, ids, lengths),
                               rtol=0, atol=1e-5)


def test_a_json_vocabulary_works_as_well(tmp_path):
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    opt = options(no_imgnorm=True)
    model = official_weights(opt)
    out = imported(tmp_path, tmp_path / "vocab.json", opt, model)
    feats, ids, lengths = random_inputs(seed=9)
    torch.testing.assert_close(our_scores(out, feats, ids, lengths), official_scores(opt, model, feats, ids, lengths),
                               rtol=0, atol=1e-5)


def test_the_cli_imports_with_a_pickled_vocabulary(tmp_path, vocab_pkl):
    from itmkit_scan.tests.test_importer import run_cli  # the console script, as a user runs it

    opt = options(measure="order")
    model = official_weights(opt, seed=3)
    torch.save({"epoch": 1, "model": model, "best_rsum": 1.0, "opt": opt}, tmp_path / "model_best.pth.tar")
    out = tmp_path / "vsepp.safetensors"
    result = run_cli("import", "vsepp", str(tmp_path / "model_best.pth.tar"), "--vocab", str(vocab_pkl), "-o", str(out))
    assert result.returncode == 0, result.stderr
    feats, ids, lengths = random_inputs(seed=3)
    torch.testing.assert_close(our_scores(out, feats, ids, lengths), official_scores(opt, model, feats, ids, lengths),
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ refusals


def _broken(kind: str) -> tuple[argparse.Namespace, list]:
    opt = options()
    model = official_weights(opt)
    if kind == "full-image model":
        opt = options(data_name="coco", cnn_type="resnet152")
        model[0] = {"cnn.module.conv1.weight": torch.zeros(1), **model[0]}
    elif kind == "unknown measure":
        opt = options(measure="cosin")
    elif kind == "bidirectional text encoder":
        model[1] = collections.OrderedDict((k, torch.zeros(s)) for k, s in
                                           gru_text_layout(len(WORDS), WORD_DIM, EMBED, 1, True).items())
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "embed_size"})
    elif kind == "vocabulary size":
        model[1]["embed.weight"] = torch.zeros(11353, WORD_DIM)
    elif kind == "not a flag":
        opt = options(no_imgnorm="yes")
    return opt, model


ERRORS = {
    "full-image model": r"data_name='coco' is a full-image model \(a resnet152 on raw pixels\)",
    "unknown measure": r"option measure='cosin' is not supported \(did you mean 'cosine'\?\)",
    "bidirectional text encoder": r"model\[1\] \(txt_enc\): the weights do not match .*\n  unexpected: "
                                  r"rnn.bias_hh_l0_reverse \(24,\)",
    "missing option": r"the checkpoint's options lack 'embed_size'",
    "vocabulary size": r"the vocabulary has 13 words but the checkpoint's word embedding .* has 11353 rows; pass the"
                       r" vocabulary file the model was trained with \(vocab/f30k_precomp_vocab.pkl\)",
    "not a flag": r"option no_imgnorm='yes' is not a flag",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_checkpoint_vsepp_cannot_import_is_a_clear_error(tmp_path, vocab_pkl, kind):
    opt, model = _broken(kind)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        imported(tmp_path, vocab_pkl, opt, model)
    assert not (tmp_path / "vsepp.safetensors").exists()



@pytest.mark.parametrize("data_name, folder", [("../../x_precomp", "x_precomp"), ("/data/vsepp/coco_precomp/", "coco_precomp"),
                                               ("C:\\vsepp\\f30k_precomp", "f30k_precomp")])
def test_a_data_name_given_as_a_path_becomes_the_folder_it_names(tmp_path, vocab_pkl, data_name, folder):
    """The official code joins data_name to data_path: a path there names its last folder, said in a note."""
    opt = options(data_name=data_name)
    out = imported(tmp_path, vocab_pkl, opt, official_weights(opt))
    recipe = tomllib.loads(read_metadata(out)["recipe"])
    assert recipe["recipe"]["name"] == f"vsepp-{folder.removesuffix('_precomp')}-cosine-imported"
    assert recipe["data"]["path"] == f"data/{folder}"
    assert (f"option data_name = {data_name!r} in the checkpoint's 'opt' is a path; the recipe's name and data path"
            f" use the folder it names, {folder!r}") in read_metadata(out)["import_notes"]


@pytest.mark.parametrize("data_name", ["..", "x_precomp/..", "/"])
def test_a_data_name_that_names_no_folder_is_refused_naming_the_option(tmp_path, vocab_pkl, data_name):
    opt = options(data_name=data_name)
    with pytest.raises(CheckpointError, match=rf"option data_name = {re.escape(repr(data_name))} in the checkpoint's"
                                              r" 'opt' names no dataset folder"):
        imported(tmp_path, vocab_pkl, opt, official_weights(opt))
    assert not (tmp_path / "vsepp.safetensors").exists()


# ------------------------------------------------------------------------------- the new core heads


def test_the_order_head_chunks_images_and_matches_the_loop(monkeypatch):
    g = torch.Generator().manual_seed(0)
    im, s = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    monkeypatch.setattr("itmkit.core_stages.ORDER_CHUNK_BYTES", 2 * 4 * 5 * 8)  # two images per chunk
    torch.testing.assert_close(OrderHead()(im, s), order_sim(im, s), rtol=0, atol=1e-12)
    assert ORDER_CHUNK_BYTES >= 2**20


def test_the_order_head_has_a_finite_gradient_where_nothing_is_violated():
    im = torch.ones(2, 3, requires_grad=True)
    s = torch.zeros(2, 3, requires_grad=True)  # every caption below every image: score 0
    OrderHead()(im, s).sum().backward()
    assert torch.isfinite(im.grad).all() and torch.isfinite(s.grad).all()


def test_the_dot_head_does_not_normalise():
    im, s = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert DotHead()(im, s).tolist() == [[3.0, 0.0]]


# ------------------------------------------------------------------------- end to end, on VSE++'s data


def test_itmkit_eval_on_vsepp_precomp_data_gives_the_official_matrix(tmp_path):
    """VSE++'s own layout: one 2-D feature row per caption (each image's row repeated 5 times)."""
    import numpy as np

    from cliutil import invoke
    from itmkit.data import precomp

    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    opt = options(measure="order", use_abs=True)
    model = official_weights(opt, seed=5)
    out = imported(tmp_path, tmp_path / "vocab.json", opt, model)
    rng = np.random.default_rng(0)
    feats = rng.random((4, IMG_DIM)).astype(np.float32)
    captions = [" ".join(rng.choice(WORDS[4:], 5)) for _ in range(20)]
    precomp.write_split(tmp_path / "data", "test", features=np.repeat(feats, 5, axis=0), captions=captions)
    code, _, err = invoke("eval", str(out), "--data", str(tmp_path / "data"), "--save-sims", str(tmp_path / "s.npy"),
                          "--device", "cpu")
    assert code == 0, err
    vocab = Vocabulary(WORDS)
    ids = [vocab.encode(c) for c in captions]
    width = max(map(len, ids))
    tokens = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    expected = official_scores(opt, model, torch.from_numpy(feats), tokens, torch.tensor([len(i) for i in ids]))
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected.numpy(), rtol=0, atol=1e-5)
