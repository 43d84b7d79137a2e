"""`itmkit import imram`: official checkpoints (one DataParallel state dict) in, models that score like the official evaluation out."""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, gru_text_layout, import_checkpoint
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_imram.tests import official
from itmkit_scan.tests import official as scan_official

EMBED, IMG_DIM, WORD_DIM = 8, 12, 6
WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "two", "men", "sit"]
GATES = ("linear_t2i", "gate_t2i", "linear_i2t", "gate_i2t")


def options(**overrides) -> argparse.Namespace:
    """The Namespace HuiChen24/IMRAM's train_gpus.py pickles as 'opt' (opts.py defaults, small sizes, script flags)."""
    opt = dict(data_path="../../data", data_name="f30k_precomp", vocab_path="vocab", margin=0.2, num_epochs=30,
               batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, num_layers=1, learning_rate=2e-4,
               lr_update=15, workers=10, log_step=10, val_step=5000, logger_name="checkpoint/f30k/log",
               model_name="checkpoint/f30k/log", resume="", max_violation=True, img_dim=IMG_DIM, no_imgnorm=False,
               no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func="Mean", cross_attn="t2i",
               precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0, lambda_softmax=9.0, pos_emb=False, gpuid="0,1",
               model_mode="full_IMRAM", iteration_step=3, no_IMRAM_norm=True, vocab_size=4 + len(WORDS))
    opt.update(overrides)
    return argparse.Namespace(**opt)


def official_weights(opt: argparse.Namespace, seed: int = 0) -> collections.OrderedDict:
    """Random weights as the official DataParallel model's state_dict(): one dict, every key 'module.'-prefixed."""
    g = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    if opt.precomp_enc_type == "weight_norm":
        state["img_enc.fc_local.weight_g"] = torch.rand((), generator=g) + 0.5
        state["img_enc.fc_local.weight_v"] = torch.randn(opt.embed_size, opt.img_dim, generator=g)
    else:
        state["img_enc.fc_local.weight"] = torch.randn(opt.embed_size, opt.img_dim, generator=g) * 0.3
    state["img_enc.fc_local.bias"] = torch.randn(opt.embed_size, generator=g) * 0.1
    for k, shape in gru_text_layout(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, opt.bi_gru).items():
        state[f"txt_enc.{k}"] = torch.randn(shape, generator=g) * 0.4
    for name in GATES:
        state[f"{name}.weight"] = torch.randn(opt.embed_size, 2 * opt.embed_size, generator=g) * 0.5
        state[f"{name}.bias"] = torch.randn(opt.embed_size, generator=g) * 0.3
    return collections.OrderedDict((f"module.{k}", v) for k, v in state.items())


def save_official(path, opt: argparse.Namespace, model=None) -> None:
    torch.save({"epoch": 17, "model": model if model is not None else official_weights(opt), "best_rsum": 470.5,
                "opt": opt}, path)


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
    ids = torch.randint(1, 4 + len(WORDS), (n_captions, words), generator=g)
    return images, ids.masked_fill(~lengths_to_mask(lengths, words), 0), lengths


def official_scores(opt: argparse.Namespace, model: dict, images, ids, lengths) -> np.ndarray:
    """The official evaluation: encoders, then shard_xattn_{Full,Text,Image}_IMRAM."""
    state = {k.removeprefix("module."): v for k, v in model.items()}
    img_sd = {k.removeprefix("img_enc.fc_local.").join(("fc.", "")): v for k, v in state.items() if k.startswith("img_enc.")}
    txt_sd = {k.removeprefix("txt_enc."): v for k, v in state.items() if k.startswith("txt_enc.")}
    img = scan_official.encode_images(img_sd, images, no_imgnorm=opt.no_imgnorm,
                                      weight_norm=opt.precomp_enc_type == "weight_norm")
    cap = scan_official.encode_texts(txt_sd, ids, lengths, word_dim=opt.word_dim, embed_size=opt.embed_size,
                                     num_layers=opt.num_layers, bi_gru=opt.bi_gru, no_txtnorm=opt.no_txtnorm)
    weights = {g: {"weight": state[f"{g}.weight"], "bias": state[f"{g}.bias"]} for g in GATES}
    with torch.no_grad():
        return official.shard_scores(img, cap, lengths, mode=opt.model_mode.removesuffix("_IMRAM"),
                                     steps=opt.iteration_step, smooth=opt.lambda_softmax, raw_norm=opt.raw_feature_norm,
                                     renormalize=not opt.no_IMRAM_norm, weights=weights)


def our_scores(path, images, ids, lengths) -> np.ndarray:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(images, torch.full((images.shape[0],), images.shape[1])))
        return model.score(image, model.encode_texts(Tokens(ids, lengths))).double().numpy()


CASES = {
    "full, K=3 (the default)": dict(),
    "text, K=3, lambda 11 (COCO script)": dict(model_mode="text_IMRAM", lambda_softmax=11.0, data_name="coco_precomp",
                                               num_epochs=20, lr_update=10, learning_rate=5e-4),
    "image, K=1 (F30K script)": dict(model_mode="image_IMRAM", iteration_step=1),
    "full, K=2, renormalised memory": dict(iteration_step=2, no_IMRAM_norm=False),
    "text, K=4, weight_norm, 2-layer uni-GRU": dict(model_mode="text_IMRAM", iteration_step=4,
                                                    precomp_enc_type="weight_norm", num_layers=2, bi_gru=False),
    "image, K=2, l2norm, no text norm": dict(model_mode="image_IMRAM", iteration_step=2, raw_feature_norm="l2norm",
                                             no_txtnorm=True),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_imported_model_scores_like_the_official_evaluation(tmp_path, vocab_path, overrides):
    opt = options(**overrides)
    model = official_weights(opt, seed=len(overrides))
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    out = import_checkpoint("imram", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "imram.safetensors",
                            get_importers())
    images, ids, lengths = random_inputs(seed=len(overrides))
    np.testing.assert_allclose(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


def test_the_converted_recipe_records_the_options(tmp_path, vocab_path):
    opt = options(**CASES["text, K=3, lambda 11 (COCO script)"])
    save_official(tmp_path / "model_best.pth.tar", opt)
    notes = []
    out = import_checkpoint("imram", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "imram.safetensors",
                            get_importers(), note=notes.append)
    loaded = load_checkpoint(out)
    r = loaded.model.recipe
    (match,) = r.match
    cross = match.similarity.spec
    assert (cross.name, cross.steps, cross.lambda_softmax, cross.renormalize) == ("imram.t2i", 3, 11.0, False)
    assert (match.aggregate.spec.name, match.aggregate.spec.pool) == ("imram.steps", "mean")
    assert (r.data.protocol, r.data.test_split, r.data.path) == ("coco-1k-5fold", "testall", "data/coco_precomp")
    assert (r.train.epochs, r.train.lr, r.train.lr_update) == (20, 5e-4, 10)
    assert loaded.meta["epoch"] == "17" and loaded.meta["official_best_rsum"] == "470.5"
    assert any("linear_i2t and gate_i2t are not used by model_mode=text_IMRAM" in n for n in notes)


def test_full_mode_has_one_branch_per_direction(tmp_path, vocab_path):
    save_official(tmp_path / "model_best.pth.tar", options())
    out = import_checkpoint("imram", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "imram.safetensors",
                            get_importers())
    r = load_checkpoint(out).model.recipe
    assert [(m.similarity.spec.name, m.weight) for m in r.match] == [("imram.t2i", 1.0), ("imram.i2t", 1.0)]


def _broken(kind: str, opt: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    model = official_weights(opt)
    if kind == "missing gate":
        del model["module.gate_i2t.bias"]
    elif kind == "wrong gate shape":
        model["module.linear_t2i.weight"] = torch.zeros(EMBED, EMBED)
    elif kind == "unknown submodule":
        model["module.sim_enc.fc.weight"] = torch.zeros(2, 2)
    elif kind == "unknown mode":
        opt = argparse.Namespace(**{**vars(opt), "model_mode": "text_IMRAMM"})
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "iteration_step"})
    elif kind == "a SCAN checkpoint":
        return opt, [{"fc.weight": torch.zeros(EMBED, IMG_DIM)}, {"embed.weight": torch.zeros(16, WORD_DIM)}]
    return opt, model


ERRORS = {
    "missing gate": r"the memory's gate layers: the weights do not match the official layout\n  missing: gate_i2t.bias \(8,\)",
    "wrong gate shape": r"shape of linear_t2i.weight: \(8, 8\), expected \(8, 16\)",
    "unknown submodule": r"unexpected key 'sim_enc.fc.weight'",
    "unknown mode": r"model_mode='text_IMRAMM' is not an IMRAM mode .*\(did you mean 'text_IMRAM'\?\)",
    "missing option": r"the checkpoint's options lack 'iteration_step'",
    "a SCAN checkpoint": r"'model' is one state dict of the whole network, this one holds 2 .*itmkit import scan",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, vocab_path, kind):
    opt, model = _broken(kind, options())
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("imram", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "imram.safetensors",
                          get_importers())
    assert not (tmp_path / "imram.safetensors").exists()


ITMKIT = Path(sys.executable).with_name("itmkit")


def test_the_cli_imports_and_the_result_scores_like_the_official_code(tmp_path, vocab_path):
    opt = options(model_mode="image_IMRAM", iteration_step=2)
    model = official_weights(opt, seed=9)
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    out = tmp_path / "imram.safetensors"
    result = subprocess.run([str(ITMKIT), "import", "imram", str(tmp_path / "model_best.pth.tar"), "--vocab",
                             str(vocab_path), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "linear_t2i and gate_t2i are not used" in result.stdout + result.stderr
    images, ids, lengths = random_inputs(seed=9)
    np.testing.assert_allclose(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, steps", [("full_IMRAM", 3), ("text_IMRAM", 2), ("image_IMRAM", 1)])
def test_itmkit_eval_on_imram_data_saves_the_official_matrix(tmp_path, vocab_path, mode, steps):
    """`itmkit eval --save-sims` of an imported checkpoint on a folder laid out as IMRAM's loader reads it
    ({split}_feat.npy, {split}_caps.txt) equals the official evaluation's sims (images[::5], steps added)."""
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
    from cliutil import invoke

    from itmkit.data import precomp

    opt = options(model_mode=mode, iteration_step=steps)
    model = official_weights(opt, seed=steps)
    save_official(tmp_path / "model_best.pth.tar", opt, model=model)
    out = import_checkpoint("imram", tmp_path / "model_best.pth.tar", vocab_path, tmp_path / "imram.safetensors",
                            get_importers())
    rng = np.random.default_rng(steps)
    feats = rng.random((4, 36, IMG_DIM)).astype(np.float32)
    captions = [" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(20)]
    precomp.write_split(tmp_path / "data", "test", features=feats, captions=captions)
    (tmp_path / "data" / "test_ims.npy").rename(tmp_path / "data" / "test_feat.npy")
    code, _, err = invoke("eval", str(out), "--data", str(tmp_path / "data"), "--save-sims", str(tmp_path / "s.npy"),
                          "--device", "cpu")
    assert code == 0, err
    vocab = Vocabulary.load(vocab_path)
    ids = [vocab.encode(c) for c in captions]
    width = max(map(len, ids))
    tokens = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    expected = official_scores(opt, model, torch.from_numpy(feats), tokens, torch.tensor([len(i) for i in ids]))
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=0, atol=1e-5)
