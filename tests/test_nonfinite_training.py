"""Non-finite numbers stop the work with a message instead of poisoning results silently.

Training stops on the first NaN or inf loss, naming the epoch, the batch and its images, before
anything of that epoch is saved; every evaluation refuses a similarity matrix holding NaN or inf,
naming the images or captions; metrics files stay strict JSON.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from cliutil import invoke
from itmkit.build import build_model
from itmkit.data.split import Split
from itmkit.data.vocab import Vocabulary
from itmkit.datasets import data_ports
from itmkit.evaluate import NonFiniteScores, check_finite, evaluate
from itmkit.recipe import load_recipe
from itmkit.train import TrainingStopped, _nonfinite_parameter, read_metrics, strict_json, train
from tinydata import captions, train_tiny, write_recipe, write_tiny


def strict_loads(text: str):
    """json.loads that refuses the NaN / Infinity tokens, as strict JSON readers do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def _overflowing(data, tmp_path):
    """The dataset with train features finite but so large that the model's norms overflow to inf."""
    bad = tmp_path / "overflow"
    shutil.copytree(data, bad)
    features = np.load(bad / "train_ims.npy")
    features[:] = 3e38
    np.save(bad / "train_ims.npy", features)
    return bad


def test_a_nonfinite_loss_stops_training_before_anything_is_saved(data, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", _overflowing(data, tmp_path))
    run = tmp_path / "run"
    result = invoke("train", str(recipe), "--out", str(run), "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "training stopped at epoch 1, batch 1 of 10: the loss is nan (images [" in message
    assert "of split 'train'" in message and f"itmkit data check {tmp_path / 'overflow'}" in message
    assert not list(run.glob("*.safetensors")) and not (run / "test_metrics.json").exists()


def test_a_nonfinite_loss_leaves_the_last_good_epoch_untouched(data, tmp_path):
    run, ours = tmp_path / "run", tmp_path / "data"
    shutil.copytree(data, ours)
    good = load_recipe(write_recipe(tmp_path / "tiny.toml", ours))
    train(good, out_dir=run, log=lambda *a: None)
    before = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    assert set(before) == {"model_best.safetensors", "last.safetensors"}
    # The second epoch reads features that overflow (rewritten in place: --resume keeps the run's data.path):
    # it stops, and the first epoch's files stay as they were.
    shutil.copyfile(_overflowing(data, tmp_path) / "train_ims.npy", ours / "train_ims.npy")
    poisoned = load_recipe(tmp_path / "tiny.toml", ["train.epochs=2"])
    with pytest.raises(TrainingStopped, match=r"at epoch 2, batch 1 of 10: the loss is nan"):
        train(poisoned, out_dir=run, resume=True, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == before
    assert all(r["epoch"] == 0 for r in read_metrics(run / "metrics.jsonl"))


def test_a_nonfinite_weight_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert _nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[1] = math.inf
    assert _nonfinite_parameter(model) == "1.bias"


def _split(n: int, features: np.ndarray) -> Split:
    return Split(name="test", features=features, captions=captions(n, np.random.default_rng(1)), source="memory-test")


def test_evaluation_refuses_a_nan_image_and_names_it(data, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.toml", data))
    features = np.random.default_rng(0).standard_normal((6, 3, 8)).astype(np.float32)
    split = _split(6, features)
    vocab = Vocabulary.build(split.captions, threshold=1)
    model = build_model(recipe, data_ports(split, vocab), seed=0)
    assert set(evaluate(model, vocab, split)) >= {"rsum"}  # finite: scored
    features[4, 1, 2] = np.nan  # one NaN in one test image
    with pytest.raises(NonFiniteScores, match=r"split 'test' of memory-test: 30 similarity score\(s\) are NaN or inf,"
                                              r" for image\(s\) 4 against every caption; no metrics computed"):
        evaluate(model, vocab, _split(6, features))


def test_the_message_names_captions_and_single_pairs():
    split = _split(3, np.zeros((3, 1, 2), np.float32))
    sims = np.zeros((3, 15), np.float32)
    sims[:, 7] = np.inf
    with pytest.raises(NonFiniteScores, match=r"3 similarity score\(s\) are NaN or inf, for caption\(s\) 7 against every"):
        check_finite(sims, split)
    sims[:, 7] = 0
    sims[1, 2] = np.nan
    with pytest.raises(NonFiniteScores, match=r"1 similarity score\(s\) are NaN or inf, for image\(s\) 1 and caption\(s\) 2;"):
        check_finite(sims, split)
    many = np.zeros((8, 40), np.float32)
    many[:, :] = np.nan
    with pytest.raises(NonFiniteScores, match=r"image\(s\) 0, 1, 2, 3, 4, ... \(8 in all\) against every caption"):
        check_finite(many, _split(8, np.zeros((8, 1, 2), np.float32)))


def test_eval_refuses_nan_test_features_before_scoring_and_saves_no_matrix(data, tmp_path):
    run = train_tiny(tmp_path, data)
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    features = np.load(bad / "test_ims.npy")
    features[3, 0, 0] = np.nan
    np.save(bad / "test_ims.npy", features)
    sims = tmp_path / "sims.npy"
    result = invoke("eval", str(run / "model_best.safetensors"), "--data", str(bad), "--save-sims", str(sims))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "test_ims.npy has NaN or inf values in 1 image(s) (the first is image 3)" in " ".join(result.stderr.split())
    assert not sims.exists()


def test_metrics_files_are_strict_json(data, tmp_path):
    run = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "tiny.toml", data), ["train.log_every=1"])
    train(recipe, out_dir=run, log=lambda *a: None)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 11 and all(isinstance(strict_loads(line), dict) for line in lines)
    strict_loads((run / "test_metrics.json").read_text())
    # A non-finite value (the guards keep them out) is written as null, never as a bare NaN token.
    assert strict_loads(strict_json({"loss": math.nan, "lr": math.inf, "epoch": 0})) == {"loss": None, "lr": None, "epoch": 0}


def test_a_finite_loss_with_a_nonfinite_gradient_stops_at_that_batch(data, tmp_path, monkeypatch):
    # A backward through sqrt(0) (l2norm of a zero row, before ops.l2norm clamped it) gives a finite
    # loss and a NaN gradient: the step would turn every weight to NaN, found only one batch later.
    import itmkit.core_stages

    def unclamped_l2norm(x, dim=-1, eps=1e-8):
        return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)

    monkeypatch.setattr(itmkit.core_stages, "l2norm", unclamped_l2norm)
    padded = tmp_path / "padded"
    shutil.copytree(data, padded)
    features = np.load(padded / "train_ims.npy")
    counts = np.full(len(features), features.shape[1])
    counts[::2] -= 1  # every other image's last region is padding (a batch is cut to its longest image)
    features[::2, -1] = 0
    np.save(padded / "train_ims.npy", features)
    np.save(padded / "train_region_counts.npy", counts)
    with pytest.raises(TrainingStopped, match=r"epoch 1, batch 1 of \d+: the gradient norm is nan \(loss "):
        train(load_recipe(write_recipe(tmp_path / "tiny.toml", padded)), out_dir=tmp_path / "run", log=lambda *a: None)
    assert not list((tmp_path / "run").glob("*.safetensors"))
