"""Importing official BFAN checkpoints: the same scores as the official forward pass, clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_bfan.tests import official

ITMKIT = Path(sys.executable).with_name("itmkit")
VOCAB_WORDS = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(26)]  # 30 words
IMG_DIM, EMBED, WORD_DIM = 12, 16, 8


def options(**changes) -> argparse.Namespace:
    """train.py's options as a BFAN run pickles them (small sizes)."""
    opt = dict(
        data_path="/userhome/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=15,
        batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, num_layers=1, learning_rate=2e-4,
        lr_update=15, workers=10, log_step=100, val_step=1500, logger_name="runs/log", model_name="runs/model",
        resume="", max_violation=True, img_dim=IMG_DIM, no_imgnorm=False, no_txtnorm=False,
        precomp_enc_type="basic", lambda_softmax=20.0, focal_type="equal", vocab_size=len(VOCAB_WORDS),
    )
    opt.update(changes)
    return argparse.Namespace(**opt)


def official_model(opt: argparse.Namespace, seed: int = 0):
    """The official encoders with random weights (the weight_norm variant warns: old torch API)."""
    torch.manual_seed(seed)
    weight_norm = opt.precomp_enc_type == "weight_norm"
    image = official.OfficialImageEncoder(opt.img_dim, opt.embed_size, weight_norm=weight_norm)
    text = official.OfficialTextEncoder(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers)
    for p in image.parameters():  # not zero biases: every weight must land in the right place
        torch.nn.init.normal_(p, std=0.3)
    return image.eval(), text.eval()


def save_official(path: Path, opt: argparse.Namespace, image, text, drop: str | None = None,
                  reshape: str | None = None) -> Path:
    """torch.save the official container; optionally without one key, or with one a row short."""
    img_sd, txt_sd = image.state_dict(), text.state_dict()
    for sd in (img_sd, txt_sd):
        if drop in sd:
            del sd[drop]
        if reshape in sd:
            sd[reshape] = sd[reshape][:-1]
    torch.save({"epoch": 12, "model": [img_sd, txt_sd], "best_rsum": 480.5, "opt": opt, "Eiters": 3400}, path)
    return path


@pytest.fixture
def vocab_path(tmp_path) -> Path:
    path = tmp_path / "f30k_precomp_vocab.json"
    Vocabulary(VOCAB_WORDS).save(path)
    return path


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    regions = torch.rand(4, 6, IMG_DIM, generator=g)
    lengths = torch.tensor([7, 2, 5, 4, 6])
    ids = torch.randint(4, len(VOCAB_WORDS), (5, 7), generator=g).masked_fill(~lengths_to_mask(lengths, 7), 0)
    return regions, ids, lengths


def official_scores(image, text, opt, seed: int = 3) -> torch.Tensor:
    """The official forward pass: encoders, then xattn_score's per-caption loop (float64)."""
    regions, ids, lengths = inputs(seed)
    with torch.no_grad():
        img, cap = image(regions).double(), text(ids, lengths).double()
    image_lens = torch.full((img.shape[0],), img.shape[1])
    return official.bfan_scores(img, image_lens, cap, lengths, opt.lambda_softmax, opt.focal_type)


def itmkit_scores(checkpoint: Path, seed: int = 3) -> torch.Tensor:
    loaded = load_checkpoint(checkpoint)
    regions, ids, lengths = inputs(seed)
    model = loaded.model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(regions, torch.full((regions.shape[0],), regions.shape[1])))
        return model.score(image, model.encode_texts(Tokens(ids, lengths)))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize("changes", [
    {"focal_type": "equal"},
    {"focal_type": "prob"},
    {"focal_type": "prob", "num_layers": 2, "lambda_softmax": 9.0},
    {"precomp_enc_type": "weight_norm"},
], ids=["equal", "prob", "prob-2-layers", "weight-norm"])
def test_imported_checkpoint_scores_as_the_official_model(tmp_path, vocab_path, changes):
    opt = options(**changes)
    image, text = official_model(opt)
    ckpt = save_official(tmp_path / "model_best.pth.tar", opt, image, text)
    out = import_checkpoint("bfan", ckpt, vocab_path, tmp_path / "bfan.safetensors", get_importers())
    torch.testing.assert_close(itmkit_scores(out).double(), official_scores(image, text, opt), rtol=0, atol=1e-5)


def test_the_recipe_records_the_official_options(tmp_path, vocab_path):
    opt = options(focal_type="prob", data_name="coco_precomp", num_epochs=20, learning_rate=5e-4, margin=0.1,
                  no_txtnorm=True, lambda_softmax=18.0)
    image, text = official_model(opt)
    ckpt = save_official(tmp_path / "model_best.pth.tar", opt, image, text)
    out = import_checkpoint("bfan", ckpt, vocab_path, tmp_path / "bfan.safetensors", get_importers())
    loaded = load_checkpoint(out)
    recipe = tomllib.loads(loaded.meta["recipe"])
    assert recipe["recipe"]["embed_dim"] == EMBED
    assert [m["cross"] for m in recipe["match"]] == [
        {"stage": "bfan.t2i", "lambda_softmax": 18.0, "focal_type": "prob", "raw_norm": "clipped_l2norm"},
        {"stage": "bfan.i2t", "lambda_softmax": 18.0, "focal_type": "prob", "raw_norm": "clipped_l2norm"},
    ]
    assert [m["weight"] for m in recipe["match"]] == [1.0, 1.0]
    assert recipe["text"]["encoder"]["normalize"] is False and recipe["image"]["encoder"]["normalize"] is True
    assert recipe["loss"]["margin"] == 0.1 and recipe["loss"]["max_violation"] is True
    assert (recipe["train"]["epochs"], recipe["train"]["lr"], recipe["train"]["lr_update"]) == (20, 5e-4, 15)
    assert (recipe["data"]["protocol"], recipe["data"]["test_split"]) == ("coco-1k-5fold", "testall")
    assert loaded.meta["epoch"] == "12" and loaded.meta["official_best_rsum"] == "480.5"
    assert loaded.vocab == Vocabulary(VOCAB_WORDS)


def test_the_cli_imports_a_checkpoint(tmp_path, vocab_path):
    opt = options(focal_type="prob")
    image, text = official_model(opt, seed=4)
    ckpt = save_official(tmp_path / "model_best.pth.tar", opt, image, text)
    out = tmp_path / "imported.safetensors"
    result = subprocess.run([str(ITMKIT), "import", "bfan", str(ckpt), "--vocab", str(vocab_path), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.is_file() and "wrote" in result.stdout
    torch.testing.assert_close(itmkit_scores(out).double(), official_scores(image, text, opt), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- errors


def _import(tmp_path, vocab_path, opt=None, **kwargs):
    opt = opt or options()
    image, text = official_model(opt)
    ckpt = save_official(tmp_path / "model_best.pth.tar", opt, image, text, **kwargs)
    return import_checkpoint("bfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())


def test_a_missing_key_is_named(tmp_path, vocab_path):
    with pytest.raises(CheckpointError, match=r"text encoder.*\n.*missing: rnn.weight_hh_l0_reverse \(48, 16\)"):
        _import(tmp_path, vocab_path, drop="rnn.weight_hh_l0_reverse")


def test_a_wrong_shape_is_named(tmp_path, vocab_path):
    message = r"image encoder.*\n.*shape of fc.weight: \(15, 12\), expected \(16, 12\)"
    with pytest.raises(CheckpointError, match=message):
        _import(tmp_path, vocab_path, reshape="fc.weight")


def test_a_vocabulary_of_another_size_is_reported(tmp_path):
    path = tmp_path / "other_vocab.json"
    Vocabulary(VOCAB_WORDS[:-2]).save(path)
    message = r"vocabulary of 28 words.*\n.*shape of embed.weight: \(30, 8\), expected \(28, 8\)"
    with pytest.raises(CheckpointError, match=message):
        _import(tmp_path, path)


def test_a_uni_gru_checkpoint_is_not_bfan(tmp_path, vocab_path):
    opt = options()
    image, text = official_model(opt)
    txt_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("_reverse")}
    ckpt = tmp_path / "scan_unigru.pth.tar"
    torch.save({"epoch": 1, "model": [image.state_dict(), txt_sd], "best_rsum": 0.0, "opt": opt, "Eiters": 1}, ckpt)
    with pytest.raises(CheckpointError, match="missing: rnn.bias_hh_l0_reverse"):
        import_checkpoint("bfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())


def test_an_unknown_focal_type_and_a_missing_option_are_reported(tmp_path, vocab_path):
    with pytest.raises(CheckpointError, match="unknown focal_type 'focal'; BFAN has equal, prob"):
        _import(tmp_path, vocab_path, opt=options(focal_type="focal"))
    opt = options()
    del opt.lambda_softmax
    with pytest.raises(CheckpointError, match="options lack 'lambda_softmax'"):
        _import(tmp_path, vocab_path, opt=opt)


def test_a_third_module_is_reported(tmp_path, vocab_path):
    opt = options()
    image, text = official_model(opt)
    ckpt = tmp_path / "three.pth.tar"
    torch.save({"epoch": 1, "model": [image.state_dict(), text.state_dict(), {"x": torch.zeros(1)}], "opt": opt}, ckpt)
    with pytest.raises(CheckpointError, match=r"\[img_enc, txt_enc\] \(2 state dicts\), found 3"):
        import_checkpoint("bfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())
