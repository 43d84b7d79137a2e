"""`itmkit data convert` from bottom-up-attention output: the generate_tsv TSV and per-image .npz/.npy folders."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cliutil import invoke
from itmkit.data import bottomup, hdf5, precomp
from itmkit.errors import DataError

DIM = 6
COUNTS = {"391895": 3, "522418": 5, "184613": 2}  # adaptive features: a different box count per image
SIZES = {"391895": (640, 360), "522418": (500, 375), "184613": (333, 500)}


def image_arrays(counts=COUNTS, dim=DIM, seed=0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for image_id, n in counts.items():
        w, h = SIZES.get(image_id, (100, 100))
        x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
        out[image_id] = (rng.standard_normal((n, dim)).astype(np.float32), boxes.astype(np.float32))
    return out


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")


def write_tsv(path, arrays, sizes=SIZES) -> None:
    """What generate_tsv writes: no header, tab-separated, base64 float32 boxes and features."""
    with open(path, "w", newline="") as f:
        for image_id, (feats, boxes) in arrays.items():
            w, h = sizes.get(image_id, (100, 100))
            f.write("\t".join([image_id, str(w), str(h), str(len(feats)), b64(boxes), b64(feats)]) + "\r\n")


def write_captions(path, ids, per_image=2) -> None:
    lines = [f"{i}.jpg#{k}\tcaption {k} of image {i}" for i in ids for k in range(per_image)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def tsv(tmp_path):
    arrays = image_arrays()
    path = tmp_path / "karpathy_test_resnet101_faster_rcnn_genome.tsv"
    write_tsv(path, arrays)
    return path, arrays


def check_rows(split, arrays, order, regions):
    assert split.features.shape == (len(order), regions, DIM)
    for row, image_id in enumerate(order):
        feats, boxes = arrays[image_id]
        n = min(len(feats), regions)
        np.testing.assert_array_equal(split.features[row, :n], feats[:n])
        assert not np.any(split.features[row, n:])  # zero padding
        np.testing.assert_array_equal(split.boxes[row, :n], boxes[:n])
        assert split.region_counts[row] == n
        assert tuple(split.image_sizes[row]) == SIZES[image_id]


def test_a_tsv_becomes_a_precomp_split_with_boxes_sizes_counts_ids_and_captions(tmp_path, tsv):
    source, arrays = tsv
    write_captions(tmp_path / "captions.token", list(COUNTS))
    code, out, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test",
                            "--captions", str(tmp_path / "captions.token"))
    assert code == 0, err
    assert "wrote test: 3 images x 5 regions x 6-d, 6 captions" in " ".join(out.split())
    split = precomp.read_split(tmp_path / "out", "test")
    check_rows(split, arrays, list(COUNTS), 5)
    assert (tmp_path / "out" / "test_ids.txt").read_text().split() == list(COUNTS)
    assert split.captions[2:4] == ["caption 0 of image 522418", "caption 1 of image 522418"]
    assert split.captions_per_image == 2
    assert split.box_layout == "xyxy"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_tsv_becomes_an_hdf5_split(tmp_path, tsv):
    source, arrays = tsv
    ids = list(COUNTS)
    table = tmp_path / "captions.token"
    table.write_text("".join(f"{i}\tcap {k}\n" for n, i in enumerate(ids) for k in range(n + 1)))  # 1, 2, 3 captions
    for split, regions in (("test", "5"), ("dev", "3")):  # the second split goes into the same file
        code, _, err = invoke("data", "convert", str(source), str(tmp_path / "data.h5"), "--split", split,
                              "--format", "hdf5", "--captions", str(table), "--regions", regions)
        assert code == 0, err
    assert hdf5.split_names(tmp_path / "data.h5") == ["dev", "test"]
    split = hdf5.read_split(tmp_path / "data.h5", "test")
    check_rows(split, arrays, ids, 5)
    assert split.num_captions == 6
    assert list(split.caption_index) == [0, 1, 1, 2, 2, 2]  # a varying count per image
    check_rows(hdf5.read_split(tmp_path / "data.h5", "dev"), arrays, ids, 3)
    import h5py

    with h5py.File(tmp_path / "data.h5") as f:
        assert [x.decode() for x in f["test/ids"][()]] == ids
        assert not [name for name in f if name.startswith(".")]  # no staging group left


def test_regions_pads_or_cuts_and_ids_pick_the_images_and_their_order(tmp_path, tsv):
    source, arrays = tsv
    ids = tmp_path / "test_ids.txt"
    ids.write_text("184613\n522418\n")
    code, out, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "dev", "--regions", "4",
                            "--ids", str(ids))
    assert code == 0, err
    assert "1 cut to their first 4 boxes" in out
    assert "captions: write dev_caps.txt in the order of dev_ids.txt" in " ".join(out.split())
    (tmp_path / "out" / "dev_caps.txt").write_text("a\nb\n")
    check_rows(precomp.read_split(tmp_path / "out", "dev"), arrays, ["184613", "522418"], 4)


def test_a_second_conversion_replaces_the_first_whole(tmp_path, tsv):
    source, arrays = tsv
    write_captions(tmp_path / "c.token", list(COUNTS), per_image=1)
    for regions in ("5", "2"):
        code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test",
                              "--regions", regions, "--captions", str(tmp_path / "c.token"))
        assert code == 0, err
    check_rows(precomp.read_split(tmp_path / "out", "test"), arrays, list(COUNTS), 2)


# ------------------------------------------------------------------------------ .npz / .npy folders


def test_a_folder_of_npz_files_converts(tmp_path):
    arrays = image_arrays({"10": 2, "2": 4, "7": 3})
    folder = tmp_path / "npz"
    folder.mkdir()
    for image_id, (feats, boxes) in arrays.items():
        padded = np.concatenate([feats, np.ones((2, DIM), np.float32)])  # rows past num_bbox are not boxes
        np.savez_compressed(folder / f"{image_id}.npz", x=padded, bbox=boxes, num_bbox=len(feats), image_w=100,
                            image_h=100, info=np.array([{"objects_id": [1]}], dtype=object))  # a pickle: never read
    result = bottomup.convert(folder, tmp_path / "out", split="train")
    assert result.images == 3 and result.regions == 4 and result.dim == DIM
    order = ["2", "7", "10"]  # natural order of the file names
    assert (tmp_path / "out" / "train_ids.txt").read_text().split() == order
    write_captions(tmp_path / "c.token", order, per_image=1)
    bottomup.convert(folder, tmp_path / "out", split="train", captions=tmp_path / "c.token")
    global SIZES
    saved, SIZES = SIZES, {i: (100, 100) for i in order}
    try:
        check_rows(precomp.read_split(tmp_path / "out", "train"), arrays, order, 4)
    finally:
        SIZES = saved


def test_feat_keys_and_plain_npy_features_convert(tmp_path):
    arrays = image_arrays({"a": 2, "b": 1})
    (tmp_path / "feat").mkdir()
    (tmp_path / "npy").mkdir()
    for image_id, (feats, _) in arrays.items():
        np.savez(tmp_path / "feat" / f"{image_id}.npz", feat=feats)  # xmodaler's key, no boxes
        np.save(tmp_path / "npy" / f"{image_id}.npy", feats)
    for name in ("feat", "npy"):
        out = tmp_path / f"out-{name}"
        result = bottomup.convert(tmp_path / name, out, split="test")
        assert (result.images, result.regions) == (2, 2)
        features = np.load(out / "test_ims.npy")
        np.testing.assert_array_equal(features[0], arrays["a"][0])
        np.testing.assert_array_equal(features[1, :1], arrays["b"][0])
        assert not (out / "test_boxes.npy").exists() and not (out / "test_sizes.npy").exists()
        assert np.load(out / "test_region_counts.npy").tolist() == [2, 1]


# --------------------------------------------------------------------------------- streaming, killing


def test_features_are_streamed_not_held(tmp_path):
    counts = {str(i): 10 + i % 20 for i in range(200)}
    arrays = image_arrays(counts, dim=128)
    write_tsv(tmp_path / "big.tsv", arrays)
    total = sum(f.nbytes for f, _ in arrays.values())
    del arrays
    tracemalloc.start()
    try:
        bottomup.convert(tmp_path / "big.tsv", tmp_path / "out", split="train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 1_500_000 and peak < total / 4, (peak, total)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from itmkit.data import bottomup

    def update(done, total=None, info=""):
        if total and done == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write, after two images

    bottomup.convert(sys.argv[1], sys.argv[2], split="test", progress=update)
""")


def test_a_killed_conversion_leaves_nothing_that_loads(tmp_path, tsv):
    source, _ = tsv
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", KILLED, str(source), str(out)], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert not (out / "test_ims.npy").exists() and not (out / "test_ids.txt").exists()
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in out.iterdir())
    with pytest.raises(DataError, match="test_ims.npy does not exist"):
        precomp.read_split(out, "test")


def test_a_failure_midway_removes_its_temporary_files(tmp_path, tsv):
    source, arrays = tsv
    with open(source, "a") as f:
        f.write("\t".join(["999", "10", "10", "1", b64(np.zeros(4)), "not base64!"]) + "\n")
    with pytest.raises(DataError, match=r"line 4 \(image 999\): features hold"):
        bottomup.convert(source, tmp_path / "out", split="test")
    lines = source.read_text().splitlines()[:3]  # now sizes that pass the survey, and bytes that do not decode
    lines.append("\t".join(["999", "10", "10", "1", b64(np.zeros(4)), "!" * 7 + "=" + b64(np.zeros(DIM))[8:]]))
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 4 \(image 999\): cannot decode"):
        bottomup.convert(source, tmp_path / "out", split="test")
    assert not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------ refusals


def _tsv_with(tmp_path, row: list[str]):
    path = tmp_path / "bad.tsv"
    arrays = image_arrays()
    write_tsv(path, arrays)
    with open(path, "a") as f:
        f.write("\t".join(row) + "\n")
    return path


ERRORS = {
    "five fields": (["1", "2", "3", "4", "5"], r"line 4: 5 tab-separated fields, expected 6 \(image_id, image_w,"),
    "no boxes": (["1", "10", "10", "0", "", ""], r"line 4 \(image 1\): num_boxes is 0"),
    "another width": (["1", "10", "10", "1", b64(np.zeros(4)), b64(np.zeros(DIM + 1))],
                      r"line 4 \(image 1\): 7-d features, but earlier images have 6-d"),
    "NaN feature": (["1", "10", "10", "1", b64(np.zeros(4)), b64(np.full(DIM, np.nan))],
                    r"line 4 \(image 1\): the features hold non-finite values"),
    "twice the same image": (["184613", "10", "10", "1", b64(np.zeros(4)), b64(np.zeros(DIM))],
                             r"image '184613' appears twice \(entries 3 and 4\)"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_a_bad_tsv_is_one_clear_error_and_writes_nothing(tmp_path, case):
    row, message = ERRORS[case]
    source = _tsv_with(tmp_path, row)
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test")
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cli_refusals(tmp_path, tsv):
    source, _ = tsv
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"))
    assert code == 1 and "--split NAME is needed" in err
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "d.h5"), "--split", "test", "--format", "hdf5")
    assert code == 1 and "an HDF5 split holds its captions" in err
    write_captions(tmp_path / "c.token", ["391895"])
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test", "--captions",
                          str(tmp_path / "c.token"))
    assert code == 1 and "has no caption for image '522418' (row 1)" in err
    (tmp_path / "ids.txt").write_text("391895\n1234\n")
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test", "--ids",
                          str(tmp_path / "ids.txt"))
    assert code == 1 and "1 image id(s) of the id list are not in" in err and "['1234']" in err
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "../x")
    assert code == 1 and "split name '../x' is not a plain name" in err


def test_a_precomp_folder_still_converts_to_hdf5(tmp_path):
    feats = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    precomp.write_split(tmp_path / "pre", "test", features=feats, captions=["a", "b"])
    code, out, err = invoke("data", "convert", str(tmp_path / "pre"), str(tmp_path / "data.h5"))
    assert code == 0, err
    np.testing.assert_array_equal(hdf5.read_split(tmp_path / "data.h5", "test").features[()], feats)
    code, _, err = invoke("data", "convert", str(tmp_path / "pre"), str(tmp_path / "x"), "--format", "precomp")
    assert code == 1 and "already in the precomp layout" in err


# ------------------------------------------------------------- values that would be written wrong


ERRORS.update({
    "width past float range": (["1", "1e400", "10", "1", b64(np.zeros(4)), b64(np.zeros(DIM))],
                               r"line 4 \(image 1\): image_w, image_h are '1e400', '10'; expected whole numbers of"
                               r" pixels"),
    "negative width": (["1", "-5", "10", "1", b64(np.zeros(4)), b64(np.zeros(DIM))],
                       r"line 4 \(image 1\): image_w, image_h are '-5', '10'; expected whole numbers"),
    "zero height": (["1", "10", "0", "1", b64(np.zeros(4)), b64(np.zeros(DIM))], r"line 4 \(image 1\): image size"),
    "NaN width": (["1", "nan", "10", "1", b64(np.zeros(4)), b64(np.zeros(DIM))], r"line 4 \(image 1\): image_w, image_h"),
    "infinite box": (["1", "10", "10", "1", b64(np.array([0, 0, np.inf, 5])), b64(np.zeros(DIM))],
                     r"line 4 \(image 1\): the boxes hold non-finite values \(NaN or inf\): 1 value\(s\), the first"
                     r" in row 0"),
})


def _npz_folder(tmp_path, **bad) -> Path:
    """Two good per-image .npz files and '9.npz' with the given arrays changed."""
    folder = tmp_path / "npz"
    folder.mkdir()
    for image_id, (feats, boxes) in image_arrays({"1": 3, "2": 2, "9": 3}).items():
        arrays = dict(x=feats, bbox=boxes, num_bbox=len(feats), image_w=100, image_h=80)
        np.savez(folder / f"{image_id}.npz", **(arrays | bad if image_id == "9" else arrays))
    return folder


NPZ_ERRORS = {
    "image_w NaN": (dict(image_w=np.nan), r"9.npz: image size \(image_w, image_h\) is nan x 80.0"),
    "image_w negative": (dict(image_w=-5), r"9.npz: image size \(image_w, image_h\) is -5.0 x 80.0"),
    "image_h infinite": (dict(image_h=np.inf), r"9.npz: image size \(image_w, image_h\) is 100.0 x inf"),
    "image_w an array": (dict(image_w=np.array([100, 200])), r"9.npz: image_w holds int64 of shape \(2,\); expected"
                                                              r" one number"),
    "box NaN": (dict(bbox=np.full((3, 4), np.nan)), r"9.npz: the boxes hold non-finite values"),
    "more boxes than features": (dict(bbox=np.ones((5, 4))), r"9.npz: bbox has 5 boxes but x has 3 feature rows"),
    "boxes of 5 numbers": (dict(bbox=np.ones((3, 5))), r"9.npz: bbox has shape \(3, 5\); expected \(num_boxes, 4\)"),
    "num_bbox past the rows": (dict(num_bbox=7), r"9.npz: num_bbox = 7, but x has only 3 feature rows"),
    "num_bbox an array": (dict(num_bbox=np.array([3, 2])), r"9.npz: num_bbox holds int64 of shape \(2,\); expected"
                                                          r" one number \(an integer\)"),
    "num_bbox a float": (dict(num_bbox=2.5), r"9.npz: num_bbox holds float64 of shape \(\); expected one number"),
    "float64 past float32": (dict(x=np.full((3, DIM), 1e39)),
                             r"9.npz: the features hold values beyond float32's range \(\|x\| > 3.4e38\), which"
                             r" become inf: 18 value\(s\), the first in row 0"),
    "complex features": (dict(x=np.ones((3, DIM), np.complex64)), r"9.npz: the features are complex64; expected real"),
}


@pytest.mark.parametrize("case", NPZ_ERRORS)
def test_a_bad_npz_is_one_clear_error_and_writes_nothing(tmp_path, case):
    bad, message = NPZ_ERRORS[case]
    folder = _npz_folder(tmp_path, **bad)
    code, _, err = invoke("data", "convert", str(folder), str(tmp_path / "out"), "--split", "test")
    assert code == 1 and "Traceback" not in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_float64_npy_feature_past_float32_is_refused(tmp_path):
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "1.npy", np.ones((2, DIM)))
    np.save(tmp_path / "npy" / "2.npy", np.full((2, DIM), -1e39))
    with pytest.raises(DataError, match=r"2.npy: the features hold values beyond float32's range"):
        bottomup.convert(tmp_path / "npy", tmp_path / "out", split="test")


@pytest.mark.parametrize("stale", ["test_caps.txt", "test_cap_images.txt", "test_caps_per_image.txt"])
def test_captions_of_an_earlier_dataset_are_not_kept_beside_new_features(tmp_path, tsv, stale):
    source, arrays = tsv
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / stale).write_text("an older dataset's line\n")
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'out' / stale} exists" in err and "pass --captions FILE" in err and "remove the file" in err
    assert not (tmp_path / "out" / "test_ims.npy").exists()
    assert (tmp_path / "out" / stale).read_text() == "an older dataset's line\n"  # refused, not removed
    write_captions(tmp_path / "c.token", list(COUNTS), per_image=1)  # with --captions they are replaced
    code, _, err = invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test", "--captions",
                          str(tmp_path / "c.token"))
    assert code == 0, err
    assert len(precomp.read_split(tmp_path / "out", "test").captions) == len(COUNTS)


def test_ids_that_differ_only_in_unicode_normalisation_are_one_id(tmp_path):
    composed, decomposed = "d\u00e4t\u00e4", "da\u0308ta\u0308"
    (tmp_path / "npy").mkdir()
    for name in (composed, decomposed):
        np.save(tmp_path / "npy" / f"{name}.npy", np.ones((2, DIM), np.float32))
    code, _, err = invoke("data", "convert", str(tmp_path / "npy"), str(tmp_path / "out"), "--split", "test")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert ascii(composed) in err and ascii(decomposed) in err and "one id written two ways" in err


def test_a_decomposed_file_name_joins_composed_captions(tmp_path):
    """macOS writes file names decomposed (NFD); caption tables are usually composed (NFC)."""
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "mu\u0308ller.npy", np.ones((2, DIM), np.float32))
    (tmp_path / "c.token").write_text("m\u00fcller.jpg#0\ta caption\n", encoding="utf-8")
    bottomup.convert(tmp_path / "npy", tmp_path / "out", split="test", captions=tmp_path / "c.token")
    assert (tmp_path / "out" / "test_ids.txt").read_text(encoding="utf-8") == "m\u00fcller\n"  # written in NFC
    assert precomp.read_split(tmp_path / "out", "test").captions == ["a caption"]
