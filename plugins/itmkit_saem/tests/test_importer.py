"""`itmkit import saem`: official SAEM checkpoints in, itmkit checkpoints out that score like the official code."""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit.types import Regions, Tokens
from itmkit_bert.testing import write_tiny_bert
from itmkit_bert.vocab import WordPieceVocabulary
from itmkit_saem.importer import image_layout
from itmkit_saem.tests import official

EMBED, IMG_DIM, INNER, CHANNELS, HIDDEN, MAX_WORDS = 32, 12, 24, 5, 32, 10
CAPTIONS = ["a man riding a horse", "two dogs play with a red ball on the grass next to a car and a cat",
            "a cat", "the woman is wearing a blue shirt", "unbelievably, the cat-car jumps!"]


def options(**overrides) -> argparse.Namespace:
    """The Namespace SAEM's train.py pickles as 'opt' (its defaults, the README's f30k run), sized for tests."""
    opt = dict(data_path="/home/x/scan/data", data_name="f30k_precomp", margin=0.2, num_epochs=30, batch_size=64,
               word_dim=300, embed_size=1024, grad_clip=2.0, learning_rate=1e-4, lr_update=10, workers=10,
               log_step=10, val_step=1000, logger_name="./runs/runX/log2019-04-01T10-00-00/",
               model_name="./runs/runX/checkpoint", resume="", max_violation=True, img_dim=IMG_DIM,
               final_dims=EMBED, max_words=MAX_WORDS, bert_path="/home/x/scan/uncased_L-12_H-768_A-12/",
               txt_stru="cnn", trans_cfg="t_cfg.json", vocab_file="/home/x/scan/uncased_L-12_H-768_A-12/vocab.txt",
               bert_config_file="/home/x/scan/uncased_L-12_H-768_A-12/bert_config.json",
               init_checkpoint="/home/x/scan/uncased_L-12_H-768_A-12/pytorch_model.bin", do_lower_case=True)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def _random(layout: dict[str, tuple[int, ...]], g: torch.Generator) -> collections.OrderedDict:
    out = collections.OrderedDict()
    for key, shape in layout.items():
        if key.endswith("gamma"):
            out[key] = 1.0 + torch.randn(shape, generator=g) * 0.2
        else:
            out[key] = torch.randn(shape, generator=g) * 0.3
    return out


def official_weights(bert_dir: Path, seed: int = 0, perturb_bert: float = 0.0) -> list[dict]:
    """[img_enc.state_dict(), txt_enc.state_dict()] in the official layout: the directory's BERT with bert.py's names."""
    g = torch.Generator().manual_seed(seed)
    img = _random(image_layout(EMBED, IMG_DIM, INNER), g)
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=True)
    txt = collections.OrderedDict()
    for k, v in official.from_hugging_face(bert.state_dict()).items():
        txt[f"bert.{k}"] = v + torch.randn(v.shape, generator=g) * perturb_bert
    for i, k in enumerate((1, 2, 3)):
        txt.update(_random({f"convs1.{i}.weight": (CHANNELS, 1, k, HIDDEN), f"convs1.{i}.bias": (CHANNELS,)}, g))
    txt.update(_random({"mapping.weight": (EMBED, 3 * CHANNELS), "mapping.bias": (EMBED,)}, g))
    return [img, txt]


def save_official(path: Path, opt: argparse.Namespace, model: list) -> Path:
    """As train.py's save_checkpoint under PyTorch 0.4 (the legacy, non-zip format)."""
    torch.save({"epoch": 12, "model": model, "best_rsum": 476.8, "opt": opt, "Eiters": 45000}, path,
               _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "uncased_L-12_H-768_A-12", seed=2)


def random_images(seed: int, n: int = 4, regions: int = 36) -> torch.Tensor:
    return torch.rand(n, regions, IMG_DIM, generator=torch.Generator().manual_seed(seed))


def captions(folder: Path) -> Tokens:
    """The captions as itmkit's loader batches them: [CLS] .. [SEP], zero-padded to the longest."""
    encoded = [WordPieceVocabulary.load(str(folder)).encode(c) for c in CAPTIONS]
    lengths = torch.tensor([len(e) for e in encoded])
    ids = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    return Tokens(ids, lengths)


def official_scores(model: list, images: torch.Tensor, folder: Path, max_words: int = MAX_WORDS) -> torch.Tensor:
    """evaluation.encode_data + 1 - cdist(cosine): the official test-time scores, in float64."""
    img_sd = {k: v.double() for k, v in model[0].items()}
    txt_sd = {k: v.double() for k, v in model[1].items()}
    vocab = WordPieceVocabulary.load(str(folder))
    feats = [official.convert_to_feature(vocab.encode(c)[1:-1], max_words, vocab.cls_id, vocab.sep_id)
             for c in CAPTIONS]
    ids, mask = torch.tensor([f[0] for f in feats]), torch.tensor([f[1] for f in feats])
    img = official.transformer_mapping(img_sd, images.double(), heads=16)
    cap = official.text_forward(txt_sd, ids, mask, heads=2)
    return official.pdist_cos(img, cap)


def our_scores(path: Path, images: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(images, torch.full((images.shape[0],), images.shape[1])))
        return model.score(image, model.encode_texts(tokens))


@pytest.mark.parametrize("seed", [0, 1])
def test_an_imported_model_scores_like_the_official_forward_pass(tmp_path, bert_dir, seed):
    model = official_weights(bert_dir, seed=seed)
    source = save_official(tmp_path / "model_best.pth.tar", options(), model)
    out = import_checkpoint("saem", source, bert_dir, tmp_path / "saem.safetensors", get_importers())
    images, tokens = random_images(seed), captions(bert_dir)
    assert (tokens.lengths > MAX_WORDS).any() and (tokens.lengths < MAX_WORDS).any()  # cut and padded captions
    torch.testing.assert_close(our_scores(out, images, tokens).double(), official_scores(model, images, bert_dir),
                               rtol=0, atol=1e-5)


def test_the_recipe_records_the_options(tmp_path, bert_dir):
    opt = options(data_name="coco_precomp", num_epochs=20, learning_rate=2e-4, lr_update=5, margin=0.1)
    source = save_official(tmp_path / "model_best.pth.tar", opt, official_weights(bert_dir))
    notes: list[str] = []
    loaded = load_checkpoint(import_checkpoint("saem", source, bert_dir, tmp_path / "saem.safetensors", get_importers(),
                                               note=notes.append))
    r = loaded.model.recipe
    assert [s.spec.name for s in (r.image.encoder, *r.image.reasoners, r.image.pool, r.text.encoder, r.text.pool)] == [
        "core.precomp", "saem.transformer", "core.mean", "saem.bert", "saem.cnn"]
    assert (r.image.reasoners[0].spec.heads, r.image.reasoners[0].spec.intermediate) == (16, INNER)
    enc = r.text.encoder.spec
    assert (enc.path, enc.max_words, enc.pad_fragments, enc.freeze) == (str(bert_dir.resolve()), MAX_WORDS, True, True)
    assert (r.text.pool.spec.channels, r.text.pool.spec.widths, r.info.embed_dim) == (CHANNELS, [1, 2, 3], EMBED)
    assert [(o.slot.spec.name, o.weight) for o in r.objectives] == [("saem.angular", 1.0), ("saem.param_norm", 0.01)]
    assert (r.loss.spec.margin, r.loss.spec.max_violation) == (0.1, True)
    assert (r.data.protocol, r.data.test_split, r.data.path) == ("coco-1k-5fold", "testall", "data/coco_precomp")
    t = r.train
    assert (t.epochs, t.lr, t.lr_update, t.batch_size, t.optimizer, t.grad_clip) == (20, 2e-4, 5, 64, "adam", 0.0)
    assert any("16 heads" in n for n in notes) and any("never applied" in n for n in notes)
    assert not any("differs" in n for n in notes)
    assert isinstance(loaded.vocab, WordPieceVocabulary) and len(loaded.vocab) == 64
    assert not any(k.startswith("text.encoder.bert.pooler") for k in loaded.model.state_dict())
    assert loaded.meta["epoch"] == "12" and loaded.meta["official_best_rsum"] == "476.8"


def test_a_stored_bert_unlike_the_directory_is_used_and_reported(tmp_path, bert_dir):
    model = official_weights(bert_dir, seed=4, perturb_bert=0.05)
    source = save_official(tmp_path / "model_best.pth.tar", options(), model)
    notes: list[str] = []
    out = import_checkpoint("saem", source, bert_dir, tmp_path / "saem.safetensors", get_importers(), note=notes.append)
    assert any("differs from the weights in" in n for n in notes)
    images, tokens = random_images(4), captions(bert_dir)
    torch.testing.assert_close(our_scores(out, images, tokens).double(), official_scores(model, images, bert_dir),
                               rtol=0, atol=1e-5)


def test_hugging_face_layer_norm_names_and_id_buffers_import_too(tmp_path, bert_dir):
    model = official_weights(bert_dir, seed=5)
    model[1] = collections.OrderedDict(
        (k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
         if k.startswith("bert.") else k, v) for k, v in model[1].items())
    model[1]["bert.embeddings.position_ids"] = torch.arange(64)[None]
    source = save_official(tmp_path / "model_best.pth.tar", options(), model)
    out = import_checkpoint("saem", source, bert_dir, tmp_path / "saem.safetensors", get_importers())
    images, tokens = random_images(5), captions(bert_dir)
    reference = official_weights(bert_dir, seed=5)
    torch.testing.assert_close(our_scores(out, images, tokens).double(), official_scores(reference, images, bert_dir),
                               rtol=0, atol=1e-5)


ITMKIT = Path(sys.executable).with_name("itmkit")


def test_the_cli_imports(tmp_path, bert_dir):
    model = official_weights(bert_dir, seed=6)
    source = save_official(tmp_path / "model_best.pth.tar", options(), model)
    out = tmp_path / "saem.safetensors"
    result = subprocess.run([str(ITMKIT), "import", "saem", str(source), "--vocab", str(bert_dir), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    images, tokens = random_images(6), captions(bert_dir)
    torch.testing.assert_close(our_scores(out, images, tokens).double(), official_scores(model, images, bert_dir),
                               rtol=0, atol=1e-5)


# ============================================================================ errors


def _broken(kind: str, bert_dir: Path) -> tuple[argparse.Namespace, list]:
    opt, model = options(), official_weights(bert_dir)
    if kind == "missing key":
        del model[0]["layer.output.LayerNorm.beta"]
    elif kind == "wrong shape":
        model[0]["layer.intermediate.dense.bias"] = torch.zeros(INNER + 1)
    elif kind == "unexpected key":
        model[1]["mapping2.weight"] = torch.zeros(EMBED, EMBED)
    elif kind == "another text head":
        opt = options(txt_stru="rnn")
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "final_dims"})
    elif kind == "three modules":
        model.append({"fc.weight": torch.zeros(1)})
    elif kind == "another BERT":
        model[1]["bert.embeddings.word_embeddings.weight"] = torch.zeros(100, HIDDEN)
    elif kind == "too many words":
        opt = options(max_words=65)
    return opt, model


ERRORS = {
    "missing key": r"model\[0\] \(img_enc\): the weights do not match the official layout\n  missing: "
                   r"layer.output.LayerNorm.beta \(32,\)",
    "wrong shape": r"shape of layer.intermediate.dense.bias: \(25,\), expected \(24,\)",
    "unexpected key": r"model\[1\] \(txt_enc\): .*\n  unexpected: mapping2.weight",
    "another text head": r"txt_stru='rnn'; only the paper's CNN text head",
    "missing option": r"the checkpoint's options lack 'final_dims'",
    "three modules": r"'model' holds 2 state dicts \[img_enc, txt_enc\], this one holds 3",
    "another BERT": r"shape of bert.embeddings.word_embeddings.weight: \(100, 32\), expected \(64, 32\)",
    "too many words": r"max_words=65 does not fit the 64 positions",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, bert_dir, kind):
    opt, model = _broken(kind, bert_dir)
    source = save_official(tmp_path / "model_best.pth.tar", opt, model)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("saem", source, bert_dir, tmp_path / "saem.safetensors", get_importers())
    assert not (tmp_path / "saem.safetensors").exists()


def test_a_vocabulary_file_instead_of_the_bert_directory_is_a_clear_error(tmp_path, bert_dir):
    source = save_official(tmp_path / "model_best.pth.tar", options(), official_weights(bert_dir))
    vocab = tmp_path / "vocab.json"
    from itmkit.data.vocab import Vocabulary

    Vocabulary([*Vocabulary.SPECIALS, "dog"]).save(vocab)
    with pytest.raises(CheckpointError, match="pass the local directory of the BERT"):
        import_checkpoint("saem", source, vocab, tmp_path / "saem.safetensors", get_importers())
