"""What a model attends to for one image-caption pair: its attention maps, the score, each word's share.

Cross-modal attention is reported, not reconstructed: while ``recording()`` is active, every branch
stage that outputs an ``Aligned`` (SCAN, BFAN, SGRAF's cross step: the weights its similarity reads)
and every stage that attends inside itself and calls ``note_attention`` (IMRAM's steps) adds its
(Ni, Nt, Lq, Lc) weights to the recording, labelled with its slot (``match[0].cross (scan.t2i)``).
Outside a recording both cost nothing, so scoring and training are unchanged.

A word's *contribution* is model-agnostic occlusion: the pair's score minus the score of the same
caption with that one token left out (all of them scored as one 1 x L block). It needs no attention,
so every model gets it; it is not a decomposition of the score (the contributions need not add up).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import attrs
import numpy as np
import torch

from itmkit.data.loader import pad_tokens
from itmkit.types import Regions, Tokens

SIDES = ("text", "image")


@attrs.frozen(eq=False)
class AttentionMap:
    """One stage's cross attention for one pair, oriented words x regions.

    ``query_side`` "text": row w is word w's distribution over the regions (each row sums to 1);
    "image": column r is region r's distribution over the words (each column sums to 1).
    """

    label: str
    weights: np.ndarray  # (words, regions) float32
    query_side: str

    def over_regions(self, word: int) -> np.ndarray:
        """(regions,) how much word ``word`` and each region attend to each other (the row of the map)."""
        return self.weights[word]


@attrs.define
class _Recording:
    maps: list[AttentionMap] = attrs.field(factory=list)
    stage: str = ""  # the label of the stage running now (set by the branch)


_active: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("itmkit_attention", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[AttentionMap]]:
    """Collect the attention maps reported while the block runs (use on a 1 x 1 block: pair [0, 0] is kept)."""
    rec = _Recording()
    token = _active.set(rec)
    try:
        yield rec.maps
    finally:
        _active.reset(token)


def active() -> _Recording | None:
    """The recording in progress, or None (what a branch checks before labelling its stages)."""
    return _active.get()


def note_attention(weights: torch.Tensor, query_side: str, step: str = "", *,
                   region_order: torch.Tensor | None = None) -> None:
    """Report cross attention ``weights`` (Ni, Nt, Lq, Lc) to a recording in progress; nothing otherwise.

    ``query_side`` "text" when the words are the queries (each word's weights over the regions sum to
    1), "image" when the regions are. ``step`` tells several maps of one stage apart ("step 2").
    ``region_order`` (Ni, Nt, R): when the region axis holds a pair's own arrangement of the image's
    regions (``PairLocal.order``), entry k names the region at position k; the map is put back in the
    image's order.
    """
    rec = _active.get()
    if rec is None:
        return
    if query_side not in SIDES:
        raise ValueError(f"query_side must be one of {SIDES}, got {query_side!r}")
    pair = weights.detach()[(0,) * (weights.dim() - 2)].float().cpu().numpy()  # (Lq, Lc) of pair [0, 0]
    words_by_regions = np.array(pair if query_side == "text" else pair.T)  # a copy: the model's tensor may change
    if region_order is not None:
        order = region_order.detach()[(0,) * (region_order.dim() - 1)].cpu().numpy()
        placed = np.zeros_like(words_by_regions)
        placed[:, order[: words_by_regions.shape[1]]] = words_by_regions
        words_by_regions = placed
    label = " ".join(part for part in (rec.stage, step) if part)
    rec.maps.append(AttentionMap(label or "attention", words_by_regions, query_side))


# --------------------------------------------------------------------------------- one pair


@attrs.frozen(eq=False)
class Explanation:
    """A model's view of one image-caption pair.

    ``tokens`` are the caption's tokens as the text encoder reads them (specials included);
    ``contributions[w]`` the score minus the score without token w (NaN for specials and for a
    caption of one token); ``maps`` every attention map recorded, words x regions, rows in ``tokens``
    order; ``region_count`` the image's valid regions.
    """

    score: float
    tokens: list[str]
    special: list[bool]
    contributions: np.ndarray
    maps: list[AttentionMap]
    region_count: int

    def words(self) -> list[int]:
        """The positions of the caption's words (specials left out; all tokens if there is nothing else)."""
        return [w for w, special in enumerate(self.special) if not special] or list(range(len(self.tokens)))

    def default_map(self) -> int | None:
        """The map a picture shows unless told otherwise: the first one with words as queries, else the first."""
        for k, m in enumerate(self.maps):
            if m.query_side == "text":
                return k
        return 0 if self.maps else None


def token_labels(vocab, ids: list[int]) -> tuple[list[str], list[bool]]:
    """Each id's token text, and whether it is a special (start, end, CLS, SEP, pad) rather than a word."""
    specials = {getattr(vocab, name) for name in ("START_ID", "END_ID", "PAD_ID", "cls_id", "sep_id", "pad_id")
                if getattr(vocab, name, None) is not None}
    return [vocab.token(i) for i in ids], [i in specials for i in ids]


def unknown_words(vocab, caption: str) -> list[str]:
    """The caption's words the vocabulary lacks (each reads as its unknown token), in order."""
    word2idx = getattr(vocab, "word2idx", None)
    if word2idx is not None:
        from itmkit.data.vocab import tokenize

        return [word for word in tokenize(caption) if word not in word2idx]
    unk = getattr(getattr(vocab, "tokenizer", None), "unk_token_id", None)  # WordPiece: the [UNK] pieces
    return [vocab.token(unk)] * list(vocab.encode(caption)).count(unk) if unk is not None else []


@torch.no_grad()
def explain_pair(model, vocab, features: np.ndarray, caption: str, *, region_count: int | None = None,
                 boxes: np.ndarray | None = None, image_size: np.ndarray | None = None,
                 device: torch.device | str = "cpu") -> Explanation:
    """Score one image (``features`` (R, F), its first ``region_count`` rows valid) against ``caption``.

    ``boxes`` (R, 4) and ``image_size`` (2,) go to encoders that read geometry (PFAN, RAMEN). The
    contributions come from one extra 1 x L block: the caption with each word left out in turn.
    """
    model.eval()
    regions = features.shape[0] if region_count is None else int(region_count)

    def batch_of_one(array: np.ndarray | None) -> torch.Tensor | None:  # a copy: the split's rows may be read-only
        return None if array is None else torch.tensor(np.asarray(array, dtype=np.float32), device=device)[None]

    image = model.encode_images(Regions(batch_of_one(features), torch.tensor([regions], device=device),
                                        batch_of_one(boxes), batch_of_one(image_size)))
    ids = list(vocab.encode(caption))
    tokens, special = token_labels(vocab, ids)
    with recording() as maps:
        score = float(model.score(image, _encode(model, [ids], device))[0, 0])
    contributions = np.full(len(ids), np.nan)
    left_out = [w for w in range(len(ids)) if not special[w]] if len(ids) > 1 else []
    if left_out:
        shorter = [ids[:w] + ids[w + 1:] for w in left_out]
        without = model.score(image, _encode(model, shorter, device))[0].float().cpu().numpy()
        contributions[left_out] = score - without
    kept = []
    for m in maps:  # the image's padding rows, if the encoder kept them, are not regions
        if m.weights.shape[0] != len(ids) or m.weights.shape[1] < regions:
            raise ValueError(f"attention map {m.label} has shape {m.weights.shape}; expected ({len(ids)} tokens,"
                             f" {regions} regions) or more regions (a bug in how that stage reports it)")
        kept.append(attrs.evolve(m, weights=np.ascontiguousarray(m.weights[:, :regions])))
    return Explanation(score, tokens, special, contributions, kept, regions)


def explain_row(model, vocab, split, row: int, caption: str, *, device: torch.device | str = "cpu") -> Explanation:
    """``explain_pair`` of image ``row`` of a ``Split`` (its features, valid regions, boxes and size) and ``caption``."""
    rows = np.array([row])
    return explain_pair(model, vocab, split.image_features(rows)[0], caption,
                        region_count=int(split.region_lengths(rows)[0]),
                        boxes=None if split.boxes is None else split.boxes[row],
                        image_size=None if split.image_sizes is None else split.image_sizes[row], device=device)


def _encode(model, captions: list[list[int]], device):
    tokens, lengths = pad_tokens([np.asarray(c, dtype=np.int64) for c in captions])
    return model.encode_texts(Tokens(tokens.to(device), lengths.to(device)))
