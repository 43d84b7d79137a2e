"""Reading and writing splits: precomp <-> Split <-> HDF5, layout detection, clear errors."""

from __future__ import annotations

import gc
from pathlib import Path

import h5py
import numpy as np
import pytest

from itmkit.data import hdf5, precomp
from itmkit.data.split import RowPrefix, Split, available_splits, open_split
from itmkit.errors import DataError

REFERENCE = Path(__file__).parents[1] / ".." / "shared" / "reference"


def xyxy(corners: np.ndarray) -> np.ndarray:
    """Random corner pairs as valid x1, y1, x2, y2 boxes (x1 <= x2, y1 <= y2), float32."""
    a, b = corners[..., :2], corners[..., 2:]
    return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=-1).astype(np.float32)


def make_arrays(num_images: int = 6, regions: int = 3, dim: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((num_images, regions, dim)).astype(np.float32),
        "captions": [f"image {i} caption {j} ." for i in range(num_images) for j in range(5)],
        "boxes": xyxy(rng.uniform(0, 500, (num_images, regions, 4))),
        "image_sizes": rng.integers(100, 640, (num_images, 2)),
    }


def assert_same(split: Split, arrays: dict) -> None:
    np.testing.assert_array_equal(split.image_features(np.arange(split.num_images)), arrays["features"])
    assert split.captions == arrays["captions"]
    np.testing.assert_array_equal(split.boxes, arrays["boxes"])
    np.testing.assert_array_equal(split.image_sizes, arrays["image_sizes"])


def test_precomp_round_trip_is_memory_mapped(tmp_path):
    arrays = make_arrays()
    precomp.write_split(tmp_path / "d", "train", ids=[str(100 + i) for i in range(6)], **arrays)
    split = precomp.read_split(tmp_path / "d", "train")
    assert isinstance(split.features, np.memmap)
    assert_same(split, arrays)
    assert (split.num_images, split.num_captions, split.num_regions, split.feature_dim) == (6, 30, 3, 4)
    assert split.captions_per_image == 5 and split.box_layout == "xyxy"
    assert (tmp_path / "d" / "train_ids.txt").read_text().split() == [str(100 + i) for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "train_boxes.npy", "train_caps.txt", "train_ids.txt", "train_ims.npy", "train_sizes.npy",
    ]


def test_image_features_keeps_the_order_asked_for(tmp_path):
    arrays = make_arrays()
    hdf5.write_split(tmp_path / "data.h5", "test", **arrays)
    for split in (Split("test", arrays["features"], arrays["captions"]), hdf5.read_split(tmp_path, "test")):
        rows = split.image_features(np.array([4, 1, 1, 5, 0]))
        assert rows.dtype == np.float32
        np.testing.assert_array_equal(rows, arrays["features"][[4, 1, 1, 5, 0]])
        with pytest.raises(IndexError, match=r"\[0, 6\)"):
            split.image_features(np.array([6]))


def test_one_caption_per_image_follows_the_im_div_rule(tmp_path):
    arrays = make_arrays()
    arrays["captions"] = arrays["captions"][::5]
    precomp.write_split(tmp_path, "dev", **arrays)
    assert open_split(tmp_path, "dev").captions_per_image == 1


def write_raw(data_dir: Path, split: str, features: np.ndarray, captions: list[str]) -> None:
    """Files written by hand, as a broken dataset would be."""
    data_dir.mkdir(exist_ok=True)
    np.save(data_dir / f"{split}_ims.npy", features)
    (data_dir / f"{split}_caps.txt").write_text("".join(f"{c}\n" for c in captions))


def test_wrong_caption_count_names_both_files_and_counts(tmp_path):
    captions = [f"caption {i}" for i in range(29)]
    captions[11] = ""
    write_raw(tmp_path, "train", np.zeros((6, 3, 4), np.float32), captions)
    with pytest.raises(DataError) as err:
        open_split(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path / "train_caps.txt") in message and str(tmp_path / "train_ims.npy") in message
    assert "has 29 captions" in message and "has 6 images" in message and "expected 30" in message
    assert "1 of them are empty (the first is number 12" in message


def test_features_must_be_3d_or_2d(tmp_path):
    # 2-D is one global feature per image (tests/test_global_features.py); other ranks are refused.
    write_raw(tmp_path, "train", np.zeros((6, 2, 3, 4), np.float32), ["c"] * 30)
    with pytest.raises(DataError, match=r"train_ims.npy should hold a 3-D array .* has shape \(6, 2, 3, 4\)"):
        precomp.read_split(tmp_path, "train")


def test_boxes_must_match_the_features(tmp_path):
    write_raw(tmp_path, "train", np.zeros((6, 3, 4), np.float32), ["c"] * 30)
    np.save(tmp_path / "train_boxes.npy", np.zeros((6, 5, 4)))
    with pytest.raises(DataError) as err:
        precomp.read_split(tmp_path, "train")
    message = str(err.value)
    assert "train_boxes.npy should have shape (6, 3, 4) or (6, 3, 30)" in message
    assert "but has shape (6, 5, 4)" in message


def test_missing_and_unreadable_files(tmp_path):
    np.save(tmp_path / "train_ims.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match="train_caps.txt does not exist"):
        precomp.read_split(tmp_path, "train")
    (tmp_path / "dev_ims.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="dev_ims.npy is not a readable .npy array"):
        precomp.read_split(tmp_path, "dev")


def test_write_refuses_inconsistent_arrays_before_writing(tmp_path):
    arrays = make_arrays()
    with pytest.raises(DataError, match="has 29 captions"):
        precomp.write_split(tmp_path / "out", "train", **{**arrays, "captions": arrays["captions"][:29]})
    with pytest.raises(DataError, match="line break"):
        precomp.write_split(tmp_path / "out", "train", **{**arrays, "captions": ["a\nb"] * 30})
    assert not (tmp_path / "out").exists()


def test_hdf5_round_trip(tmp_path):
    arrays = make_arrays()
    path = tmp_path / "data.h5"
    hdf5.write_split(path, "train", **arrays)
    split = hdf5.read_split(path, "train")
    assert isinstance(split.features, h5py.Dataset)
    assert_same(split, arrays)
    with h5py.File(path, "r") as f:
        assert f["train/features"].chunks == (1, 3, 4)
        assert f["train/features"].dtype == np.float32
        assert f["train/captions"].dtype.kind == "O"
        assert f["train"].attrs["captions_per_image"] == 5
        assert f.attrs["format"] == hdf5.FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_hdf5_dataset_outlives_its_file_object(tmp_path):
    arrays = make_arrays()
    hdf5.write_split(tmp_path / "data.h5", "train", **arrays)
    split = open_split(tmp_path, "train")
    gc.collect()
    np.testing.assert_array_equal(split.image_features(np.array([2])), arrays["features"][[2]])


def test_hdf5_groups_are_added_and_replaced(tmp_path):
    path = tmp_path / "data.h5"
    hdf5.write_split(path, "train", **make_arrays(seed=1))
    hdf5.write_split(path, "dev", **make_arrays(num_images=2, seed=2))
    newer = make_arrays(num_images=4, seed=3)
    hdf5.write_split(path, "train", **newer)
    assert hdf5.split_names(path) == ["dev", "train"]
    assert_same(hdf5.read_split(path, "train"), newer)
    assert hdf5.read_split(path, "dev").num_images == 2


def test_convert_precomp_to_hdf5_streams_and_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(hdf5, "CHUNK_IMAGES", 4)  # 10 images: three chunks, the last partial
    train, test = make_arrays(num_images=10, seed=4), make_arrays(num_images=3, seed=5)
    precomp.write_split(tmp_path / "pre", "train", **train)
    precomp.write_split(tmp_path / "pre", "test", **test)
    assert hdf5.convert_precomp_to_hdf5(tmp_path / "pre", tmp_path / "h5" / "data.h5") == ["test", "train"]
    for name, arrays in (("train", train), ("test", test)):
        from_h5 = open_split(tmp_path / "h5", name)
        assert_same(from_h5, arrays)
        assert from_h5.captions == precomp.read_split(tmp_path / "pre", name).captions


def test_hdf5_missing_split_suggests_a_name(tmp_path):
    hdf5.write_split(tmp_path / "data.h5", "test", **make_arrays())
    with pytest.raises(DataError, match=r"data.h5 has no split group '/tset' \(did you mean 'test'\?\)"):
        hdf5.read_split(tmp_path, "tset")


def test_open_split_detects_the_layout(tmp_path):
    arrays = make_arrays()
    precomp.write_split(tmp_path / "pre", "train", **arrays)
    hdf5.write_split(tmp_path / "h5" / "features.hdf5", "train", **arrays)
    assert isinstance(open_split(tmp_path / "pre", "train").features, np.memmap)
    assert isinstance(open_split(tmp_path / "h5", "train").features, h5py.Dataset)
    assert isinstance(open_split(tmp_path / "h5" / "features.hdf5", "train").features, h5py.Dataset)
    assert available_splits(tmp_path / "h5") == ["train"]


def test_open_split_lists_the_splits_present(tmp_path):
    for name in ("train", "test", "dev"):
        precomp.write_split(tmp_path, name, **make_arrays(num_images=1))
    assert available_splits(tmp_path) == ["train", "dev", "test"]
    with pytest.raises(DataError) as err:
        open_split(tmp_path, "tset")
    message = str(err.value)
    assert str(tmp_path / "tset_ims.npy") in message
    assert "splits present: train, dev, test" in message and "did you mean 'test'" in message
    with pytest.raises(DataError, match="does not exist"):
        open_split(tmp_path / "nowhere", "train")


def test_several_hdf5_files_are_ambiguous(tmp_path):
    for name in ("a.h5", "b.h5"):
        hdf5.write_split(tmp_path / name, "train", **make_arrays(num_images=1))
    with pytest.raises(DataError, match=r"several HDF5 files \(a.h5, b.h5\)"):
        open_split(tmp_path, "train")


def test_truncate_keeps_the_first_images_lazily(tmp_path):
    arrays = make_arrays(num_images=10, seed=6)
    precomp.write_split(tmp_path, "dev", **arrays)
    hdf5.write_split(tmp_path / "data.h5", "dev", **arrays)
    from_npy = precomp.read_split(tmp_path, "dev").truncate(4)
    from_h5 = hdf5.read_split(tmp_path, "dev").truncate(7).truncate(4)
    assert isinstance(from_npy.features, np.memmap)
    assert isinstance(from_h5.features, RowPrefix) and from_h5.features.shape == (4, 3, 4)
    for split in (from_npy, from_h5):
        assert (split.num_images, split.num_captions) == (4, 20)
        assert split.captions == arrays["captions"][:20]
        np.testing.assert_array_equal(split.image_features(np.array([3, 0])), arrays["features"][[3, 0]])
        np.testing.assert_array_equal(split.boxes, arrays["boxes"][:4])
        with pytest.raises(IndexError):
            split.image_features(np.array([4]))
    assert from_h5.truncate(100) is from_h5
    np.testing.assert_array_equal(from_h5.reopen().image_features(np.array([1])), arrays["features"][[1]])


def test_split_refuses_a_wrong_caption_count():
    with pytest.raises(DataError, match="4 captions for 1 images at 5 per image"):
        Split("train", np.zeros((1, 2, 3), np.float32), ["a"] * 4)


def test_pfan_boxes_sample_reads_as_the_pfan_layout(tmp_path):
    boxes_path = REFERENCE / "pfan_sample" / "train_boxes.npy"
    caps_path = REFERENCE / "pfan_sample" / "train_caps.txt"
    if not (boxes_path.is_file() and caps_path.is_file()):
        pytest.skip("PFAN sample is not available")
    boxes = np.load(boxes_path)
    captions = precomp.read_captions(caps_path)
    precomp.write_split(
        tmp_path, "train", features=np.zeros((50, 36, 8), np.float32), captions=captions, boxes=boxes
    )
    split = open_split(tmp_path, "train")
    assert split.box_layout == "pfan" and split.boxes.shape == (50, 36, 30)
    assert split.boxes.dtype == np.float64
    np.testing.assert_array_equal(split.boxes, boxes)
    assert split.captions[0].startswith("Two young guys with shaggy hair")


def test_hdf5_write_refuses_inconsistent_arrays_before_writing(tmp_path):
    arrays = make_arrays()
    with pytest.raises(DataError) as err:
        hdf5.write_split(tmp_path / "data.h5", "train", **{**arrays, "boxes": np.zeros((6, 2, 4))})
    assert f"{tmp_path / 'data.h5'}:/train/boxes (to be written)" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- IMRAM's {split}_feat.npy


def imram_layout(folder: Path, arrays: dict, splits=("train", "test")) -> None:
    """The precomp layout with the features named as HuiChen24/IMRAM's data.py reads them."""
    for name in splits:
        precomp.write_split(folder, name, **arrays)
        (folder / f"{name}_ims.npy").rename(folder / f"{name}_feat.npy")


def test_imram_feature_files_are_read_like_ims_files(tmp_path):
    arrays = make_arrays()
    imram_layout(tmp_path / "d", arrays)
    assert available_splits(tmp_path / "d") == ["train", "test"]
    split = open_split(tmp_path / "d", "test")
    assert isinstance(split.features, np.memmap)
    assert_same(split, arrays)
    with pytest.raises(DataError, match=r"tset_ims.npy \(or IMRAM's tset_feat.npy\).*did you mean 'test'"):
        open_split(tmp_path / "d", "tset")


def test_imram_feature_files_convert_to_hdf5(tmp_path):
    arrays = make_arrays(seed=3)
    imram_layout(tmp_path / "d", arrays)
    assert hdf5.convert_precomp_to_hdf5(tmp_path / "d", tmp_path / "data.h5") == ["test", "train"]
    assert_same(hdf5.read_split(tmp_path / "data.h5", "train"), arrays)


def test_both_feature_names_must_be_one_file(tmp_path):
    arrays = make_arrays()
    precomp.write_split(tmp_path / "d", "test", **arrays)
    (tmp_path / "d" / "test_feat.npy").symlink_to(tmp_path / "d" / "test_ims.npy")  # a link made for IMRAM: fine
    assert_same(open_split(tmp_path / "d", "test"), arrays)
    (tmp_path / "d" / "test_feat.npy").unlink()
    np.save(tmp_path / "d" / "test_feat.npy", arrays["features"] + 1)
    with pytest.raises(DataError, match=r"two feature files, .*test_ims.npy and .*test_feat.npy .*keep one"):
        open_split(tmp_path / "d", "test")
