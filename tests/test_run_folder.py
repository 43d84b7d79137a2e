"""Run folders and the data cache are owned: one run per folder, leftovers of dead writers only removed.

A second `itmkit train` into a busy folder stops at once naming the holder's PID; a killed run's
lock never blocks; temporaries of live writers survive a start-up cleanup; a killed generation of
the built-in data leaves nothing forever; a torn last line of metrics.jsonl does not break --resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cliutil import assert_clean_failure, flat, invoke
from itmkit import datasets
from itmkit.errors import DataError, ItmkitError
from itmkit.recipe import load_recipe
from itmkit.runs import LOCK_NAME, RunFolderBusy, own_run_folder, remove_dead_temp_dirs, remove_stale_temporaries
from itmkit.train import _keep_metrics_before, read_metrics, train
from tinydata import write_recipe, write_tiny

ITMKIT = [sys.executable, "-m", "itmkit"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_into_a_busy_folder_names_the_holder(data, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    # The first run pauses inside its first write of last.safetensors (temp file written, not renamed).
    env = {**os.environ, "ITMKIT_TEST_PAUSE_BEFORE_RENAME": str(marker), "ITMKIT_TEST_PAUSE_FILE": "last"}
    first = subprocess.Popen(ITMKIT + ["train", str(recipe), "--out", str(run), "--device", "cpu"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the first run never reached its checkpoint write"
        [its_temp] = run.glob(".last.safetensors.*.tmp")
        second = invoke("train", str(recipe), "--out", str(run), "--device", "cpu")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        message = " ".join(second.stderr.split())
        assert f"run folder {run} is in use by another itmkit train (PID {first.pid}, from {run / LOCK_NAME})" in message
        assert its_temp.exists()  # the second run touched nothing of the first's
        assert (run / "metrics.jsonl").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # A killed holder's lock is no lock: the next run starts, and clears the dead writer's temporary.
    third = invoke("train", str(recipe), "--out", str(run), "--device", "cpu")
    assert third.returncode == 0, third.stderr
    assert not its_temp.exists() and (run / "model_best.safetensors").exists()


def test_the_lock_holds_within_one_process_and_is_released_after(tmp_path):
    with own_run_folder(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderBusy, match=rf"in use by another itmkit train \(PID {os.getpid()}"):
            with own_run_folder(tmp_path / "run"):
                pass
    with own_run_folder(tmp_path / "run"):  # released
        pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # no PID left to mislead a reader


def test_only_dead_writers_temporaries_are_removed(tmp_path, live_pid, dead_pid):
    names = {
        "dead writer": f".metrics.jsonl.{dead_pid}.0123abcd.tmp",
        "live writer": f".recipe.toml.{live_pid}.0123abcd.tmp",
    }
    # Not of the form .NAME.PID.HEX.tmp (eight hex digits) the atomic writers give: the user's, kept.
    users = [".notes.tmp", ".a.b.tmp", ".last.safetensors.k2j4h1.tmp", f".draft.{dead_pid}.tmp",
             f".x.{dead_pid}.0123ABCD.tmp", f".x.{dead_pid}.0123abcd9.tmp", f".{dead_pid}.0123abcd.tmp"]
    for name in [*names.values(), *users]:
        (tmp_path / name).write_text("partial")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [names["dead writer"]]
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted([names["live writer"], *users])


def test_training_into_a_folder_of_the_users_files_is_refused_and_touches_nothing(data, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    mine = tmp_path / "notes"
    mine.mkdir()
    files = {"metrics.jsonl": '{"mine": 1}\n', ".notes.tmp": "draft", ".a.b.tmp": "draft", "recipe.toml": "x = 1\n"}
    for name, text in files.items():
        (mine / name).write_text(text)
    message = assert_clean_failure(invoke("train", str(recipe), "--out", str(mine), "--device", "cpu"))
    assert f"--out {mine} is a folder of other files, not an itmkit run folder (it holds .a.b.tmp, .notes.tmp," in message
    assert {p.name: p.read_text() for p in mine.iterdir()} == files  # no lock file, nothing replaced


def test_rerunning_into_a_run_folder_says_what_it_replaces(data, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    run = tmp_path / "run"
    assert invoke("train", str(recipe), "--out", str(run), "--device", "cpu").returncode == 0
    (run / ".notes.tmp").write_text("mine")
    again = invoke("train", str(recipe), "--out", str(run), "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert (f"{run} holds an earlier run (last.safetensors, model_best.safetensors, metrics.jsonl, test_metrics.json):"
            " starting afresh replaces its checkpoints and metrics; --resume continues that run instead") in flat(again.stderr)
    assert (run / ".notes.tmp").read_text() == "mine"
    # A folder holding only a checkpoint itmkit wrote (its lock file deleted) is still a run folder.
    for path in run.iterdir():
        if path.name != "last.safetensors":
            path.unlink()
    assert invoke("train", str(recipe), "--out", str(run), "--device", "cpu").returncode == 0


def test_resume_refuses_changed_settings_and_keeps_the_runs_recipe(data, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    run = tmp_path / "run"
    args = ["train", str(recipe), "--out", str(run), "--device", "cpu"]
    assert invoke(*args, "--set", "train.epochs=2").returncode == 0
    started = (run / "recipe.toml").read_text()
    last = (run / "last.safetensors").read_bytes()
    changed = invoke(*args, "--resume", "--set", "train.epochs=3", "--set", "train.lr=0.5", "--set", "loss.margin=5.0")
    message = assert_clean_failure(changed)
    assert "start a new run (another --out) to change these" in message
    listed = [line.strip() for line in changed.stderr.splitlines() if line.strip().startswith("- ")]
    assert listed == ["- loss.margin: 0.2 -> 5.0", "- train.lr: 0.0002 -> 0.5"]  # epochs may change: not listed
    assert (run / "recipe.toml").read_text() == started and (run / "last.safetensors").read_bytes() == last
    # A dataset that moved (here: copied elsewhere) may be resumed on, and the run extended.
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    extended = invoke(*args, "--resume", "--set", "train.epochs=3", "--data", str(moved))
    assert extended.returncode == 0, extended.stderr
    assert "resuming" in extended.stderr
    resumed = load_recipe(run / "recipe.toml")
    assert resumed.train.epochs == 3 and resumed.data.path == str(moved)


def _fake_generator(calls: list, gate: threading.Event | None = None):
    def write_shapes(folder, seed, progress=None):
        calls.append(folder)
        (Path(folder) / "part.npy").write_bytes(b"x" * 100)
        if gate is not None:
            assert gate.wait(30)
        (Path(folder) / "shapes.json").write_text("{}")
    return write_shapes


def test_dead_generations_are_removed_and_live_ones_kept(tmp_path, monkeypatch, live_pid, dead_pid):
    monkeypatch.setenv("ITMKIT_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(datasets, "write_shapes", _fake_generator(calls))
    dead, live = tmp_path / f".shapes-{dead_pid}-abc", tmp_path / f".shapes-{live_pid}-abc"
    legacy_old, legacy_new = tmp_path / ".shapes-old1234", tmp_path / ".shapes-new1234"  # before names held a PID
    for folder in (dead, live, legacy_old, legacy_new):
        folder.mkdir()
        (folder / "train_ims.npy").write_bytes(b"x" * 1000)
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    folder = datasets.resolve_data_dir("shapes")
    assert (folder / "shapes.json").exists() and len(calls) == 1
    assert Path(calls[0]).name.startswith(f".shapes-{os.getpid()}-")  # its temporary said whose it was
    assert sorted(p.name for p in tmp_path.glob(".shapes-*")) == sorted([live.name, legacy_new.name])
    # With the dataset in place, a later run still clears what a killed generation left.
    dead.mkdir()
    assert datasets.resolve_data_dir("shapes") == folder and not dead.exists() and live.exists()
    assert len(calls) == 1


def test_two_processes_generating_at_once_do_not_undo_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("ITMKIT_HOME", str(tmp_path))
    calls: list = []
    gate = threading.Event()
    monkeypatch.setattr(datasets, "write_shapes", _fake_generator(calls, gate))
    results, logs = [], []
    first = threading.Thread(target=lambda: results.append(datasets.resolve_data_dir("shapes")))
    first.start()
    while not calls:
        time.sleep(0.01)
    # flock is per open file, so a second caller in this process waits exactly as another process would.
    second = threading.Thread(target=lambda: results.append(datasets.resolve_data_dir("shapes", log=logs.append)))
    second.start()
    deadline = time.time() + 10
    while not logs and time.time() < deadline:
        time.sleep(0.01)
    assert logs and "waiting for another process generating the built-in dataset" in logs[0]
    assert Path(calls[0]).exists()  # the waiting one removed nothing
    gate.set()
    first.join(30)
    second.join(30)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "shapes.json").exists() and not list(tmp_path.glob(".shapes-*"))


def test_remove_dead_temp_dirs_ignores_plain_files(tmp_path, dead_pid):
    (tmp_path / f".shapes-{dead_pid}-file").write_text("not a folder")
    assert remove_dead_temp_dirs(tmp_path, "shapes") == []


def _metrics(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    return path


def test_a_torn_last_metrics_line_is_dropped_and_only_the_last(tmp_path):
    lines = [json.dumps({"epoch": e, "split": "dev", "rsum": 10.0 * e}) for e in range(3)]
    torn = _metrics(tmp_path, "\n".join(lines) + '\n{"epoch": 3, "iter')
    assert [r["epoch"] for r in read_metrics(torn)] == [0, 1, 2]
    _keep_metrics_before(torn, 2, None)
    assert [json.loads(x)["epoch"] for x in torn.read_text().splitlines()] == [0, 1]
    middle = _metrics(tmp_path, lines[0] + '\n{"epoch": 1, "sp\n' + lines[2] + "\n")
    with pytest.raises(DataError, match=rf"{middle}, line 2: not a metrics record .*only a torn last line is dropped"):
        read_metrics(middle)
    with pytest.raises(DataError, match="line 1: not a metrics record \\(a JSON list, not an object\\)"):
        read_metrics(_metrics(tmp_path, "[1, 2]\n" + lines[0] + "\n"))


def test_resume_after_a_torn_metrics_line(data, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.toml", data), ["train.epochs=2"])
    run = tmp_path / "run"
    train(load_recipe(tmp_path / "tiny.toml"), out_dir=run, log=lambda *a: None)  # epoch 1 of 2 done
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "iteration": 11, "lo')  # killed mid-write in epoch 2
    result = train(recipe, out_dir=run, resume=True, log=lambda *a: None)
    dev = [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "dev"]
    assert dev == [0, 1] and result.best_epoch in (0, 1)


def test_a_run_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ItmkitError, match=rf"cannot use {tmp_path / 'file'} as a run folder: File exists"):
        with own_run_folder(tmp_path / "file"):
            pass
