"""Retrieval metrics exactly as the official SCAN / VSE++ evaluation computes them.

i2t: an image's rank is the best rank among its captions; t2i: a caption's rank is the rank
of its one true image. R@K = 100 * mean(rank < K), medr = floor(median(rank)) + 1,
meanr = mean(rank) + 1, rsum = the six recalls. Ranks come from the same descending argsort
as the official loops, so ties break identically.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from itmkit.errors import ItmkitError

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
)
PROTOCOLS = ("f30k-1k", "coco-1k-5fold", "coco-5k", "eccv-caption")
# Protocols whose metrics are read off ranked lists of COCO ids, not ranks: `itmkit eval` only (not a recipe's
# data.protocol), scored by itmkit.eccv with the split's ids.
ID_PROTOCOLS = ("eccv-caption",)
_ROWS_PER_CHUNK = 256  # argsort this many rows at a time: memory stays flat whatever the gallery


def _descending_order(rows: np.ndarray) -> np.ndarray:
    """Row-wise ``np.argsort(row)[::-1]``, the official ordering (ties included)."""
    return np.argsort(rows, axis=1)[:, ::-1]


def _owners(captions_per_image: int | np.ndarray) -> int | np.ndarray:
    """k when every image has k consecutive captions (the fast path), else the image of each caption."""
    if isinstance(captions_per_image, (int, np.integer)):
        return int(captions_per_image)
    index = np.asarray(captions_per_image, dtype=np.int64)
    n = len(index)
    if n and index[-1] >= 0 and n % (int(index[-1]) + 1) == 0:
        k = n // (int(index[-1]) + 1)
        if np.array_equal(index, np.arange(n) // k):
            return k
    return index


def _image_of(owners: int | np.ndarray, captions: np.ndarray) -> np.ndarray:
    """The image each of `captions` (caption indices, any shape) describes."""
    return captions // owners if isinstance(owners, int) else owners[captions]


def i2t_ranks(sims: np.ndarray, captions_per_image: int | np.ndarray = 5) -> np.ndarray:
    """For each image, the best (lowest) rank among its captions in its sorted caption list.

    ``captions_per_image``: k (captions k*i .. k*i+k-1 describe image i), or the image of each
    caption (C,) when the count varies.
    """
    owners = _owners(captions_per_image)
    n_images = sims.shape[0]
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_images)
        order = _descending_order(np.asarray(sims[start:stop]))
        owner = _image_of(owners, order)  # image owning each ranked caption
        hit = owner == np.arange(start, stop)[:, None]
        ranks[start:stop] = hit.argmax(axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray, captions_per_image: int | np.ndarray = 5) -> np.ndarray:
    """For each caption, the rank of its image in its sorted image list (``captions_per_image`` as in i2t_ranks)."""
    owners = _owners(captions_per_image)
    n_captions = sims.shape[1]
    ranks = np.empty(n_captions, dtype=np.int64)
    for start in range(0, n_captions, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_captions)
        order = _descending_order(np.ascontiguousarray(sims[:, start:stop].T))
        truth = _image_of(owners, np.arange(start, stop))
        ranks[start:stop] = (order == truth[:, None]).argmax(axis=1)
    return ranks


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    # 100 * count / n, in this order, so the floats equal the official code's to the last bit.
    out = {f"{prefix}_r{k}": 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def _layout_problem(shape: tuple[int, ...], owners: int | np.ndarray) -> str | None:
    """Why an (images x captions) matrix of `shape` does not fit the caption layout, or None."""
    if len(shape) != 2:
        return f"similarity matrix must be 2-D (images, captions), got {shape}"
    n_images, n_captions = shape
    if isinstance(owners, int):
        if owners < 1 or n_captions != n_images * owners:
            return f"similarity matrix must be (images, {owners} x images), got {shape}"
        return None
    if len(owners) != n_captions:
        return f"similarity matrix has {n_captions} captions but {len(owners)} caption images were given"
    if n_captions and (owners.min() < 0 or owners.max() >= n_images):
        return f"caption images must lie in [0, {n_images}) for a matrix of {n_images} images"
    described = np.bincount(owners, minlength=n_images) if n_captions else np.zeros(n_images, int)
    if not described.all():
        return (f"image {int(np.flatnonzero(described == 0)[0])} has no caption, so it has no "
                f"image-to-text rank")
    return None


# (sims, captions_per_image) -> (i2t ranks, t2i ranks): how ranks are read off a matrix (re-ranking swaps it)
Ranker = Callable[[np.ndarray, "int | np.ndarray"], tuple[np.ndarray, np.ndarray]]


def plain_ranks(sims: np.ndarray, captions_per_image: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both directions' ranks as the official evaluation reads them off the matrix."""
    return i2t_ranks(sims, captions_per_image), t2i_ranks(sims, captions_per_image)


def retrieval_metrics(sims: np.ndarray, captions_per_image: int | np.ndarray = 5,
                      ranks: Ranker = plain_ranks) -> dict[str, float]:
    """R@1/5/10, medr, meanr for both directions and rsum of an (images x captions) matrix.

    ``captions_per_image``: k, or the image of each caption (C,) for a varying count per image.
    ``ranks``: how ranks are read off the matrix (``itmkit.rerank`` re-ranks first).
    """
    sims = np.asarray(sims)
    captions_per_image = _owners(captions_per_image)
    problem = _layout_problem(sims.shape, captions_per_image)
    if problem:
        raise ItmkitError(problem)
    return ranks_metrics(*ranks(sims, captions_per_image))


def ranks_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """R@1/5/10, medr, meanr of both directions and rsum from 0-based ranks (each image's best caption rank,
    each caption's image rank)."""
    out = {**_summary(i2t, "i2t"), **_summary(t2i, "t2i")}
    out["rsum"] = _rsum(out)
    return out


def _fold_metrics(sims: np.ndarray, captions_per_image: int | np.ndarray, start: int, stop: int,
                  ranks: Ranker = plain_ranks) -> dict[str, float]:
    """retrieval_metrics of images start..stop-1 against their own captions only."""
    owners = _owners(captions_per_image)
    if isinstance(owners, int):
        return retrieval_metrics(sims[start:stop, start * owners:stop * owners], owners, ranks)
    problem = _layout_problem(sims.shape, owners)
    if problem:
        raise ItmkitError(problem)
    # A fold is a set of images; their captions go with them, wherever they sit in the matrix.
    keep = (owners >= start) & (owners < stop)
    return retrieval_metrics(sims[start:stop][:, keep], owners[keep] - start, ranks)


def _rsum(m: dict[str, float]) -> float:
    return sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))


# Images a protocol's test split must have (the COCO 5K test set, scored whole or as five 1K folds).
PROTOCOL_IMAGES = {"coco-1k-5fold": 5000, "coco-5k": 5000, "eccv-caption": 5000}
COCO_FOLD_IMAGES = 1000  # coco-1k-5fold: five folds of this many images


def protocol_problem(protocol: str, num_images: int, split: str = "the test split") -> str | None:
    """Why a split of ``num_images`` images cannot be scored by ``protocol``, or None if it can.

    Checked before training and before scoring (itmkit.preflight), and again here on the matrix.
    """
    if protocol not in PROTOCOLS:
        return f"unknown protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}"
    needed = PROTOCOL_IMAGES.get(protocol)
    if needed is not None and num_images != needed:
        return (f"protocol {protocol} needs the {needed}-image COCO test split ('testall'), but {split} has"
                f" {num_images} images (use protocol f30k-1k to score a split of any size)")
    return None


def protocol_metrics(sims: np.ndarray, protocol: str, captions_per_image: int | np.ndarray = 5,
                     ranks: Ranker = plain_ranks) -> dict[str, float]:
    """Metrics by a named protocol: f30k-1k and coco-5k use the whole matrix; coco-1k-5fold
    averages each metric over five folds of 1000 images (rsum recomputed from the means), each
    fold's ranks read off its own block (``ranks``, as in retrieval_metrics)."""
    problem = protocol_problem(protocol, sims.shape[0], "the similarity matrix")
    if problem:
        raise ItmkitError(problem)
    if protocol in ID_PROTOCOLS:
        raise ItmkitError(f"protocol {protocol} reads COCO ids, not ranks: score it with"
                          " itmkit.eccv.eccv_caption_metrics(sims, image_ids) (itmkit eval --protocol eccv-caption)")
    if protocol != "coco-1k-5fold":
        return retrieval_metrics(sims, captions_per_image, ranks)
    fold = COCO_FOLD_IMAGES
    return average_folds([_fold_metrics(sims, captions_per_image, f * fold, (f + 1) * fold, ranks) for f in range(5)])


def average_folds(folds: list[dict[str, float]]) -> dict[str, float]:
    """coco-1k-5fold's reading of its folds: each metric's mean over the folds, rsum recomputed from the means."""
    out = {k: float(np.mean([m[k] for m in folds])) for k in METRIC_KEYS if k != "rsum"}
    out["rsum"] = _rsum(out)
    return out


def protocol_galleries(protocol: str, captions_per_image: int | np.ndarray, num_images: int
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The galleries a protocol ranks within, as (image indices, caption indices) of the split: the whole
    split, or coco-1k-5fold's five folds of 1000 images with their own captions."""
    problem = protocol_problem(protocol, num_images)
    if problem:
        raise ItmkitError(problem)
    owners = _owners(captions_per_image)
    image_of = (np.arange(num_images * owners) // owners) if isinstance(owners, int) else owners
    if protocol != "coco-1k-5fold":
        return [(np.arange(num_images), np.arange(len(image_of)))]
    fold = COCO_FOLD_IMAGES
    return [(np.arange(f * fold, (f + 1) * fold), np.flatnonzero((image_of >= f * fold) & (image_of < (f + 1) * fold)))
            for f in range(num_images // fold)]
