"""Numbers and ids in data files are read strictly (``itmkit.inputs.strict_int``, ``bottomup.id_problem``).

Python's int() takes '٣' (Arabic-Indic 3), '1_0', '+5' and ' 5'; float() turned an image width of 10.5
into 10; a TSV read with errors="replace" turned a bad byte in an id into U+FFFD; ' 1' and '1' were two
images. Each is now one clear line naming the file and the line.
"""

from __future__ import annotations

import numpy as np
import pytest

from cliutil import assert_clean_failure, invoke
from itmkit.data.precomp import write_split
from itmkit.inputs import strict_int
from test_bottomup_convert import b64, image_arrays

CAPTIONS = [f"a dog runs {i}" for i in range(6)]


@pytest.mark.parametrize("text, value", [("5", 5), ("-2", -2), ("0", 0), ("٣", None), ("1_0", None), ("+5", None),
                                         (" 5", None), ("5 ", None), ("", None), ("5\n", None), ("1" * 40, None)])
def test_strict_int_takes_ascii_digits_only(text, value):
    assert strict_int(text) == value


def split_with(tmp_path, file, text):
    data = tmp_path / "data"
    write_split(data, "test", features=np.ones((3, 2, 4), np.float32), captions=CAPTIONS, captions_per_image=2)
    (data / "test_caps_per_image.txt").unlink()
    (data / file).write_text(text, encoding="utf-8")
    return data


@pytest.mark.parametrize("file, text", [
    ("test_caps_per_image.txt", "٢\n"), ("test_caps_per_image.txt", "+2\n"), ("test_caps_per_image.txt", " 2\n"),
    ("test_caps_per_image.txt", "0_2\n"),
    ("test_cap_images.txt", "0\n0\n1\n1\n٢\n2\n"), ("test_cap_images.txt", "0\n0\n1\n1\n+2\n2\n"),
    ("test_cap_images.txt", "0\n0\n1\n1\n 2\n2\n"), ("test_cap_images.txt", "0\n0\n1\n1\n2\n0_2\n"),
])
def test_caption_counts_must_be_ascii_integers(tmp_path, file, text):
    data = split_with(tmp_path, file, text)
    result = invoke("data", "check", str(data))
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert "expected an integer in ASCII digits" in " ".join((result.stdout + result.stderr).split())


def write_row(path, fields, mode="w"):
    with open(path, mode + "b") as f:
        f.write(b"\t".join(fields) + b"\n")


def tsv_rows(path, rows):
    """rows: (id bytes, w, h, count) with boxes and features of that many boxes."""
    arrays = image_arrays({"a": 2})
    feats, boxes = arrays["a"]
    with open(path, "wb") as f:
        for image_id, w, h, count in rows:
            n = 2 if count in (b"2", b"+2", b" 2", b"\xd9\xa2") else int(count)
            f.write(b"\t".join([image_id, w, h, count, b64(boxes[:n]).encode(), b64(feats[:n]).encode()]) + b"\n")
    return path


GOOD = (b"1", b"100", b"100", b"2")


@pytest.mark.parametrize("row, expected", [
    ((b"1", b"100", b"100", b"+2"), "num_boxes is '+2', expected an integer in ASCII digits"),
    ((b"1", b"100", b"100", b" 2"), "num_boxes is ' 2', expected an integer in ASCII digits"),
    ((b"1", b"100", b"100", "٢".encode()), "num_boxes is '٢', expected an integer in ASCII digits"),
    ((b"1", b"10.5", b"100", b"2"), "image_w, image_h are '10.5', '100'; expected whole numbers of pixels"),
    ((b"1", b"100", "٣".encode(), b"2"), "expected whole numbers of pixels"),
    ((b"im\xff1", b"100", b"100", b"2"), "line 2: image_id holds the byte 0xff, which is not UTF-8 text"),
    ((b"", b"100", b"100", b"2"), "line 2: the image id is empty"),
    ((b" 2", b"100", b"100", b"2"), "line 2: the image id ' 2' has white space around it"),
])
def test_tsv_fields_are_read_strictly(tmp_path, row, expected):
    path = tsv_rows(tmp_path / "f.tsv", [GOOD, row])
    message = assert_clean_failure(invoke("data", "convert", str(path), str(tmp_path / "out"), "--split", "test"))
    assert f"{path}, line 2" in message and expected in message
    assert not (tmp_path / "out" / "test_ims.npy").exists()


def test_a_whole_float_image_size_is_taken(tmp_path):
    path = tsv_rows(tmp_path / "f.tsv", [GOOD, (b"2", b"640.0", b"480", b"2")])
    result = invoke("data", "convert", str(path), str(tmp_path / "out"), "--split", "test")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "out" / "test_sizes.npy").tolist()[1] == [640, 480]


def test_a_per_image_file_named_with_surrounding_space_is_refused(tmp_path):
    folder = tmp_path / "nz"
    folder.mkdir()
    for name in ("1", " 1"):
        np.save(folder / f"{name}.npy", np.ones((2, 4), np.float32))
    message = assert_clean_failure(invoke("data", "convert", str(folder), str(tmp_path / "out"), "--split", "test"))
    assert "the image id ' 1' has white space around it" in message
