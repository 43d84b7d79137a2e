"""Values that pass a shape check but are wrong: boxes, image sizes, empty region or feature axes,
float64 beyond float32, and the kind of file where a data file is expected. Each is a problem of
`split_problems` / the finiteness scan, so `data check`, `train`'s pre-flight and `eval` all see it."""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest

from itmkit.data import hdf5, precomp
from itmkit.data.check import check_dataset
from itmkit.data.split import array_problems, box_problems, open_split
from itmkit.errors import DataError
from itmkit.preflight import DEFAULT_USE, open_used_splits

N, R, F = 4, 3, 5


def arrays(seed: int = 0, n: int = N) -> dict:
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 100, (n, R, 2))
    return {
        "features": rng.uniform(0.1, 1.0, (n, R, F)).astype(np.float32),
        "captions": [f"a photo of thing {i} number {j}" for i in range(n) for j in range(5)],
        "boxes": np.concatenate([corner, corner + rng.uniform(1, 50, (n, R, 2))], -1).astype(np.float32),
        "image_sizes": rng.integers(200, 400, (n, 2)).astype(np.int64),
    }


@pytest.fixture
def data(tmp_path):
    for seed, (name, n) in enumerate((("train", 8), ("dev", N), ("test", N))):
        precomp.write_split(tmp_path, name, **arrays(seed, n))
    assert check_dataset(tmp_path) == []
    return tmp_path


def problems_of(data_dir) -> str:
    """Every problem data check finds; the train pre-flight (open_used_splits) must find the same."""
    found = check_dataset(data_dir)
    _, _, preflight = open_used_splits(data_dir, DEFAULT_USE)
    assert [p.lower() for p in found] == [p.lower() for p in preflight]  # 'Split'/'split' aside
    return " ".join(found)


def replace(path, array) -> None:
    path.unlink()
    np.save(path, array)


# --- boxes and image sizes -------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_box_is_a_problem_naming_file_and_image(data, value):
    boxes = np.load(data / "test_boxes.npy")
    boxes[2, 1, 3] = value
    replace(data / "test_boxes.npy", boxes)
    found = problems_of(data)
    assert f"{data / 'test_boxes.npy'} has NaN or inf values in 1 image(s) (the first is image 2)" in found
    with pytest.raises(DataError, match="test_boxes.npy has NaN or inf"):
        open_split(data, "test")


@pytest.mark.parametrize("size, shown", [((-5, 300), "(-5, 300)"), ((0, 300), "(0, 300)"),
                                         ((300, np.inf), "(300, inf)"), ((np.nan, 300), "(nan, 300)")])
def test_bad_image_size_is_a_problem_naming_file_and_image(data, size, shown):
    sizes = np.load(data / "test_sizes.npy").astype(np.float64)
    sizes[1] = size
    replace(data / "test_sizes.npy", sizes)
    found = problems_of(data)
    assert f"{data / 'test_sizes.npy'} should hold each image's width and height in pixels, finite and positive" \
        in found
    assert f"image 1 has {shown}" in found


def test_reversed_xyxy_box_is_a_problem_but_padding_past_the_count_is_not(tmp_path):
    a = arrays()
    a["boxes"][3, 2] = [50, 60, 10, 70]  # x2 < x1: e.g. x, y, width, height stored as xyxy
    files = {"boxes": "B", "image_sizes": "S"}
    found = " ".join(array_problems("test", a["features"], a["captions"], a["boxes"], None, files=files))
    assert "B should hold x1, y1, x2, y2 pixel boxes with x1 <= x2 and y1 <= y2" in found
    assert "region 2 of image 3 is (50.0, 60.0, 10.0, 70.0)" in found
    # Row 2 of image 3 is padding once image 3 has 2 regions: whatever (finite) values it holds.
    counts = np.array([3, 3, 3, 2])
    assert array_problems("test", a["features"], a["captions"], a["boxes"], None, files=files,
                          region_counts=counts) == []
    # Zero-size boxes are allowed (PFAN gives them no block), and so are zero-padded rows.
    a["boxes"][3, 2] = 0
    assert array_problems("test", a["features"], a["captions"], a["boxes"], None, files=files) == []


def test_non_finite_box_in_padding_is_still_a_problem():
    boxes = arrays()["boxes"]
    boxes[0, 2] = np.nan
    found = box_problems(boxes, None, region_counts=np.array([2, 3, 3, 3]), boxes_file="B")
    assert found and "B has NaN or inf values in 1 image(s) (the first is image 0)" in found[0]


def test_pfan_layout_values_are_checked():
    blocks = np.zeros((N, R, 30))
    blocks[..., :15] = 256  # the padding block of a 16 x 16 grid
    assert box_problems(blocks, None, boxes_file="B") == []
    bad = blocks.copy()
    bad[1, 0, 4] = 3.5
    assert "region 0 of image 1 has block index 3.5 (column 4)" in box_problems(bad, None, boxes_file="B")[0]
    bad = blocks.copy()
    bad[2, 1, 20] = -0.25
    assert "region 1 of image 2 has weight -0.25 (column 20)" in box_problems(bad, None, boxes_file="B")[0]


def test_writers_refuse_bad_boxes_and_sizes_before_writing(tmp_path):
    a = arrays()
    a["image_sizes"][0] = (0, 10)
    with pytest.raises(DataError, match=r"test_sizes.npy \(to be written\) should hold each image's width"):
        precomp.write_split(tmp_path / "p", "test", **a)
    assert not (tmp_path / "p").exists()
    a = arrays()
    a["boxes"][0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"/test/boxes \(to be written\) has NaN or inf"):
        hdf5.write_split(tmp_path / "d.h5", "test", **a)


def test_box_scan_is_chunked(monkeypatch):
    """The values are read a chunk of images at a time, never the whole (memory-mapped) array."""
    import itmkit.data.split as split

    class Rows:
        def __init__(self, array):
            self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

        def __getitem__(self, key):
            self.reads.append(key)
            return self.array[key]

    monkeypatch.setattr(split, "SCAN_CHUNK_IMAGES", 2)
    boxes = Rows(arrays(n=5)["boxes"])
    assert box_problems(boxes, None) == []
    assert boxes.reads == [slice(0, 2), slice(2, 4), slice(4, 6)]


# --- empty axes ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, message", [
    ((N, 0, F), r"has shape \(4, 0, 5\): 0 regions per image"),
    ((N, R, 0), r"has shape \(4, 3, 0\): 0-wide features"),
    ((N, 0), r"has shape \(4, 0\): 0-wide features"),
])
def test_zero_regions_or_zero_wide_features_are_refused(data, shape, message):
    replace(data / "test_ims.npy", np.zeros(shape, np.float32))
    (data / "test_boxes.npy").unlink()
    found = problems_of(data)
    assert f"{data / 'test_ims.npy'} " in found
    assert re.search(message, found), found
    assert "padding" not in found  # F = 0 was reported as zero padding
    with pytest.raises(DataError, match=message):
        open_split(data, "test")


# --- the finiteness scan reads what the model reads ----------------------------------------------

@pytest.mark.parametrize("shape", [(N, R, F), (N, F), (5 * N, F)])
def test_float64_beyond_float32_range_is_non_finite(data, shape):
    """1e39 is finite in float64 but inf in float32, which the loader hands the model."""
    features = np.random.default_rng(0).uniform(0.1, 1.0, shape)
    if shape[0] > N:  # VSE++'s layout: each image's row once per caption
        features = np.repeat(features[:N], shape[0] // N, axis=0)
    if len(shape) == 3:
        features[2, 1, 0] = 1e39
    else:
        features[2 * (shape[0] // N): 3 * (shape[0] // N), 0] = -1e39  # image 2 (each row k times)
    replace(data / "test_ims.npy", features)
    (data / "test_boxes.npy").unlink()
    if len(shape) == 2:
        (data / "test_sizes.npy").unlink()
    found = problems_of(data)
    assert f"{data / 'test_ims.npy'} has NaN or inf values in 1 image(s) (the first is image 2)" in found
    assert "float64 values are finite but beyond float32's range (largest magnitude 1e+39)" in found


def test_float64_beyond_float32_range_in_hdf5(tmp_path):
    precomp.write_split(tmp_path, "train", **arrays(0, 8))
    hdf5.write_split(tmp_path / "data.h5", "test", **arrays(1))
    with h5py.File(tmp_path / "data.h5", "a") as f:
        features = f["test/features"][()].astype(np.float64)
        features[3, 0, 0] = 1e39
        del f["test/features"]
        f["test/features"] = features
    found = " ".join(check_dataset(tmp_path / "data.h5"))
    assert "data.h5:/test/features has NaN or inf values in 1 image(s) (the first is image 3)" in found


def test_nan_in_padded_rows_is_refused_with_the_reason(data):
    """Rows past an image's region count are masked out of every score, but NaN * 0 = NaN in a linear
    layer's weight gradient: padding must be finite, and the message says that is the row's problem."""
    features = np.load(data / "train_ims.npy")
    features[5, 2] = np.nan
    replace(data / "train_ims.npy", features)
    np.save(data / "train_region_counts.npy", np.array([3, 3, 3, 3, 3, 2, 3, 3]))
    found = problems_of(data)
    assert ("train_ims.npy has NaN or inf values in 1 image(s) (the first is image 5); row 2 of image 5 is "
            "padding past its 2 region(s), which is ignored but must still be finite (store zeros).") in found


# --- readers: one DataError naming the file, never an internal error ------------------------------

def test_caption_images_out_of_int64_range_is_a_data_error(data):
    lines = [str(i // 5) for i in range(5 * N)]
    lines[7] = "9999999999999999999999"
    (data / "test_cap_images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_cap_images.txt, line 8: 9999999999999999999999 is out of range"):
        open_split(data, "test")
    assert "line 8: 9999999999999999999999 is out of range" in problems_of(data)


def test_blank_line_in_caption_images_is_refused_naming_the_line(data):
    """A skipped blank line would give caption j the image of line j + 1."""
    lines = [str(i // 5) for i in range(5 * N)]
    lines.insert(3, "")
    (data / "test_cap_images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_cap_images.txt, line 4 is blank"):
        open_split(data, "test")


def h5data(tmp_path):
    precomp.write_split(tmp_path, "train", **arrays(0, 8))
    hdf5.write_split(tmp_path / "data.h5", "test", **arrays(1), region_counts=np.full(N, R))
    return tmp_path / "data.h5"


def edit(path, change) -> None:
    with h5py.File(path, "a") as f:
        change(f)


def _replace_with(name, make):
    def change(f):
        del f[name]
        make(f, name)
    return change


@pytest.mark.parametrize("change, message", [
    (lambda f: f.attrs.__setitem__("version", "one"), r"root attribute version should be a whole number .* 'one'"),
    (lambda f: f.attrs.__setitem__("version", np.nan), r"root attribute version should be a whole number"),
    (_replace_with("test/features", lambda f, n: f.create_group(n)),
     r"/test/features is an HDF5 group; expected a dataset holding the image features"),
    (_replace_with("test/region_counts", lambda f, n: f.create_group(n)),
     r"/test/region_counts is an HDF5 group; expected a dataset holding one region count per image"),
    (_replace_with("test/boxes", lambda f, n: f.create_group(n)), r"/test/boxes is an HDF5 group"),
    (_replace_with("test/image_sizes", lambda f, n: f.create_group(n)), r"/test/image_sizes is an HDF5 group"),
    (_replace_with("test/captions", lambda f, n: f.create_group(n)), r"/test/captions is an HDF5 group"),
    (_replace_with("test/features", lambda f, n: f.__setitem__(n, h5py.ExternalLink("gone.h5", "/x"))),
     r"/test/features is an external link to gone.h5:/x; expected a dataset stored in this file"),
    (_replace_with("test/boxes", lambda f, n: f.__setitem__(n, h5py.SoftLink("/nowhere"))),
     r"/test/boxes is a link to /nowhere, which cannot be opened"),
    (_replace_with("test/captions", lambda f, n: f.create_dataset(
        n, data=np.array([b"a photo"] * 7 + [b"\xff\xfe"] + [b"a photo"] * 12, dtype=object),
        dtype=h5py.string_dtype("utf-8"))),
     r"/test/captions: caption 7 is not UTF-8 text \(bad byte at offset 0: b'\\xff'\)"),
    (_replace_with("test/captions", lambda f, n: f.create_dataset(n, data="one", dtype=h5py.string_dtype())),
     r"/test/captions has shape \(\); expected one caption string per row"),
    (_replace_with("test/region_counts", lambda f, n: f.create_dataset(n, data=np.ones(N, bool))),
     r"/test/region_counts should hold integer region counts \(int64\) but has dtype bool"),
    (lambda f: f["test"].attrs.__setitem__("captions_per_image", True), r"captions_per_image should be an integer"),
])
def test_malformed_hdf5_objects_are_one_data_error(tmp_path, change, message):
    path = h5data(tmp_path)
    edit(path, change)
    with pytest.raises(DataError, match=message):
        open_split(path, "test")
    found = " ".join(check_dataset(tmp_path))
    assert re.search(message, found), found


def test_broken_link_at_the_root_does_not_break_listing(tmp_path):
    path = h5data(tmp_path)
    edit(path, lambda f: f.__setitem__("dev", h5py.ExternalLink("gone.h5", "/dev")))
    assert hdf5.split_names(path) == ["test"]


# --- the kind of file where a data file is expected -----------------------------------------------

@pytest.mark.parametrize("make, kind", [
    (lambda p: p.symlink_to(p.parent / "nowhere.npy"), r"is a symbolic link to .*nowhere.npy, which does not exist"),
    (lambda p: p.mkdir(), "is a folder; expected a regular file"),
    (lambda p: os.mkfifo(p), r"is a FIFO \(named pipe\); expected a regular file"),
])
@pytest.mark.parametrize("name", ["test_ims.npy", "test_caps.txt", "test_boxes.npy", "test_region_counts.npy",
                                  "test_cap_images.txt"])
def test_wrong_kind_of_file_is_named_not_taken_as_missing(data, name, make, kind):
    """A FIFO would block the reader forever; a folder or broken link is not a missing split."""
    path = data / name
    path.unlink(missing_ok=True)
    make(path)
    found = problems_of(data)
    assert re.search(f"{re.escape(str(path))} {kind}", found), found
    assert "no split" not in found and "did you mean" not in found


def test_fifo_named_data_h5_is_refused(tmp_path):
    precomp.write_split(tmp_path, "train", **arrays(0, 8))
    os.mkfifo(tmp_path / "data.h5")
    found = " ".join(check_dataset(tmp_path))
    assert f"HDF5 file {tmp_path / 'data.h5'} is a FIFO (named pipe); expected a regular file" in found


def test_unreadable_hdf5_features_are_a_problem_not_a_crash(tmp_path):
    """A chunk that cannot be decoded (corrupt, or a filter this h5py lacks) is named, not a traceback."""
    path = h5data(tmp_path)

    def gzip_features(f):
        data = f["test/features"][()]
        del f["test/features"]
        f.create_dataset("test/features", data=data, chunks=(1, R, F), compression="gzip")
    edit(path, gzip_features)
    with h5py.File(path, "r") as f:
        offset = f["test/features"].id.get_chunk_info(1).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 8] = b"\xff" * 8  # no longer a deflate stream
    path.write_bytes(bytes(raw))
    found = " ".join(check_dataset(tmp_path))
    assert "data.h5:/test/features cannot be read:" in found, found
