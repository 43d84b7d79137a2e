"""End-to-end training: it learns, it is reproducible, a SIGKILL mid-write loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from itmkit.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors
from itmkit.errors import CheckpointError
from itmkit.evaluation import retrieval_metrics
from itmkit.recipe import load_recipe
from itmkit.train import train

from cliutil import paused_itmkit

ITMKIT = [sys.executable, "-m", "itmkit"]


def chance_rsum(n_images: int, per_image: int = 5) -> float:
    """Expected rSum of random scores: i2t R@K ~ 1-(1-K/Nc)^5, t2i R@K = K/Ni."""
    n_captions = n_images * per_image
    i2t = sum(100 * (1 - np.prod([(n_captions - per_image - j) / (n_captions - j) for j in range(k)])) for k in (1, 5, 10))
    t2i = sum(100 * k / n_images for k in (1, 5, 10))
    return i2t + t2i


def test_training_learns_far_above_chance(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe, ["train.epochs=5"])
    result = train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    chance = chance_rsum(100)
    assert chance == pytest.approx(31.5, abs=0.5)
    assert result.test["rsum"] > 3 * chance, result.test
    # R@1 by chance is about 1% both ways on 100 images (5 of 500 captions; 1 of 100 images)
    assert result.test["i2t_r1"] >= 4.0 and result.test["t2i_r1"] >= 2.5, result.test
    # Run folder: resolved recipe, JSON-lines metrics with one dev line per epoch, best checkpoint.
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x.get("split") == "dev"] == [0, 1, 2, 3, 4]
    assert load_recipe(tmp_path / "run" / "recipe.toml").to_dict() == recipe.to_dict()
    best = load_checkpoint(tmp_path / "run" / "model_best.safetensors")
    assert int(best.meta["epoch"]) == result.best_epoch
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["rsum"] == result.test["rsum"]


def test_same_seed_same_results(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe, ["train.epochs=2"])
    a = train(recipe, out_dir=tmp_path / "a", log=lambda *a: None)
    b = train(recipe, out_dir=tmp_path / "b", log=lambda *a: None)
    assert a.test == b.test
    c = train(load_recipe(tiny_recipe, ["train.epochs=2", "train.seed=1"]), out_dir=tmp_path / "c", log=lambda *a: None)
    assert c.test != a.test


def _run(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(ITMKIT + args, capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs)


def test_sigkill_during_checkpoint_write_then_resume_matches(tiny_recipe, tmp_path):
    args = ["train", str(tiny_recipe), "--device", "cpu"]
    full = _run(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    expected = json.loads((tmp_path / "full" / "test_metrics.json").read_text())

    # Pause inside the second write of last.safetensors (epoch 2), after the temp file is
    # written and before the rename, then SIGKILL the process there.
    marker = tmp_path / "paused"
    run_dir = tmp_path / "killed"
    proc = paused_itmkit(args + ["--out", str(run_dir)], marker, skip=1)
    assert list(run_dir.glob(".last.safetensors.*.tmp")), "the interrupted temp file should exist"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    survivor = load_checkpoint(run_dir / "last.safetensors")  # the epoch-1 file, intact
    assert survivor.meta["epoch"] == "0"
    assert "optimizer.0.exp_avg" in survivor.trainer

    resumed = _run(args + ["--out", str(run_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert json.loads((run_dir / "test_metrics.json").read_text()) == expected
    assert not list(run_dir.glob(".*.tmp"))
    dev_epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x).get("split") == "dev"]
    assert dev_epochs == [0, 1, 2]


def test_eval_of_an_ensemble_is_the_mean_of_its_members(tiny_recipe, tmp_path):
    a = train(load_recipe(tiny_recipe, ["train.epochs=1"]), out_dir=tmp_path / "a", log=lambda *a: None)
    b = train(load_recipe(tiny_recipe, ["train.epochs=1", "train.seed=3"]), out_dir=tmp_path / "b", log=lambda *a: None)
    ckpt_a, ckpt_b = a.out_dir / "model_best.safetensors", b.out_dir / "model_best.safetensors"
    sims = {}
    for name, ckpts in {"a": [ckpt_a], "b": [ckpt_b], "ab": [ckpt_a, ckpt_b]}.items():
        out = tmp_path / f"{name}.npy"
        r = _run(["eval", *map(str, ckpts), "--save-sims", str(out), "--json", "--device", "cpu"])
        assert r.returncode == 0, r.stderr
        metrics = json.loads(r.stdout)
        sims[name] = np.load(out)
        assert metrics == retrieval_metrics(sims[name])
        assert "pairs/s" in r.stderr
    assert sims["a"].shape == (100, 500)
    # Each eval is its own process: on a loaded machine a GEMM may split its sums differently from
    # one process to the next (seen: 1e-5 apart), so bit equality across processes is not promised.
    np.testing.assert_allclose(sims["ab"], (sims["a"].astype(np.float64) + sims["b"]) / 2, rtol=0, atol=2e-5)
    assert not np.allclose(sims["a"], sims["b"])
    # eval of one checkpoint reproduces the training run's own test figures
    assert json.loads(_run(["eval", str(ckpt_a), "--json"]).stdout)["rsum"] == a.test["rsum"]


def test_resuming_an_optimizer_of_other_trainable_parameters_says_so():
    # e.g. a run saved before a stage froze one of its parameters
    two = torch.optim.Adam([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))])
    sum(p.sum() for g in two.param_groups for p in g["params"]).backward()
    two.step()
    tensors, blob = optimizer_to_tensors(two)
    one = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(CheckpointError, match=r"runs/x/last.safetensors: its optimizer state holds \[2\] trainable"
                                              r" parameters per group, this model has \[1\]"):
        optimizer_from_tensors(one, tensors, blob, "runs/x/last.safetensors")
    optimizer_from_tensors(two, tensors, blob)  # the same parameters restore


def _untimed(run_dir) -> list[dict]:
    """The run's metric lines without their captions/s (a timing)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "captions_per_s"} for line in lines]


def test_killed_mid_epoch_resumes_at_the_last_saved_step(tiny_recipe, tmp_path):
    # 1500 captions / 32 = 46 steps an epoch; --save-every 5 writes last.safetensors at steps 5, 10, ..., 45,
    # after epoch 1 (46), then 50, 55: the run is killed inside the write at step 60, within epoch 2.
    args = ["train", str(tiny_recipe), "--set", "train.epochs=3", "--set", "train.log_every=4"]
    plain = _run(args + ["--out", str(tmp_path / "plain")])
    saving = _run(args + ["--out", str(tmp_path / "saving"), "--save-every", "5"])
    assert plain.returncode == 0 and saving.returncode == 0, plain.stderr + saving.stderr
    expected = json.loads((tmp_path / "plain" / "test_metrics.json").read_text())
    assert json.loads((tmp_path / "saving" / "test_metrics.json").read_text()) == expected  # saving changes nothing

    marker, run = tmp_path / "paused", tmp_path / "killed"
    proc = paused_itmkit(args + ["--out", str(run), "--save-every", "5"], marker, skip=12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(run / "last.safetensors")
    assert json.loads(saved.meta["partial"])["iteration"] == 55 and saved.meta["epoch"] == "0"
    assert max(line["iteration"] for line in _untimed(run)) > 55  # lines past the saved step, to be dropped

    resumed = _run(args + ["--out", str(run), "--save-every", "5", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "at batch 9 of epoch 2" in resumed.stderr
    assert json.loads((run / "test_metrics.json").read_text()) == expected
    assert _untimed(run) == _untimed(tmp_path / "plain")
