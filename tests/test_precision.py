"""Mixed precision (--precision bf16 | fp16): scores close to float32's, the same R@K, float32 where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import load_checkpoint
from itmkit.data.shapes import write_shapes
from itmkit.datasets import open_named_split
from itmkit.evaluate import similarity_matrix
from itmkit.evaluation import protocol_metrics
from itmkit.ops import float32, l2norm
from itmkit.precision import autocast, check_precision
from itmkit.recipe import load_recipe, parse_recipe
from itmkit.train import train
from itmkit.types import Regions, Tokens

from conftest import TINY_RECIPE

# SCAN t-i on the tiny data: cross attention, LogSumExp, every sensitive step of a scoring model.
SCAN_TINY = TINY_RECIPE.replace(
    'pool = { stage = "core.mean" }\n', "").replace('pool = { stage = "core.last" }\n', "").replace(
    '[[match]]\nsimilarity = { stage = "core.cosine" }',
    '[[match]]\ncross = { stage = "scan.t2i", lambda_softmax = 9.0 }\nsimilarity = { stage = "core.cosine" }\n'
    'aggregate = { stage = "scan.lse", lambda_lse = 6.0 }')
# bf16 keeps 8 bits of mantissa: a product's relative error is about 2^-8 = 0.4%; the scores are cosines
# (here from -0.2 to 0.6), and the largest difference seen was 0.014 (mean 0.0004).
SCORE_TOLERANCE = 0.02
RK_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def trained_scan(tmp_path_factory):
    """SCAN t-i trained 2 epochs on 300 built-in images, with the built-in test split's 1,000 images x 5,000
    captions to score: with fewer, one query changing its rank moves i2t R@K by more than the tolerance."""
    folder = tmp_path_factory.mktemp("scan-tiny")
    write_shapes(folder / "data", seed=0, sizes={"train": 300, "dev": 100, "test": 1000})
    recipe_path = folder / "scan.toml"
    recipe_path.write_text(SCAN_TINY.replace("DATA", str(folder / "data")))
    train(load_recipe(recipe_path, ["train.epochs=2"]), out_dir=folder / "run", log=lambda *a: None)
    best = folder / "run" / "model_best.safetensors"
    return load_checkpoint(best), folder / "data", best


def test_float32_is_a_no_op_on_float32_and_casts_the_rest():
    x = torch.rand(3, 4)
    assert float32(x) is x
    assert float32(x.bfloat16()).dtype == torch.float32 and float32(x.half()).dtype == torch.float32
    assert float32(x.double()).dtype == torch.float64  # never lowered: the references run in float64
    assert float32(torch.arange(3)).dtype == torch.int64


def test_the_sensitive_steps_run_in_float32_under_autocast():
    recipe = parse_recipe(SCAN_TINY.replace("DATA", "shapes"))
    model = build_model(recipe, DataPorts(16, 30, 5), seed=0)
    regions = Regions(torch.rand(4, 5, 16), torch.full((4,), 5))
    tokens = Tokens(torch.randint(1, 30, (4, 6)), torch.tensor([6, 4, 5, 3]))
    with autocast("cpu", "bf16"):
        assert torch.nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.bfloat16  # autocast is on
        assert l2norm(torch.rand(2, 4).bfloat16()).dtype == torch.float32
        step = model.training_step(regions, tokens, torch.arange(4), epoch=1)
    assert step.scores.dtype == torch.float32 and step.loss.dtype == torch.float32
    assert torch.isfinite(step.loss)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN: CPU bf16 unavailable")
def test_bf16_scoring_agrees_with_float32(trained_scan):
    loaded, data, _ = trained_scan
    split = open_named_split(data, "test")
    full, _ = similarity_matrix(loaded.model, loaded.vocab, split)
    with autocast("cpu", "bf16"):
        half, _ = similarity_matrix(loaded.model, loaded.vocab, split)
    assert half.dtype == np.float32
    difference = np.abs(half - full).max()
    assert 0 < difference <= SCORE_TOLERANCE, difference  # not zero: bf16 really ran
    a = protocol_metrics(full, "f30k-1k", split.caption_images)
    b = protocol_metrics(half, "f30k-1k", split.caption_images)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert abs(a[key] - b[key]) <= RK_TOLERANCE, (key, a[key], b[key])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_in_mixed_precision_learns(precision, tiny_recipe, tmp_path):
    result = train(load_recipe(tiny_recipe, ["train.epochs=2"]), out_dir=tmp_path / "run", precision=precision,
                   log=lambda *a: None)
    assert result.test["rsum"] > 60, result.test  # chance is about 31.5 on 100 images
    saved = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert saved.meta["precision"] == precision
    assert ("scaler" in saved.meta) == (precision == "fp16")
    assert json.loads(saved.meta["scaler"])["scale"] > 0 if precision == "fp16" else True


def test_cli_precision_option_and_its_errors(trained_scan, tiny_data):
    checkpoint = str(trained_scan[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "itmkit", "eval", checkpoint, "--data", str(tiny_data), "--precision",
                           "bf16", "--json"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rsum"] > 0
    bad = subprocess.run([sys.executable, "-m", "itmkit", "eval", checkpoint, "--precision", "fp8"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "choose one of fp32, bf16, fp16" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_check_precision_names_the_choices():
    with pytest.raises(Exception, match="choose one of fp32, bf16, fp16"):
        check_precision("half", torch.device("cpu"))
