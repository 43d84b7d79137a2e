"""Text files that start with a UTF-8 byte-order mark read exactly as the same files without one."""

from __future__ import annotations

import numpy as np
import pytest

from itmkit.data import precomp
from itmkit.data.loader import encode_captions
from itmkit.data.split import open_split, read_text, text_lines
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError

BOM = "\ufeff".encode("utf-8")  # EF BB BF, what Notepad writes at the start of a UTF-8 file
CAPTIONS = ["a dog runs on the grass .", "two men ride bikes .", "a dog sleeps .", "men ride horses .",
            "a red car .", "a blue car .", "a cat .", "a small cat sits .", "dog and cat .", "a man ."]


def write_split(folder, bom: bool) -> None:
    precomp.write_split(folder, "test", features=np.ones((2, 3, 4), np.float32), captions=CAPTIONS)
    if bom:
        path = folder / "test_caps.txt"
        path.write_bytes(BOM + path.read_bytes())


def test_a_caption_file_with_a_bom_gives_the_same_captions_and_tokens(tmp_path):
    write_split(tmp_path / "plain", bom=False)
    write_split(tmp_path / "bom", bom=True)
    assert (tmp_path / "bom" / "test_caps.txt").read_bytes().startswith(BOM)
    plain, marked = open_split(tmp_path / "plain", "test"), open_split(tmp_path / "bom", "test")
    assert marked.captions == plain.captions == CAPTIONS
    vocab = Vocabulary.build(CAPTIONS, threshold=1)
    tokens = encode_captions(marked.captions, vocab)
    assert [t.tolist() for t in tokens] == [vocab.encode(c) for c in CAPTIONS]
    assert vocab.UNK_ID not in tokens[0].tolist()  # before: '\ufeffa' was an unknown word


def test_a_vocabulary_file_with_a_bom_loads_the_same_words(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, threshold=1)
    vocab.save(tmp_path / "vocab.json")
    marked = tmp_path / "marked.json"
    marked.write_bytes(BOM + (tmp_path / "vocab.json").read_bytes())
    assert Vocabulary.load(marked) == vocab


def test_declaration_files_with_a_bom_are_read(tmp_path):
    features = np.ones((5, 3, 4), np.float32)
    precomp.write_split(tmp_path, "test", features=features, captions=CAPTIONS, captions_per_image=2)
    path = tmp_path / "test_caps_per_image.txt"
    path.write_bytes(BOM + path.read_bytes())
    assert open_split(tmp_path, "test").captions_per_image == 2


def test_only_a_leading_bom_is_dropped_and_lines_split_as_a_file_iterates(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(BOM + "a\r\nb\u2028c\n\nd".encode("utf-8") + b"\n")
    # Universal newlines as `for line in f` gives them; U+2028 is not a line break there.
    assert text_lines(read_text(path, "text file")) == ["a", "b\u2028c", "", "d"]
    path.write_bytes(b"x " + BOM)
    assert read_text(path, "text file") == "x \ufeff"


def test_text_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "test_caps.txt"
    path.write_bytes(BOM + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"captions file .*test_caps.txt is not UTF-8 text \(bad byte at offset 6\)"):
        precomp.read_captions(path)
