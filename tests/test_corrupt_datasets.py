"""Corrupted datasets, each through `itmkit train` and `itmkit data check`: exit 1 and clear message
lines naming the file, no traceback, and nothing trained (no metrics, no checkpoint) before the refusal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cliutil import invoke
from itmkit.data import hdf5
from tinydata import write_recipe, write_tiny


def _set_features(folder: Path, split: str, change) -> None:
    features = np.load(folder / f"{split}_ims.npy")
    np.save(folder / f"{split}_ims.npy", change(features))


def _to_hdf5(folder: Path, edit) -> Path:
    """The dataset in the HDF5 layout (precomp files removed), then ``edit(h5py.File)``."""
    hdf5.convert_precomp_to_hdf5(folder, folder / "data.h5")
    for path in folder.glob("*_*.*"):
        path.unlink()
    with h5py.File(folder / "data.h5", "a") as f:
        edit(f)
    return folder


def _nan(features):
    features[2, 1, 3] = np.nan
    return features


def _remove(*names):
    return lambda d: [(d / n).unlink() for n in names]


def _boxes(split: str, change):
    """Valid xyxy boxes and image sizes for `split`, then ``change(boxes, sizes)``."""
    def corrupt(d: Path) -> None:
        n, r = np.load(d / f"{split}_ims.npy", mmap_mode="r").shape[:2]
        boxes = np.tile(np.array([10, 20, 50, 60], np.float32), (n, r, 1))
        sizes = np.full((n, 2), 100, np.int64)
        change(boxes, sizes)
        np.save(d / f"{split}_boxes.npy", boxes)
        np.save(d / f"{split}_sizes.npy", sizes)
    return corrupt


def _set(array, index, value):
    array[index] = value


def _replace_in_hdf5(name: str, make):
    def edit(f) -> None:
        del f[name]
        make(f, name)
    return lambda d: _to_hdf5(d, edit)


# name -> (corruption, what stderr must say, extra --set for train, whether a plain `data check` sees it too)
CASES = {
    "missing test split": (_remove("test_ims.npy", "test_caps.txt"), "has no test split 'test' (data.test_split)", [], True),
    "missing captions file": (_remove("dev_caps.txt"), "dev_caps.txt does not exist", [], True),
    "truncated npy": (lambda d: (d / "train_ims.npy").write_bytes((d / "train_ims.npy").read_bytes()[:200]),
                      "train_ims.npy is not a readable .npy array", [], True),
    "garbage npy": (lambda d: (d / "test_ims.npy").write_bytes(b"\x00garbage" * 40), "test_ims.npy is not a readable .npy array",
                    [], True),
    "integer features": (lambda d: _set_features(d, "dev", lambda f: f.astype(np.int64)),
                         "dev_ims.npy should hold floats (float32) but has dtype int64", [], True),
    "4-D features": (lambda d: _set_features(d, "test", lambda f: f[..., None]), "test_ims.npy should hold a", [], True),
    "hdf5 without test group": (lambda d: _to_hdf5(d, lambda f: f.__delitem__("test")), "has no test split 'test'", [], True),
    "hdf5 without test features": (lambda d: _to_hdf5(d, lambda f: f["test"].__delitem__("features")),
                                   "has no test split 'test'", [], True),
    "hdf5 without dev captions": (lambda d: _to_hdf5(d, lambda f: f["dev"].__delitem__("captions")),
                                  "data.h5:/dev/captions does not exist", [], True),
    "test features of another width": (lambda d: write_tiny(d, {"test": 6}, width=12),
                                       "Split 'test' has 12 feature dimensions", [], True),
    "empty dataset": (lambda d: [p.unlink() for p in d.iterdir()], "has no train split 'train'", [], True),
    "empty train split": (lambda d: write_tiny(d, {"train": 0}), "the train split 'train' is empty", [], True),
    "NaN in a train feature": (lambda d: _set_features(d, "train", _nan),
                               "train_ims.npy has NaN or inf values in 1 image(s) (the first is image 2)", [], True),
    "inf in a test feature": (lambda d: _set_features(d, "test", lambda f: np.where(np.arange(6)[:, None, None] == 4, np.inf, f)),
                              "test_ims.npy has NaN or inf values in 1 image(s) (the first is image 4)", [], True),
    "inf in a train box": (_boxes("train", lambda b, s: _set(b, (3, 1, 2), np.inf)),
                           "train_boxes.npy has NaN or inf values in 1 image(s) (the first is image 3)", [], True),
    "negative image size": (_boxes("dev", lambda b, s: _set(s, 1, -5)),
                            "dev_sizes.npy should hold each image's width and height in pixels, finite and positive, "
                            "but 1 image(s) (the first is image 1) do not: image 1 has (-5, -5)", [], True),
    "zero image size": (_boxes("test", lambda b, s: _set(s, (2, 0), 0)), "image 2 has (0, 100)", [], True),
    "zero regions per image": (lambda d: _set_features(d, "test", lambda f: f[:, :0]),
                               "0 regions per image; every image needs at least one region row", [], True),
    "zero-wide features": (lambda d: _set_features(d, "dev", lambda f: f[..., :0]),
                           "0-wide features; each region needs a feature vector", [], True),
    "float64 beyond float32": (lambda d: _set_features(d, "train", lambda f: np.where(
        np.arange(len(f))[:, None, None] == 5, 1e39, f.astype(np.float64))),
        "train_ims.npy has NaN or inf values in 1 image(s) (the first is image 5); its float64 values are finite "
        "but beyond float32's range", [], True),
    "huge caption image index": (lambda d: (d / "test_cap_images.txt").write_text(
        "9999999999999999999999\n" + "0\n" * 29), "test_cap_images.txt, line 1: 9999999999999999999999 is out of range",
        [], True),
    "boolean region counts": (lambda d: np.save(d / "dev_region_counts.npy", np.ones(6, bool)),
                              "dev_region_counts.npy should hold integer region counts (int64) but has dtype bool",
                              [], True),
    "folder named like features": (lambda d: [_remove("test_ims.npy")(d), (d / "test_ims.npy").mkdir()],
                                   "test_ims.npy is a folder; expected a regular file", [], True),
    "FIFO named like captions": (lambda d: [_remove("test_caps.txt")(d), os.mkfifo(d / "test_caps.txt")],
                                 "test_caps.txt is a FIFO (named pipe); expected a regular file", [], True),
    "hdf5 version not a number": (lambda d: _to_hdf5(d, lambda f: f.attrs.__setitem__("version", "one")),
                                  "root attribute version should be a whole number", [], True),
    "hdf5 features a group": (_replace_in_hdf5("test/features", lambda f, n: f.create_group(n)),
                              "data.h5:/test/features is an HDF5 group; expected a dataset", [], True),
    "hdf5 features an external link": (_replace_in_hdf5("test/features", lambda f, n: f.__setitem__(
        n, h5py.ExternalLink("missing.h5", "/x"))), "data.h5:/test/features is an external link to missing.h5:/x",
        [], True),
    "hdf5 captions not UTF-8": (_replace_in_hdf5("dev/captions", lambda f, n: f.create_dataset(
        n, data=np.array([b"\xff\xfe"] * 30, dtype=object), dtype=h5py.string_dtype("utf-8"))),
        "data.h5:/dev/captions: caption 0 is not UTF-8 text", [], True),
    "train smaller than one batch": (lambda d: write_tiny(d, {"train": 1}),
                                     "has 5 captions, fewer than one batch of train.batch_size = 8", [], False),
    "coco protocol on a small test split": (lambda d: None, "protocol coco-5k needs the 5000-image COCO test split",
                                            ["data.protocol=coco-5k"], False),
    "coco 5-fold on a small test split": (lambda d: None, "protocol coco-1k-5fold needs the 5000-image COCO test split",
                                          ["data.protocol=coco-1k-5fold"], False),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("good"))


def test_the_good_dataset_trains_and_checks(good, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", good)
    assert invoke("data", "check", str(good), "--recipe", str(recipe)).returncode == 0
    result = invoke("train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "model_best.safetensors").exists()


@pytest.mark.parametrize("case", CASES)
def test_a_corrupt_dataset_is_refused_before_any_epoch(case, good, tmp_path):
    corrupt, expected, overrides, plain_check_sees_it = CASES[case]
    data = tmp_path / "data"
    shutil.copytree(good, data)
    corrupt(data)
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    sets = [arg for o in overrides for arg in ("--set", o)]
    run = tmp_path / "run"

    trained = invoke("train", str(recipe), "--out", str(run), "--device", "cpu", *sets)
    checked = invoke("data", "check", str(data), "--recipe", str(recipe), *sets)
    for result in (trained, checked):
        assert result.returncode == 1, result
        assert "Traceback" not in result.stdout + result.stderr
        assert expected in " ".join(result.stderr.split()), result.stderr
    assert "found before training" in trained.stderr and "nothing was run" in trained.stderr
    assert "epoch 1" not in trained.stderr
    assert not (run / "metrics.jsonl").exists() and not list(run.glob("*.safetensors"))
    assert (invoke("data", "check", str(data)).returncode == 1) == plain_check_sees_it


def test_every_problem_is_reported_at_once(good, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(good, data)
    _remove("test_ims.npy", "test_caps.txt")(data)
    _set_features(data, "dev", _nan)
    write_tiny(data, {"train": 1})
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    result = invoke("train", str(recipe), "--out", str(tmp_path / "run"))
    stderr = " ".join(result.stderr.split())
    assert result.returncode == 1 and "3 problems found before training" in stderr
    assert "dev_ims.npy has NaN" in stderr and "fewer than one batch" in stderr and "no test split" in stderr
