"""Caption tokenisation and the word vocabulary, in the official SCAN JSON format."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nltk.tokenize import NLTKWordTokenizer

from itmkit.data.pickle_vocab import read_if_pickle, shown
from itmkit.data.split import atomic_path, read_text
from itmkit.errors import DataError, did_you_mean
from itmkit.inputs import MAX_TEXT_BYTES

# The official code calls nltk.word_tokenize, which first splits the text into
# sentences with punkt (a downloaded model) and then runs this same Treebank-style
# tokenizer on each sentence. Captions are single sentences, so the tokens are the
# same, and we need no nltk data download. A caption holding several sentences can
# differ: word_tokenize would split "dog." off as "dog" "." mid-caption.
_TOKENIZER = NLTKWordTokenizer()

JSON_KEYS = ("idx2word", "word2idx", "idx")


def tokenize(caption: str) -> list[str]:
    """Lower-case `caption` and split it into words and punctuation, as the SCAN code does."""
    return _TOKENIZER.tokenize(caption.lower())


class Vocabulary:
    """Words in index order; the first four are <pad>, <start>, <end>, <unk>."""

    PAD = "<pad>"
    START = "<start>"
    END = "<end>"
    UNK = "<unk>"
    SPECIALS = (PAD, START, END, UNK)
    PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
    MASK = "<mask>"  # not one of the four: GPO appends it for its caption augmentation

    def __init__(self, words: list[str]) -> None:
        if tuple(words[:4]) != self.SPECIALS:
            raise DataError(
                f"a vocabulary must start with {list(self.SPECIALS)} at indices 0-3, "
                f"but starts with {list(words[:4])}"
            )
        self.idx2word: list[str] = list(words)
        self.word2idx: dict[str, int] = {}
        for i, word in enumerate(self.idx2word):
            if word in self.word2idx:
                raise DataError(
                    f"word {word!r} appears twice in the vocabulary, at indices "
                    f"{self.word2idx[word]} and {i}"
                )
            self.word2idx[word] = i

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self.idx2word == other.idx2word

    __hash__ = None  # type: ignore[assignment]  # mutable through add_word

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    @property
    def mask_id(self) -> int | None:
        """The index of <mask>, or None when the vocabulary has none."""
        return self.word2idx.get(self.MASK)

    def add_word(self, word: str) -> int:
        """The index of `word`, appending it first if absent (GPO appends '<mask>')."""
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def encode(self, caption: str) -> list[int]:
        """Token ids of `caption`: <start>, the words (unknown ones as <unk>), <end>."""
        unk = self.UNK_ID
        ids = [self.word2idx.get(token, unk) for token in tokenize(caption)]
        return [self.START_ID, *ids, self.END_ID]

    def token(self, i: int) -> str:
        """The text of token id ``i`` (specials as written, e.g. '<start>')."""
        return self.idx2word[int(i)]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of `ids` joined by spaces, leaving out <pad>, <start> and <end>."""
        skip = (self.PAD_ID, self.START_ID, self.END_ID)
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.idx2word):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self)})")
            if i not in skip:
                words.append(self.idx2word[i])
        return " ".join(words)

    def to_json(self) -> dict[str, Any]:
        """The official SCAN JSON object: idx2word (string keys), word2idx, idx."""
        return {
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "word2idx": dict(self.word2idx),
            "idx": len(self.idx2word),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, source: str = "vocabulary JSON") -> Vocabulary:
        """Read the official SCAN JSON object, checking that its three keys agree."""
        if not isinstance(obj, dict):
            raise DataError(f"{source}: expected a JSON object, found {type(obj).__name__}")
        missing = [k for k in JSON_KEYS if k not in obj]
        if missing:
            extra = [k for k in obj if k not in JSON_KEYS]
            hints = "; ".join(f"{k!r}{did_you_mean(k, extra) if extra else ''}" for k in missing)
            raise DataError(f"{source}: missing key(s) {hints}; expected keys {list(JSON_KEYS)}")
        idx2word, word2idx, size = obj["idx2word"], obj["word2idx"], obj["idx"]
        if not isinstance(idx2word, dict) or not isinstance(word2idx, dict):
            raise DataError(f"{source}: 'idx2word' and 'word2idx' must be JSON objects")
        # Types once, here, for every reader (JSON, pickle, checkpoint metadata): a word that is a list
        # or a dict would fail as an unhashable key below, an int word would pass for a word.
        for key, word in idx2word.items():
            if not isinstance(word, str):
                raise DataError(f"{source}: idx2word[{shown(key)}] is {shown(word)}; every word must be a string")
        for word in word2idx:
            if not isinstance(word, str):
                raise DataError(f"{source}: word2idx has the key {shown(word)}; every word must be a string")
        if isinstance(size, bool) or not isinstance(size, int) or size != len(idx2word) or size != len(word2idx):
            raise DataError(
                f"{source}: 'idx' is {shown(size)} but 'idx2word' has {len(idx2word)} entries "
                f"and 'word2idx' has {len(word2idx)}; all three must agree (the number of words)"
            )
        for word, index in word2idx.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
                raise DataError(f"{source}: word2idx[{shown(word)}] is {shown(index)}; expected an index 0..{size - 1}")
        expected_keys = {str(i) for i in range(size)}
        if set(idx2word) != expected_keys:
            odd = sorted(set(idx2word) - expected_keys)[:5]
            raise DataError(
                f"{source}: 'idx2word' keys must be the strings '0'..'{size - 1}'; "
                f"unexpected keys include {shown(odd)}"
            )
        words = [idx2word[str(i)] for i in range(size)]
        for i, word in enumerate(words):
            if word2idx.get(word) != i:
                raise DataError(
                    f"{source}: idx2word[{str(i)!r}] is {word!r} but word2idx[{word!r}] is "
                    f"{word2idx.get(word)!r}; the two maps must be inverses"
                )
        try:
            return cls(words)
        except DataError as err:
            raise DataError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary file: the official SCAN JSON, or a VSE++ pickle (``.pkl``, read safely)."""
        path = Path(path)
        pickled = read_if_pickle(path)  # itmkit.data.pickle_vocab: a pickle under a JSON name is an error
        if pickled is not None:
            return pickled
        text = read_text(path, "vocabulary file", limit=MAX_TEXT_BYTES)  # UTF-8, a leading BOM dropped
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"vocabulary file {path} is not valid JSON: {err.msg} "
                f"at line {err.lineno}, column {err.colno}"
            ) from None
        except RecursionError:  # '[[[[...' thousands deep: the parser recurses per level
            raise DataError(f"vocabulary file {path}: JSON nested too deeply to be a vocabulary (expected one"
                            f" object of {list(JSON_KEYS)})") from None
        return cls.from_json(obj, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the official JSON format atomically (a temporary file, then a rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json()), encoding="utf-8")

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical JSON, to tie a checkpoint to its vocabulary."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Words seen at least `threshold` times, most frequent first, ties alphabetical."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = [w for w, c in counts.items() if c >= threshold and w not in cls.SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls([*cls.SPECIALS, *kept])
