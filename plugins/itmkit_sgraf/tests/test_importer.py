"""`itmkit import sgraf`: official checkpoints in, itmkit checkpoints out that score exactly like the official code."""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, DataError
from itmkit.importing import get_importers, gru_text_layout, import_checkpoint
from itmkit.testing import PYTHON2_PICKLE
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_sgraf.tests import official
from itmkit_sgraf.tests.fixtures import as_dtype, similarity_state

EMBED, IMG_DIM, WORD_DIM, SIM_DIM, REGIONS = 8, 12, 6, 10, 36
WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "two", "men", "sit"]


def options(**overrides) -> argparse.Namespace:
    """The Namespace Paranioar/SGRAF's train.py pickles as 'opt' (opts.py defaults at small sizes)."""
    opt = dict(data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/",
               model_name="./runs/f30k_SGR/checkpoint", logger_name="./runs/f30k_SGR/log", batch_size=128,
               num_epochs=40, lr_update=30, learning_rate=2e-4, workers=10, log_step=10, val_step=1000, grad_clip=2.0,
               margin=0.2, max_violation=True, img_dim=IMG_DIM, word_dim=WORD_DIM, embed_size=EMBED, sim_dim=SIM_DIM,
               num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=3,
               vocab_size=4 + len(WORDS))
    opt.update(overrides)
    return argparse.Namespace(**opt)


def official_weights(opt: argparse.Namespace, seed: int = 0, tracked: bool = True, regions: int = REGIONS) -> list:
    """Random weights in the official layout [img_enc, txt_enc, sim_enc].state_dict()."""
    g = torch.Generator().manual_seed(seed)
    img = collections.OrderedDict([("fc.weight", torch.randn(opt.embed_size, opt.img_dim, generator=g) * 0.3),
                                   ("fc.bias", torch.randn(opt.embed_size, generator=g) * 0.1)])
    layout = gru_text_layout(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, opt.bi_gru)
    txt = collections.OrderedDict((k.replace("rnn.", "cap_rnn.", 1), torch.randn(shape, generator=g) * 0.4)
                                  for k, shape in layout.items())
    sim = similarity_state(embed=opt.embed_size, sim_dim=opt.sim_dim, regions=regions, module=opt.module_name,
                           steps=opt.sgr_step, seed=seed + 1, tracked=tracked)
    return [img, txt, sim]


def save_official(path, opt: argparse.Namespace, *, model=None, **kwargs) -> None:
    torch.save({"epoch": 27, "model": model if model is not None else official_weights(opt), "best_rsum": 488.75,
                "opt": opt, "Eiters": 61000}, path, **kwargs)


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "f30k_precomp_vocab.json"
    Vocabulary([*Vocabulary.SPECIALS, *WORDS]).save(path)
    return path


def random_inputs(seed: int, n_images=3, n_captions=5, regions=REGIONS, words=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, regions, IMG_DIM, generator=g)
    lengths = torch.randint(2, words + 1, (n_captions,), generator=g)
    lengths[1] = words
    ids = torch.randint(1, 4 + len(WORDS), (n_captions, words), generator=g)
    ids = ids.masked_fill(~lengths_to_mask(lengths, words), 0)
    return images, ids, lengths


def official_scores(opt: argparse.Namespace, model: list, images, ids, lengths) -> torch.Tensor:
    """The official evaluation: encoders in eval mode, then EncoderSimilarity.forward (float64 here)."""
    img_sd, txt_sd, sim_sd = (as_dtype(m, torch.float64) for m in model)
    img = official.encode_images(img_sd, images.double(), no_imgnorm=opt.no_imgnorm)
    cap = official.encode_texts(txt_sd, ids, lengths, word_dim=opt.word_dim, embed_size=opt.embed_size,
                                num_layers=opt.num_layers, bi_gru=opt.bi_gru, no_txtnorm=opt.no_txtnorm)
    return official.forward_sim(sim_sd, img, cap, lengths, module_name=opt.module_name, sgr_step=opt.sgr_step)


def our_scores(path, images, ids, lengths) -> torch.Tensor:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(images, torch.full((images.shape[0],), images.shape[1])))
        text = model.encode_texts(Tokens(ids, lengths))
        return model.score(image, text)


def imported(tmp_path, vocab_path, opt, model) -> Path:
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    return import_checkpoint("sgraf", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "sgraf.safetensors",
                             get_importers())


CASES = {
    "f30k SGR": dict(),
    "f30k SAF": dict(module_name="SAF", num_epochs=30, lr_update=20),
    "coco SGR, 1 step": dict(data_name="coco_precomp", sgr_step=1, num_epochs=20, lr_update=10),
    "SAF, 2-layer uni-GRU, no text norm": dict(module_name="SAF", num_layers=2, bi_gru=False, no_txtnorm=True),
    "SGR 2 steps, 2-layer bi-GRU, no image norm": dict(sgr_step=2, num_layers=2, no_imgnorm=True),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_imported_model_scores_like_the_official_forward_pass(tmp_path, vocab_path, overrides):
    opt = options(**overrides)
    model = official_weights(opt, seed=len(overrides))
    out = imported(tmp_path, vocab_path, opt, model)
    images, ids, lengths = random_inputs(seed=len(overrides))
    expected = official_scores(opt, model, images, ids, lengths)
    torch.testing.assert_close(our_scores(out, images, ids, lengths).double(), expected, rtol=0, atol=1e-5)


def test_the_converted_recipe_records_the_options(tmp_path, vocab_path):
    opt = options(**CASES["coco SGR, 1 step"])
    out = imported(tmp_path, vocab_path, opt, official_weights(opt))
    loaded = load_checkpoint(out)
    r = loaded.model.recipe
    (match,) = r.match
    assert (match.cross.spec.name, match.cross.spec.lambda_softmax) == ("sgraf.t2i", 9.0)
    assert (match.similarity.spec.sim_dim, match.aggregate.spec.name) == (SIM_DIM, "sgraf.sgr")
    assert match.aggregate.spec.steps == 1
    pool = r.image.pool.spec
    assert (pool.name, pool.num_regions, pool.dropout) == ("sgraf.visual_sa", 36, 0.4)
    assert (r.text.pool.spec.name, r.text.pool.spec.dropout) == ("sgraf.text_sa", 0.4)
    enc = r.text.encoder.spec
    assert (enc.word_dim, enc.num_layers, enc.bidirectional, enc.embed_dropout) == (WORD_DIM, 1, True, 0.4)
    assert r.info.embed_dim == EMBED
    assert (r.data.protocol, r.data.test_split, r.data.path) == ("coco-1k-5fold", "testall", "data/coco_precomp")
    train = r.train
    assert (train.epochs, train.lr, train.lr_update, train.batch_size, train.grad_clip) == (20, 2e-4, 10, 128, 2.0)
    assert (r.loss.spec.margin, r.loss.spec.max_violation) == (0.2, True)
    assert loaded.meta["imported_from"] == str(tmp_path / "model_best.pth.tar")
    assert loaded.meta["epoch"] == "27" and loaded.meta["official_best_rsum"] == "488.75"
    assert loaded.vocab == Vocabulary.load(vocab_path)


def test_the_batch_norm_statistics_arrive_intact(tmp_path, vocab_path):
    opt = options(module_name="SAF")
    model = official_weights(opt, seed=3)
    state = load_checkpoint(imported(tmp_path, vocab_path, opt, model)).model.state_dict()
    sim = model[2]
    for ours, theirs in (("image.pool.embedding_local.1", "v_global_w.embedding_local.1"),
                         ("image.pool.embedding_global.1", "v_global_w.embedding_global.1"),
                         ("branches.0.stages.2.bn", "SAF_module.bn")):
        for stat in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(state[f"{ours}.{stat}"], sim[f"{theirs}.{stat}"]), f"{ours}.{stat}"


def test_a_checkpoint_without_num_batches_tracked_imports(tmp_path, vocab_path):
    # PyTorch < 0.4.1 (the Python 2.7 branch's era) saved BatchNorm without the counter.
    opt = options(module_name="SAF")
    model = official_weights(opt, seed=5, tracked=False)
    assert not any("num_batches_tracked" in k for k in model[2])
    out = imported(tmp_path, vocab_path, opt, model)
    images, ids, lengths = random_inputs(seed=5)
    torch.testing.assert_close(our_scores(out, images, ids, lengths).double(),
                               official_scores(opt, model, images, ids, lengths), rtol=0, atol=1e-5)
    assert int(load_checkpoint(out).model.state_dict()["branches.0.stages.2.bn.num_batches_tracked"]) == 0


def test_the_region_count_comes_from_the_checkpoint_and_other_data_is_refused(tmp_path, vocab_path):
    opt = options()
    out = imported(tmp_path, vocab_path, opt, official_weights(opt, regions=10))
    loaded = load_checkpoint(out)
    assert loaded.model.recipe.image.pool.spec.num_regions == 10
    images, ids, lengths = random_inputs(seed=6, regions=10)
    our_scores(out, images, ids, lengths)  # 10 regions: fine
    images, ids, lengths = random_inputs(seed=6, regions=36)
    with pytest.raises(DataError, match="built for 10 regions per image"):
        our_scores(out, images, ids, lengths)


# ---------------------------------------------------------------------------------- Python 2


@pytest.mark.filterwarnings("ignore:pickle_load_args only works")
def test_a_python2_legacy_checkpoint_imports(tmp_path, vocab_path):
    opt = options(logger_name="runs/f30k_sgraf_pr\xe9cis/log")  # latin-1 bytes that are not UTF-8
    model = official_weights(opt, tracked=False)
    path = tmp_path / "model_best.pth.tar"
    save_official(path, opt, model=model, pickle_module=PYTHON2_PICKLE, pickle_protocol=2,
                  _use_new_zipfile_serialization=False)
    out = import_checkpoint("sgraf", path, vocab_path, tmp_path / "sgraf.safetensors", get_importers())
    images, ids, lengths = random_inputs(seed=4)
    torch.testing.assert_close(our_scores(out, images, ids, lengths).double(),
                               official_scores(opt, model, images, ids, lengths), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- the CLI


ITMKIT = Path(sys.executable).with_name("itmkit")  # the console script, as a user runs it


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ITMKIT), *args], capture_output=True, text=True, timeout=300)


def test_the_cli_imports_and_the_result_scores_like_the_official_code(tmp_path, vocab_path):
    opt = options(module_name="SAF")
    model = official_weights(opt, seed=7)
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    out = tmp_path / "sgraf.safetensors"
    result = run_cli("import", "sgraf", str(tmp_path / "model_best.pth.tar"), "--vocab", str(vocab_path),
                     "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    images, ids, lengths = random_inputs(seed=7)
    torch.testing.assert_close(our_scores(out, images, ids, lengths).double(),
                               official_scores(opt, model, images, ids, lengths), rtol=0, atol=1e-5)


def _broken(kind: str, opt: argparse.Namespace) -> tuple[argparse.Namespace, list]:
    model = official_weights(opt)
    if kind == "missing key":
        del model[2]["SGR_module.2.graph_key_w.bias"]
    elif kind == "wrong shape":
        model[2]["sim_tranloc_w.weight"] = model[2]["sim_tranloc_w.weight"].T.contiguous()
    elif kind == "unexpected key":
        model[2]["SAF_module.attn_sim_w.weight"] = torch.zeros(1, SIM_DIM)
    elif kind == "more steps than the options say":
        opt = argparse.Namespace(**{**vars(opt), "sgr_step": 2})
    elif kind == "renamed text GRU":
        model[1] = collections.OrderedDict((k.replace("cap_rnn.", "rnn."), v) for k, v in model[1].items())
    elif kind == "unknown module_name":
        opt = argparse.Namespace(**{**vars(opt), "module_name": "SGRR"})
    elif kind == "vocabulary size":
        model[1]["embed.weight"] = torch.zeros(8481, WORD_DIM)
        opt = argparse.Namespace(**{**vars(opt), "vocab_size": 8481})
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "sim_dim"})
    elif kind == "two modules":
        model.pop()
    return opt, model


ERRORS = {
    "missing key": r"model\[2\] \(sim_enc, SGR\): the weights do not match the official layout\n"
                   r"  missing: SGR_module.2.graph_key_w.bias \(10,\)",
    "wrong shape": r"model\[2\] .*\n  shape of sim_tranloc_w.weight: \(8, 10\), expected \(10, 8\)",
    "unexpected key": r"unexpected: SAF_module.attn_sim_w.weight \(1, 10\)",
    "more steps than the options say": r"unexpected: SGR_module.2.graph_key_w.bias \(10,\)",
    "renamed text GRU": r"model\[1\] \(txt_enc\): .*\n  missing: cap_rnn.bias_hh_l0",
    "unknown module_name": r"option module_name='SGRR' is not supported \(did you mean 'SGR'\?\)",
    "vocabulary size": r"the vocabulary has 16 words but the checkpoint's word embedding .* has 8481 rows",
    "missing option": r"the checkpoint's options lack 'sim_dim'",
    "two modules": r"'model' holds 3 state dicts \[img_enc, txt_enc, sim_enc\], this one holds 2",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, vocab_path, kind):
    opt, model = _broken(kind, options())
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("sgraf", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "sgraf.safetensors",
                          get_importers())
    assert not (tmp_path / "sgraf.safetensors").exists()


def test_the_cli_reports_a_broken_checkpoint_in_one_message(tmp_path, vocab_path):
    opt, model = _broken("wrong shape", options())
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    result = run_cli("import", "sgraf", str(tmp_path / "model_best.pth.tar"), "--vocab", str(vocab_path),
                     "-o", str(tmp_path / "sgraf.safetensors"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "error:" in result.stderr
    assert "sim_tranloc_w.weight" in result.stderr
    assert not (tmp_path / "sgraf.safetensors").exists()
