"""A BERT directory whose vocab.txt disagrees with the model: a clear error naming the file, never a traceback.

A vocab.txt with a token listed twice leaves ids without a token; one with more tokens than the
model's word embedding has rows (config.json vocab_size) makes ids the embedding cannot look up,
which used to pass `itmkit import saem` and the recipe build and then fail inside BERT at the first
caption with an IndexError ('internal error').
"""

from __future__ import annotations

import pytest

from itmkit.errors import ItmkitError
from itmkit_bert.testing import TOKENS, write_tiny_bert
from itmkit_bert.vocab import WordPieceVocabulary


def _directory(tmp_path, name: str, extra: list[str]):
    folder = write_tiny_bert(tmp_path / name, weights=False)
    with open(folder / "vocab.txt", "a") as f:
        f.write("".join(t + "\n" for t in extra))
    return folder


def test_the_tiny_directory_itself_loads(tmp_path):
    assert len(WordPieceVocabulary.load(str(write_tiny_bert(tmp_path / "ok", weights=False)))) == len(TOKENS)


def test_a_token_listed_twice_is_named(tmp_path):
    folder = _directory(tmp_path, "twice", [TOKENS[-1]])
    with pytest.raises(ItmkitError, match=r"vocab.txt.*no token.*listed twice"):
        WordPieceVocabulary.load(str(folder))


def test_more_tokens_than_the_embedding_has_rows_is_named(tmp_path):
    folder = _directory(tmp_path, "bigger", ["zzzqx", "qqqzx"])
    with pytest.raises(ItmkitError, match=rf"{len(TOKENS) + 2} tokens.*vocab_size is {len(TOKENS)}"):
        WordPieceVocabulary.load(str(folder))
