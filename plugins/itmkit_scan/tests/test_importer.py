"""`itmkit import scan`: official checkpoints in, itmkit checkpoints out that score exactly like the official code."""

from __future__ import annotations

import argparse
import collections
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit.testing import save_like_python2
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit.importing import gru_text_layout as text_layout
from itmkit.importing import fold_weight_norm
from itmkit_scan.tests import official

EMBED, IMG_DIM, WORD_DIM = 8, 12, 6
WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "two", "men", "sit"]


def options(**overrides) -> argparse.Namespace:
    """The Namespace kuanghuei/SCAN's train.py pickles as 'opt' (its defaults, small sizes, README flags)."""
    opt = dict(data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=30,
               batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, num_layers=1, learning_rate=2e-4,
               lr_update=15, workers=10, log_step=10, val_step=500, logger_name="./runs/runX/log",
               model_name="./runs/runX/checkpoint", resume="", max_violation=True, img_dim=IMG_DIM,
               no_imgnorm=False, no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func="LogSumExp",
               cross_attn="t2i", precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0, lambda_softmax=9.0,
               vocab_size=4 + len(WORDS))
    opt.update(overrides)
    return argparse.Namespace(**opt)


def official_weights(opt: argparse.Namespace, seed: int = 0) -> list[collections.OrderedDict]:
    """Random weights in the official layout [img_enc.state_dict(), txt_enc.state_dict()]."""
    g = torch.Generator().manual_seed(seed)
    if opt.precomp_enc_type == "weight_norm":
        img = collections.OrderedDict([("fc.weight_g", torch.rand(1, generator=g) + 0.5),
                                       ("fc.weight_v", torch.randn(opt.embed_size, opt.img_dim, generator=g)),
                                       ("fc.bias", torch.randn(opt.embed_size, generator=g) * 0.1)])
    else:
        img = collections.OrderedDict([("fc.weight", torch.randn(opt.embed_size, opt.img_dim, generator=g) * 0.3),
                                       ("fc.bias", torch.randn(opt.embed_size, generator=g) * 0.1)])
    layout = text_layout(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, opt.bi_gru)
    txt = collections.OrderedDict((k, torch.randn(shape, generator=g) * 0.4) for k, shape in layout.items())
    return [img, txt]


def save_official(path, opt: argparse.Namespace, *, model=None, pickle_module=pickle) -> None:
    torch.save({"epoch": 11, "model": model if model is not None else official_weights(opt), "best_rsum": 431.25,
                "opt": opt, "Eiters": 25000}, path, pickle_module=pickle_module)


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "f30k_precomp_vocab.json"
    Vocabulary([*Vocabulary.SPECIALS, *WORDS]).save(path)
    return path


def random_inputs(seed: int, n_images=3, n_captions=5, regions=36, words=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, regions, IMG_DIM, generator=g)
    lengths = torch.randint(2, words + 1, (n_captions,), generator=g)
    lengths[1] = words
    ids = torch.randint(1, 4 + len(WORDS), (n_captions, words), generator=g).masked_fill(~lengths_to_mask(lengths, words), 0)
    return images, ids, lengths


def official_scores(opt: argparse.Namespace, model: list, images, ids, lengths) -> torch.Tensor:
    """The official forward pass: encoders, then xattn_score_t2i / _i2t."""
    img = official.encode_images(model[0], images, no_imgnorm=opt.no_imgnorm,
                                 weight_norm=opt.precomp_enc_type == "weight_norm")
    cap = official.encode_texts(model[1], ids, lengths, word_dim=opt.word_dim, embed_size=opt.embed_size,
                                num_layers=opt.num_layers, bi_gru=opt.bi_gru, no_txtnorm=opt.no_txtnorm)
    return official.xattn_scores(img, cap, lengths, cross_attn=opt.cross_attn, agg_func=opt.agg_func,
                                 lambda_softmax=opt.lambda_softmax, lambda_lse=opt.lambda_lse,
                                 raw_norm=opt.raw_feature_norm)


def our_scores(path, images, ids, lengths) -> torch.Tensor:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(images, torch.full((images.shape[0],), images.shape[1])))
        text = model.encode_texts(Tokens(ids, lengths))
        return model.score(image, text)


CASES = {
    "f30k t-i LSE": dict(),
    "f30k t-i AVG": dict(agg_func="Mean"),
    "f30k i-t LSE": dict(cross_attn="i2t", lambda_softmax=4.0, lambda_lse=5.0),
    "coco i-t AVG, 2-layer bi-GRU": dict(cross_attn="i2t", agg_func="Mean", lambda_softmax=4.0, num_layers=2,
                                         data_name="coco_precomp", learning_rate=5e-4, num_epochs=20, lr_update=10),
    "t-i Max, uni-GRU, weight_norm": dict(agg_func="Max", bi_gru=False, precomp_enc_type="weight_norm"),
    "i-t Sum, 2-layer uni-GRU, softmax norm, no text norm": dict(cross_attn="i2t", agg_func="Sum", num_layers=2,
                                                                 bi_gru=False, raw_feature_norm="softmax", no_txtnorm=True),
    "t-i LSE lambda 20, no image norm": dict(lambda_lse=20.0, no_imgnorm=True),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_imported_model_scores_like_the_official_forward_pass(tmp_path, vocab_path, overrides):
    opt = options(**overrides)
    model = official_weights(opt, seed=len(overrides))
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    out = import_checkpoint("scan", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "scan.safetensors",
                            get_importers())
    images, ids, lengths = random_inputs(seed=len(overrides))
    expected = official_scores(opt, model, images, ids, lengths)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), expected, rtol=0, atol=1e-5)


def test_the_converted_recipe_records_the_options(tmp_path, vocab_path):
    opt = options(**CASES["coco i-t AVG, 2-layer bi-GRU"])
    save_official(tmp_path / "model_best.pth.tar", opt)
    out = import_checkpoint("scan", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "scan.safetensors",
                            get_importers())
    loaded = load_checkpoint(out)
    r = loaded.model.recipe
    (match,) = r.match
    assert (match.cross.spec.name, match.cross.spec.lambda_softmax, match.aggregate.spec.name) == ("scan.i2t", 4.0, "core.mean")
    enc = r.text.encoder.spec
    assert (enc.word_dim, enc.num_layers, enc.bidirectional, enc.normalize, r.info.embed_dim) == (WORD_DIM, 2, True, True, EMBED)
    assert (r.data.protocol, r.data.test_split, r.data.path) == ("coco-1k-5fold", "testall", "data/coco_precomp")
    assert (r.train.epochs, r.train.lr, r.train.lr_update, r.train.batch_size) == (20, 5e-4, 10, 128)
    assert (r.loss.spec.margin, r.loss.spec.max_violation) == (0.2, True)
    assert loaded.meta["imported_from"] == str(tmp_path / "model_best.pth.tar")
    assert loaded.meta["epoch"] == "11" and loaded.meta["official_best_rsum"] == "431.25"
    assert loaded.vocab == Vocabulary.load(vocab_path)


def test_weight_norm_folds_into_the_weight_the_layer_used():
    layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(5, 3), dim=None)
    g, v = layer.parametrizations.weight.original0.detach(), layer.parametrizations.weight.original1.detach()
    with torch.no_grad():
        g.mul_(1.7)
        layer.parametrizations.weight.original0.copy_(g)
        torch.testing.assert_close(fold_weight_norm(g.reshape(1), v), layer.weight)


# ---------------------------------------------------------------------------------- Python 2


@pytest.mark.filterwarnings("ignore:pickle_load_args only works")
def test_a_python2_legacy_checkpoint_imports(tmp_path, vocab_path):
    opt = options(logger_name="runs/f30k_scan_pr\xe9cis/log")  # latin-1 bytes that are not UTF-8
    model = official_weights(opt)
    path = tmp_path / "model_best.pth.tar"
    save_like_python2({"epoch": 11, "model": model, "best_rsum": 431.25, "opt": opt, "Eiters": 25000}, path)
    out = import_checkpoint("scan", path, vocab_path, tmp_path / "scan.safetensors", get_importers())
    images, ids, lengths = random_inputs(seed=4)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- the CLI


ITMKIT = Path(sys.executable).with_name("itmkit")  # the console script, as a user runs it


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ITMKIT), *args], capture_output=True, text=True, timeout=300)


def test_the_cli_imports_and_the_result_scores_like_the_official_code(tmp_path, vocab_path):
    opt = options(cross_attn="i2t", agg_func="LogSumExp", lambda_softmax=4.0, lambda_lse=5.0)
    model = official_weights(opt, seed=7)
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    out = tmp_path / "scan.safetensors"
    result = run_cli("import", "scan", str(tmp_path / "model_best.pth.tar"), "--vocab", str(vocab_path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    images, ids, lengths = random_inputs(seed=7)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


def _broken(kind: str, opt: argparse.Namespace) -> tuple[argparse.Namespace, list]:
    model = official_weights(opt)
    if kind == "missing key":
        del model[1]["rnn.bias_hh_l0_reverse"]
    elif kind == "wrong shape":
        model[0]["fc.weight"] = model[0]["fc.weight"].T.contiguous()
    elif kind == "unexpected key":
        model[1]["rnn.weight_ih_l1"] = torch.zeros(3 * EMBED, 2 * EMBED)
    elif kind == "unknown agg_func":
        opt = argparse.Namespace(**{**vars(opt), "agg_func": "LogSumExpp"})
    elif kind == "vocabulary size":
        model[1]["embed.weight"] = torch.zeros(8481, WORD_DIM)
        opt = argparse.Namespace(**{**vars(opt), "vocab_size": 8481})
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "lambda_softmax"})
    elif kind == "three modules":
        model.append({"fc.weight": torch.zeros(1)})
    return opt, model


ERRORS = {
    "missing key": r"model\[1\] \(txt_enc\): the weights do not match the official layout\n  missing: rnn.bias_hh_l0_reverse \(24,\)",
    "wrong shape": r"model\[0\] \(img_enc\): the weights do not match .*\n  shape of fc.weight: \(12, 8\), expected \(8, 12\)",
    "unexpected key": r"unexpected: rnn.weight_ih_l1 \(24, 16\)",
    "unknown agg_func": r"option agg_func='LogSumExpp' is not supported \(did you mean 'LogSumExp'\?\)",
    "vocabulary size": r"the vocabulary has 16 words but the checkpoint's word embedding .* has 8481 rows",
    "missing option": r"the checkpoint's options lack 'lambda_softmax'",
    "three modules": r"'model' holds 2 state dicts \[img_enc, txt_enc\], this one holds 3",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, vocab_path, kind):
    opt, model = _broken(kind, options())
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("scan", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "scan.safetensors",
                          get_importers())
    assert not (tmp_path / "scan.safetensors").exists()


@pytest.mark.parametrize("kind", ["missing key", "wrong shape", "unknown agg_func"])
def test_the_cli_reports_a_broken_checkpoint_in_one_message(tmp_path, vocab_path, kind):
    opt, model = _broken(kind, options())
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    result = run_cli("import", "scan", str(tmp_path / "model_best.pth.tar"), "--vocab", str(vocab_path),
                     "-o", str(tmp_path / "scan.safetensors"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "error:" in result.stderr
    assert "model_best.pth.tar" in result.stderr
    assert not (tmp_path / "scan.safetensors").exists()


def test_an_unknown_importer_name_lists_the_choices(tmp_path, vocab_path):
    with pytest.raises(CheckpointError, match=r"no importer 'scna' \(did you mean 'scan'\?\)"):
        import_checkpoint("scna", tmp_path / "x.pth.tar", vocab_path, tmp_path / "out.safetensors", get_importers())
