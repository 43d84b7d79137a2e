"""The official pickled vocabularies (VSE++ ``vocab/*_vocab.pkl``), read without executing anything."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types

import pytest

from itmkit.data.pickle_vocab import read_pickled_vocabulary
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError
from itmkit.testing import Python2Pickler

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "caf\xe9", "\u00fcber"]


class OfficialVocabulary:
    """fartashf/vsepp vocab.py's class: three attributes filled by add_word."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}
        self.idx = 0

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1


@pytest.fixture(params=["vocab", "__main__"])
def official_class(request, monkeypatch):
    """The class under the module name it pickles with: `python vocab.py` -> __main__, imported -> vocab."""
    module = request.param
    cls = type("Vocabulary", (OfficialVocabulary,), {"__module__": module})
    cls.__qualname__ = "Vocabulary"
    if module == "vocab":
        monkeypatch.setitem(sys.modules, "vocab", types.ModuleType("vocab"))
    monkeypatch.setattr(sys.modules[module], "Vocabulary", cls, raising=False)
    return cls


def official(cls, words=WORDS):
    vocab = cls()
    for word in words:
        vocab.add_word(word)
    return vocab


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_python3_pickles_of_the_official_class_load(tmp_path, official_class, protocol):
    path = tmp_path / "f30k_precomp_vocab.pkl"
    path.write_bytes(pickle.dumps(official(official_class), protocol))
    assert f"{official_class.__module__}\nVocabulary".encode() in path.read_bytes() or protocol > 3
    vocab = Vocabulary.load(path)
    assert vocab.idx2word == WORDS and vocab.word2idx["dog"] == 5


@pytest.mark.parametrize("protocol", [0, 2])
def test_python2_pickles_with_byte_strings_load(tmp_path, official_class, protocol):
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=protocol).dump(official(official_class))
    raw = buffer.getvalue()
    assert pickle.SHORT_BINSTRING + b"\x08word2idx" in raw  # attribute names are Python 2 str (bytes)
    assert b"caf\xe9" in raw  # a latin-1 byte string: not UTF-8
    if protocol == 0:
        assert raw.startswith(b"ccopy_reg\n_reconstructor\n") and b"c__builtin__\nobject\n" in raw
    path = tmp_path / "coco_precomp_vocab.pkl"
    path.write_bytes(raw)
    assert Vocabulary.load(path).idx2word == WORDS


def test_utf8_byte_strings_decode_as_utf8(tmp_path, official_class):
    # Python 2 str words holding UTF-8 bytes (str.encode'd captions): each character's latin-1 code is one byte
    as_bytes = [w.encode("utf-8").decode("latin-1") for w in WORDS]
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(official(official_class, as_bytes))
    assert "caf\xe9".encode("utf-8") in buffer.getvalue()
    path = tmp_path / "vocab.pkl"
    path.write_bytes(buffer.getvalue())
    assert read_pickled_vocabulary(path).idx2word == WORDS


# ----------------------------------------------------------------------------------- refusals


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _nested(cls, marker):
    vocab = official(cls)
    vocab.word2idx["dog"] = RunsACommand(marker)  # deep inside the record
    return vocab


PAYLOADS = {
    "os.system at the top": lambda cls, marker: pickle.dumps(RunsACommand(marker), 2),
    "os.system inside the record": lambda cls, marker: pickle.dumps(_nested(cls, marker), 2),
    "os.system, protocol 0": lambda cls, marker: pickle.dumps(RunsACommand(marker), 0),
    "builtins.eval": lambda cls, marker: (b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode()
                                          + b"')\ntR."),
    "subprocess via getattr": lambda cls, marker: b"cbuiltins\ngetattr\n(cbuiltins\nobject\nV__subclasses__\ntR.",
}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_pickle_naming_any_other_global_is_refused_and_nothing_runs(tmp_path, official_class, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "vocab.pkl"
    path.write_bytes(PAYLOADS[payload](official_class, marker))
    with pytest.raises(DataError, match=rf"{path}: refused to unpickle: it references the global"
                                        r" (posix\.system|nt\.system|builtins\.(eval|getattr)); .*nothing was run"):
        Vocabulary.load(path)
    assert not marker.exists()


def test_the_reconstructor_builds_nothing_but_the_record(tmp_path):
    # copyreg._reconstructor is admitted for protocol 0, but only as (Vocabulary, object, None)
    path = tmp_path / "vocab.pkl"
    path.write_bytes(b"ccopy_reg\n_reconstructor\n(cvocab\nVocabulary\nc__builtin__\nobject\nVos.system\ntR.")
    with pytest.raises(DataError, match="not a readable vocabulary pickle .*only to rebuild the vocabulary record"):
        read_pickled_vocabulary(path)


def test_a_pickle_of_another_object_or_an_incomplete_record_is_named(tmp_path, official_class):
    path = tmp_path / "vocab.pkl"
    path.write_bytes(pickle.dumps({"word2idx": {}}, 2))
    with pytest.raises(DataError, match=r"vocab.pkl: the pickle holds a dict, not a Vocabulary object"):
        read_pickled_vocabulary(path)
    partial = official(official_class)
    del partial.idx2word
    path.write_bytes(pickle.dumps(partial, 2))
    with pytest.raises(DataError, match=r"vocab.pkl: the Vocabulary object lacks \['idx2word'\]"):
        read_pickled_vocabulary(path)
    broken = official(official_class)
    broken.word2idx["dog"] = 6
    path.write_bytes(pickle.dumps(broken, 2))
    with pytest.raises(DataError, match=r"vocab.pkl: idx2word\['5'\] is 'dog' but word2idx\['dog'\] is 6"):
        read_pickled_vocabulary(path)


def test_truncated_pickle_is_a_clear_error(tmp_path, official_class):
    path = tmp_path / "vocab.pkl"
    path.write_bytes(pickle.dumps(official(official_class), 2)[:40])
    with pytest.raises(DataError, match=r"vocab.pkl: not a readable vocabulary pickle"):
        Vocabulary.load(path)


# ------------------------------------------------------------------------ the name picks the reader


def test_a_pickle_where_json_is_expected_names_the_format(tmp_path, official_class):
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_bytes(pickle.dumps(official(official_class), 2))
    with pytest.raises(DataError, match=r"f30k_precomp_vocab.json is a Python pickle \(the VSE\+\+ vocabulary"
                                        r" format\), where the vocabulary JSON is expected; name it .pkl"):
        Vocabulary.load(path)
    path.write_bytes(pickle.dumps(official(official_class), 0))  # the text protocol too
    with pytest.raises(DataError, match="is a Python pickle"):
        Vocabulary.load(path)


def test_json_where_a_pickle_is_expected_names_the_format(tmp_path):
    path = tmp_path / "vocab.pkl"
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    path.write_bytes((tmp_path / "vocab.json").read_bytes())
    with pytest.raises(DataError, match=r"vocab.pkl is named .pkl but holds JSON \(the SCAN vocabulary format\)"):
        Vocabulary.load(path)


def test_json_vocabularies_still_load(tmp_path):
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").idx2word == WORDS
