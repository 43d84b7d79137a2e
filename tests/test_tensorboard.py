"""`itmkit train --tensorboard`: TensorBoard event files holding metrics.jsonl's scalars (issue 16)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cliutil import assert_clean_failure, invoke
from itmkit import train as train_module
from itmkit.recipe import load_recipe
from itmkit.train import TENSORBOARD_DIR, read_metrics, tensorboard_scalars, train
from tinydata import RECIPE, write_tiny

pytest.importorskip("tensorboard")  # the `test` extra installs it; itmkit itself does not need it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tb") / "data")


def _recipe(folder: Path, data: Path, epochs: int = 2) -> Path:
    path = folder / "tiny.toml"
    path.write_text(RECIPE.replace("DATA", str(data)).replace("epochs = 1", f"epochs = {epochs}\nlog_every = 3"))
    return path


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files as TensorBoard reads them (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers at their iterations, as float32 (TensorBoard's scalar precision)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        for tag, value in tensorboard_scalars(record).items():
            expected.setdefault(tag, []).append((record["iteration"], float(np.float32(value))))
    return expected


def test_event_files_hold_the_metrics(tmp_path, data):
    run = tmp_path / "run"
    result = invoke("train", str(_recipe(tmp_path, data)), "--out", str(run), "--tensorboard", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    records = read_metrics(run / "metrics.jsonl")
    scalars = _scalars(run)
    assert scalars == _expected(run)
    epochs = [r for r in records if r.get("split") == "dev"]
    steps = [r for r in records if "split" not in r]
    assert len(epochs) == 2 and len(steps) == 6  # 10 batches an epoch, a step line every 3
    # the tags, spelled out: each epoch's dev metrics and training figures, each logged step's loss
    for key, tag in (("rsum", "dev/rsum"), ("i2t_r1", "dev/i2t_r1"), ("t2i_r1", "dev/t2i_r1"),
                     ("train_loss", "train/loss"), ("lr", "train/lr"), ("captions_per_s", "train/captions_per_s")):
        assert scalars[tag] == [(r["iteration"], float(np.float32(r[key]))) for r in epochs], tag
    assert scalars["step/loss"] == [(r["iteration"], float(np.float32(r["loss"]))) for r in steps]
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1

    # started afresh into the same folder: the earlier run's events go with its metrics
    result = invoke("train", str(_recipe(tmp_path, data, epochs=1)), "--out", str(run), "--tensorboard",
                    "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    assert _scalars(run) == _expected(run) and len(_scalars(run)["dev/rsum"]) == 1


def test_a_stopped_run_keeps_its_events_and_resume_appends_without_duplicates(tmp_path, data, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path, data))
    run = tmp_path / "run"
    real_evaluate, calls = train_module.evaluate, []

    def evaluate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2's dev evaluation: its steps are logged, its checkpoint not written
            raise RuntimeError("killed")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        train(recipe, out_dir=run, tensorboard=True, log=lambda *a: None)
    stopped = _scalars(run)
    assert stopped == _expected(run)  # flushed as written: epoch 1 and epoch 2's three steps
    assert [step for step, _ in stopped["step/loss"]] == [3, 6, 9, 12, 15, 18]
    assert [step for step, _ in stopped["dev/rsum"]] == [10]

    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    train(recipe, out_dir=run, resume=True, tensorboard=True, log=lambda *a: None)
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # appended, not replaced
    resumed = _scalars(run)
    assert resumed == _expected(run)  # epoch 2's steps of the stopped run purged: each step once
    assert [step for step, _ in resumed["step/loss"]] == [3, 6, 9, 12, 15, 18]
    assert [step for step, _ in resumed["dev/rsum"]] == [10, 20]
    assert resumed["step/loss"][:3] == stopped["step/loss"][:3]


def test_train_without_the_flag_writes_no_events(tmp_path, data):
    run = tmp_path / "run"
    train(load_recipe(_recipe(tmp_path, data, epochs=1)), out_dir=run, log=lambda *a: None)
    assert not (run / TENSORBOARD_DIR).exists()


def test_missing_tensorboard_is_one_line_before_training(tmp_path, data, monkeypatch):
    # as if tensorboard were not installed: importing it (or torch's wrapper of it) fails
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    message = assert_clean_failure(invoke("train", str(_recipe(tmp_path, data)), "--out", str(run), "--tensorboard"))
    assert "pip install 'itmkit[tensorboard]'" in message, message
    assert not run.exists()  # nothing started
    with pytest.raises(train_module.ItmkitError, match=r"pip install 'itmkit\[tensorboard\]'"):
        train(load_recipe(_recipe(tmp_path, data)), out_dir=run, tensorboard=True)
    assert not run.exists()
    # without --tensorboard nothing needs it
    train(load_recipe(_recipe(tmp_path, data, epochs=1)), out_dir=run, log=lambda *a: None)
    assert (run / "metrics.jsonl").is_file()


def test_scalar_tags():
    assert tensorboard_scalars({"epoch": 0, "iteration": 50, "loss": 2.5, "lr": 0.1}) == {"step/loss": 2.5,
                                                                                          "step/lr": 0.1}
    record = {"epoch": 1, "iteration": 20, "split": "dev", "train_loss": 3.0, "lr": 0.1, "captions_per_s": 9.5,
              "rsum": 300.0, "i2t_r1": 40.0, "train_terms": {"triplet": 2.0, "caption": 1.0}, "t2i_r1": None}
    assert tensorboard_scalars(record) == {"train/loss": 3.0, "train/lr": 0.1, "train/captions_per_s": 9.5,
                                           "dev/rsum": 300.0, "dev/i2t_r1": 40.0, "train/terms/triplet": 2.0,
                                           "train/terms/caption": 1.0}
