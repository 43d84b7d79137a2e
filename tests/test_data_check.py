"""check_dataset finds each planted problem, and nothing in a good dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from itmkit.data import check, hdf5, precomp
from itmkit.data.check import check_dataset, summarize_dataset
from itmkit.data.vocab import Vocabulary


def xyxy(corners: np.ndarray) -> np.ndarray:
    """Random corner pairs as valid x1, y1, x2, y2 boxes (x1 <= x2, y1 <= y2), float32."""
    a, b = corners[..., :2], corners[..., 2:]
    return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=-1).astype(np.float32)


def arrays(num_images: int, regions: int = 3, dim: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((num_images, regions, dim)).astype(np.float32),
        "captions": [f"a photo of thing {i} number {j}" for i in range(num_images) for j in range(5)],
        "boxes": xyxy(rng.uniform(0, 100, (num_images, regions, 4))),
    }


@pytest.fixture
def good(tmp_path):
    """A small, correct precomp dataset with a vocabulary."""
    for seed, (name, n) in enumerate((("train", 12), ("dev", 4), ("test", 4))):
        precomp.write_split(tmp_path, name, **arrays(n, seed=seed))
    Vocabulary.build(precomp.read_captions(tmp_path / "train_caps.txt"), threshold=1).save(tmp_path / "vocab.json")
    return tmp_path


def test_good_dataset_has_no_problems(good):
    assert check_dataset(good) == []


def test_good_hdf5_dataset_has_no_problems(good, tmp_path_factory):
    dst = tmp_path_factory.mktemp("h5")
    hdf5.convert_precomp_to_hdf5(good, dst / "data.h5")
    assert check_dataset(dst) == []


def test_nan_and_inf_are_found_across_scan_chunks(good, monkeypatch):
    monkeypatch.setattr(check, "SCAN_CHUNK_IMAGES", 5)
    features = np.load(good / "train_ims.npy")
    features[7, 1, 2] = np.nan
    features[11, 0, 0] = np.inf
    np.save(good / "train_ims.npy", features)
    problems = check_dataset(good)
    assert problems == [
        f"{good / 'train_ims.npy'} has NaN or inf values in 2 image(s) (the first is image 7)."
    ]


def test_wrong_caption_count(good):
    lines = (good / "dev_caps.txt").read_text().splitlines()
    (good / "dev_caps.txt").write_text("\n".join(lines[:-1]) + "\n")
    [problem] = check_dataset(good)
    assert str(good / "dev_caps.txt") in problem and "has 19 captions" in problem and "has 4 images" in problem


def test_empty_caption(good):
    lines = (good / "test_caps.txt").read_text().splitlines()
    lines[6] = "   "
    (good / "test_caps.txt").write_text("\n".join(lines) + "\n")
    assert check_dataset(good) == [
        f"{good / 'test_caps.txt'} has 1 empty caption(s) (the first is caption 6, line 7)."
    ]


def test_missing_splits(good):
    for name in ("dev", "test"):
        for part in ("ims.npy", "caps.txt", "boxes.npy"):
            (good / f"{name}_{part}").unlink()
    # every split a training run reads: train, dev, and test (or COCO's testall)
    default = "(the default split names; check against a recipe with --recipe)"
    assert check_dataset(good) == [f"{good} has no dev split 'dev' {default}; splits present: train.",
                                   f"{good} has no test split 'test' or 'testall' {default}; splits present: train."]
    for part in ("ims.npy", "caps.txt", "boxes.npy"):
        (good / f"train_{part}").unlink()
    problems = check_dataset(good)
    assert f"{good} has no train split 'train'" in problems[0] and "splits present: none" in problems[0]
    assert len(problems) == 3


def test_mismatched_box_shape(good):
    np.save(good / "dev_boxes.npy", np.zeros((4, 3, 5), np.float32))
    [problem] = check_dataset(good)
    assert str(good / "dev_boxes.npy") in problem
    assert "(4, 3, 4) or (4, 3, 30)" in problem and "(4, 3, 5)" in problem


def test_mismatched_sizes_shape(good):
    np.save(good / "test_sizes.npy", np.zeros((3, 2)))
    [problem] = check_dataset(good)
    assert str(good / "test_sizes.npy") in problem and "(4, 2)" in problem and "(3, 2)" in problem


def test_regions_and_dims_must_agree_between_splits(good):
    precomp.write_split(good, "test", **{**arrays(4, regions=5, dim=6), "boxes": None})
    (good / "test_boxes.npy").unlink()
    problems = check_dataset(good)
    assert len(problems) == 2
    assert "Split 'test' has 5 regions per image" in problems[0] and "split 'train' has 3" in problems[0]
    assert "Split 'test' has 6 feature dimensions" in problems[1] and str(good / "train_ims.npy") in problems[1]


def test_features_must_be_float_and_3d(good):
    np.save(good / "dev_ims.npy", np.zeros((4, 3, 4), np.int64))
    np.save(good / "test_ims.npy", np.zeros((4, 1, 2, 12), np.float32))  # 2-D would be global features
    problems = check_dataset(good)
    assert any(str(good / "dev_ims.npy") in p and "dtype int64" in p for p in problems)
    assert any(str(good / "test_ims.npy") in p and "3-D" in p for p in problems)


def test_malformed_vocab(good):
    (good / "vocab.json").write_text(json.dumps({"idx2word": {}, "word2idx": {}}))
    [problem] = check_dataset(good)
    assert str(good / "vocab.json") in problem and "'idx'" in problem


def test_every_problem_is_reported_at_once(good):
    features = np.load(good / "train_ims.npy")
    features[0, 0, 0] = np.nan
    np.save(good / "train_ims.npy", features)
    (good / "dev_caps.txt").write_text("only one\n")
    (good / "vocab.json").write_text("{")
    problems = check_dataset(good)
    assert len(problems) == 3
    assert all(p.endswith(".") for p in problems)


def test_missing_directory(tmp_path):
    assert check_dataset(tmp_path / "nowhere") == [f"data directory {tmp_path / 'nowhere'} does not exist."]


def test_summarize_dataset(good):
    rows = summarize_dataset(good)
    assert [r["name"] for r in rows] == ["train", "dev", "test"]
    assert rows[0] == {
        "name": "train",
        "layout": "precomp",
        "images": 12,
        "captions": 60,
        "regions": 3,
        "feature_dim": 4,
        "boxes": "xyxy",
        "source": str(good),
    }


def test_summarize_survives_a_broken_split(good):
    (good / "dev_caps.txt").unlink()
    rows = summarize_dataset(good)
    assert rows[1]["name"] == "dev" and "dev_caps.txt does not exist" in rows[1]["error"]
    assert rows[2]["images"] == 4
    assert summarize_dataset(good / "nowhere") == []
