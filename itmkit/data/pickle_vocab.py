"""Read the official pickled vocabularies (VSE++ ``vocab/{data_name}_vocab.pkl``) without running pickle code.

fartashf/vsepp's ``vocab.py`` (and the SCAN-lineage forks that kept its pickle) saves an
instance of its ``Vocabulary`` class, whose whole state is three attributes: ``word2idx``
(word -> index), ``idx2word`` (index -> word) and ``idx`` (the size). Run as a script, the class
pickles as ``__main__.Vocabulary``; imported by a training script, as ``vocab.Vocabulary``. The
files were written by Python 2 (``pickle.HIGHEST_PROTOCOL`` = 2, or protocol 0 text pickles) or
Python 3.

A pickle is a program: ``pickle.load`` imports and calls whatever globals the file names. Here
``find_class`` is the only door, and it admits just the vocabulary class's names, each mapped
to ``_Record``, a stand-in that only stores the attributes it is given. Protocols 0 and 1 build
an object through ``copyreg._reconstructor(cls, object, None)``: those two names map to a
stand-in that only makes an empty ``_Record``, and to an inert marker. Every other global
(``os.system``, ``builtins.eval``, ...) is refused before anything runs, with the file and the
global named. Python 2 byte strings arrive as bytes and are decoded as UTF-8, else latin-1.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from itmkit.errors import DataError
from itmkit.inputs import read_input

# (module, name) of the vocabulary class as the official repositories pickle it
VOCABULARY_CLASSES = {("__main__", "Vocabulary"), ("vocab", "Vocabulary")}
RECORD_KEYS = ("word2idx", "idx2word", "idx")


class _Record:
    """What the admitted class unpickles into: a bag of the attributes the pickle sets, nothing more."""

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


_OBJECT = ("the base class object",)  # an inert marker: not callable, not a type


def _reconstructor(cls: Any, base: Any, state: Any) -> _Record:
    """Stand-in for ``copyreg._reconstructor``: only ever makes an empty record."""
    if cls is not _Record or base is not _OBJECT or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor is admitted only to rebuild the vocabulary record")
    return _Record()


STAND_INS: dict[tuple[str, str], Any] = {
    **{name: _Record for name in VOCABULARY_CLASSES},
    ("copyreg", "_reconstructor"): _reconstructor, ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): _OBJECT, ("__builtin__", "object"): _OBJECT,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the vocabulary record."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _VocabularyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return STAND_INS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def _text(value: Any) -> Any:
    """A Python 2 byte string as text (UTF-8, else latin-1); anything else unchanged."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    return value


def shown(value: Any, width: int = 60) -> str:
    """``value`` for an error line: a huge integer by its size (10**400 is not printed in 400 digits, and
    Python refuses to print one of over 4300), anything else as its repr, cut to ``width`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _state(record: Any, source: str) -> dict[str, Any]:
    if not isinstance(record, _Record):
        raise DataError(f"{source}: the pickle holds a {type(record).__name__}, not a Vocabulary object"
                        f" ({' or '.join(sorted('.'.join(n) for n in VOCABULARY_CLASSES))})")
    state = record.state
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots) as protocol 2 may write it
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise DataError(f"{source}: the Vocabulary object has no attributes; expected {list(RECORD_KEYS)}")
    return {_text(k): v for k, v in state.items()}


def vocabulary_json(record: Any, source: str) -> dict[str, Any]:
    """The unpickled record as the official SCAN JSON object (what ``Vocabulary.from_json`` checks)."""
    state = _state(record, source)
    missing = [k for k in RECORD_KEYS if k not in state]
    if missing:
        raise DataError(f"{source}: the Vocabulary object lacks {missing}; it has {sorted(map(str, state))}")
    word2idx, idx2word = state["word2idx"], state["idx2word"]
    if isinstance(idx2word, list):  # some forks keep idx2word as a list
        idx2word = dict(enumerate(idx2word))
    if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
        raise DataError(f"{source}: word2idx and idx2word must be dicts, found {type(word2idx).__name__} and"
                        f" {type(idx2word).__name__}")
    odd = next((k for k in idx2word if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 2**63), None)
    if odd is not None:
        raise DataError(f"{source}: idx2word has the key {shown(_text(odd))}; its keys are the indices 0, 1, 2, ...")
    return {"word2idx": {_text(k): v for k, v in word2idx.items()},
            "idx2word": {str(k): _text(v) for k, v in idx2word.items()}, "idx": state["idx"]}


def read_pickled_vocabulary(path: str | Path):
    """The itmkit ``Vocabulary`` of an official pickled vocabulary file, read without executing anything."""
    from itmkit.data.vocab import Vocabulary

    path = Path(path)
    data = read_input(path, "vocabulary file")  # a regular file (never a FIFO or /dev/zero), capped in size
    try:
        record = _VocabularyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedGlobal as refused:
        admitted = ", ".join(sorted(".".join(n) for n in VOCABULARY_CLASSES))
        raise DataError(f"{path}: refused to unpickle: it references the global {refused.qualified}; a vocabulary"
                        f" pickle may name only its Vocabulary class ({admitted}); nothing was run") from None
    except Exception as exc:  # a truncated or garbled pickle fails with many error types
        raise DataError(f"{path}: not a readable vocabulary pickle ({type(exc).__name__}: {exc})") from None
    return Vocabulary.from_json(vocabulary_json(record, str(path)), source=str(path))


def looks_like_pickle(data: bytes) -> bool:
    """True for a pickle stream: protocol 2+ opens with PROTO (0x80); every protocol ends with STOP ('.')."""
    head = data[:1]
    return head == pickle.PROTO or (data.rstrip().endswith(pickle.STOP) and head in (b"c", b"(", b"}", b"]", b"I",
                                                                                      b"V", b"S", b"i", b"N"))


PICKLE_SUFFIXES = (".pkl", ".pickle")


def read_if_pickle(path: Path):
    """For ``Vocabulary.load``: the vocabulary of a ``.pkl`` file, None for a JSON file, else a clear error.

    The name decides the reader; the content must agree, so a pickle is never handed to the
    JSON parser (a baffling "invalid JSON at line 1") nor JSON to the unpickler.
    """
    data = read_input(path, "vocabulary file")  # checked before a byte is read: see itmkit.inputs
    pickled = looks_like_pickle(data)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not pickled:
            json_like = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"
            what = "JSON (the SCAN vocabulary format)" if json_like else "no pickle"
            raise DataError(f"vocabulary file {path} is named {path.suffix} but holds {what}; a {path.suffix} file"
                            " must be the official pickled Vocabulary (VSE++ vocab/*_vocab.pkl); name a JSON"
                            " vocabulary .json")
        return read_pickled_vocabulary(path)
    if pickled:
        raise DataError(f"vocabulary file {path} is a Python pickle (the VSE++ vocabulary format), where the"
                        f" vocabulary JSON is expected; name it .pkl to read it as the official pickled vocabulary"
                        " (read safely: only its Vocabulary record is admitted)")
    return None
