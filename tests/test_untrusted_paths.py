"""Names and paths from untrusted places never lead outside what the user gave.

A run name is a plain folder name (runs/<name>); split names are names, wherever they come from
(a recipe, a checkpoint); a checkpoint's data path is a hint that --data overrides, and one that
does not exist here is reported rather than searched for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from cliutil import invoke
from itmkit.errors import ItmkitError
from itmkit.runs import default_run_folder, plain_name
from tinydata import train_tiny, write_recipe, write_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("run"), data) / "model_best.safetensors"


def edited_checkpoint(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of checkpoint ``src`` whose recorded recipe has ``old`` replaced by ``new``."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert old in meta["recipe"]
    meta["recipe"] = meta["recipe"].replace(old, new)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "..", "a/b", "a\\b", ""])
def test_a_run_name_that_is_a_path_is_refused_and_nothing_outside_runs_is_touched(name, data, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    victim = tmp_path / "x" / "metrics.jsonl"  # where runs/../../x would put (and first delete) the metrics
    victim.parent.mkdir()
    victim.write_text("someone else's\n")
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    result = invoke("train", str(recipe), "--set", f"recipe.name={json.dumps(name)}", "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "recipe.name = " in result.stderr and ("must be a plain name" in result.stderr or "non-empty" in result.stderr)
    assert victim.read_text() == "someone else's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "tiny.toml", "x"] and not (work / "runs").exists()


def test_the_run_folder_rule_is_one_function():
    assert default_run_folder("vsepp_f30k") == Path("runs") / "vsepp_f30k"
    with pytest.raises(ItmkitError, match=r"recipe.name \(the run folder's name; or pass --out\) = '\.\./x' must be a plain"):
        default_run_folder("../x")
    assert plain_name("test", "data.test_split") == "test"
    with pytest.raises(ItmkitError, match="control character"):
        plain_name("te\nst", "data.test_split")


def test_a_split_name_that_is_a_path_is_refused_before_training(data, tmp_path):
    # A valid split outside the data folder, which data/../other/test would reach.
    write_tiny(tmp_path / "other", {"test": 6})
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    for command in (["train", str(recipe), "--out", str(tmp_path / "run")], ["data", "check", str(data), "--recipe", str(recipe)]):
        result = invoke(*command, "--set", 'data.test_split="../other/test"')
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "data.test_split = '../other/test' must be a plain name, not a path" in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_split_name_from_a_checkpoint_is_a_name(checkpoint, data, tmp_path):
    write_tiny(tmp_path / "other", {"test": 6})
    evil = edited_checkpoint(checkpoint, tmp_path / "evil.safetensors", 'test_split = "test"',
                             f'test_split = "{data}/../{tmp_path.name}/other/test"')
    result = invoke("eval", str(evil), "--data", str(data), "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "must be a plain name, not a path" in " ".join(result.stderr.split())
    assert invoke("eval", str(evil), "--data", str(data), "--split", "test", "--device", "cpu").returncode == 0


def test_a_recorded_data_path_that_is_not_here_asks_for_data(checkpoint, data, tmp_path):
    moved = edited_checkpoint(checkpoint, tmp_path / "moved.safetensors", f'path = "{data}"', 'path = "/nowhere/f30k_precomp"')
    result = invoke("eval", str(moved), "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"{moved} was trained on data.path = '/nowhere/f30k_precomp', which is not a folder or HDF5 file here; pass"
            " the dataset to evaluate on with --data DIR") in " ".join(result.stderr.split())
    assert invoke("eval", str(moved), "--data", str(data), "--device", "cpu").returncode == 0


def test_data_overrides_the_recorded_path(checkpoint, data, tmp_path):
    recorded = invoke("eval", str(checkpoint), "--device", "cpu")
    assert recorded.returncode == 0 and f"(the data.path recorded in {checkpoint}; --data overrides it)" in " ".join(
        recorded.stderr.split())
    assert "scored 6 images x 30 captions" in recorded.stderr
    other = write_tiny(tmp_path / "other", {"test": 4}, seed=5)
    given = invoke("eval", str(checkpoint), "--data", str(other), "--device", "cpu")
    assert given.returncode == 0 and "scored 4 images x 20 captions" in given.stderr
    assert "recorded in" not in given.stderr
    shutil.rmtree(other)
