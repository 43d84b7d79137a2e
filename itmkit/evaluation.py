"""Retrieval metrics exactly as the official SCAN / VSE++ evaluation computes them.

i2t: an image's rank is the best rank among its captions; t2i: a caption's rank is the rank
of its one true image. R@K = 100 * mean(rank < K), medr = floor(median(rank)) + 1,
meanr = mean(rank) + 1, rsum = the six recalls. Ranks come from the same descending argsort
as the official loops, so ties break identically.
"""

from __future__ import annotations

import numpy as np

from itmkit.errors import ItmkitError

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
)
PROTOCOLS = ("f30k-1k", "coco-1k-5fold", "coco-5k")
_ROWS_PER_CHUNK = 256  # argsort this many rows at a time: memory stays flat whatever the gallery


def _descending_order(rows: np.ndarray) -> np.ndarray:
    """Row-wise ``np.argsort(row)[::-1]``, the official ordering (ties included)."""
    return np.argsort(rows, axis=1)[:, ::-1]


def i2t_ranks(sims: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """For each image, the best (lowest) rank among its captions in its sorted caption list."""
    n_images = sims.shape[0]
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_images)
        order = _descending_order(np.asarray(sims[start:stop]))
        owner = order // captions_per_image  # image owning each ranked caption
        hit = owner == np.arange(start, stop)[:, None]
        ranks[start:stop] = hit.argmax(axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """For each caption, the rank of its image in its sorted image list."""
    n_captions = sims.shape[1]
    ranks = np.empty(n_captions, dtype=np.int64)
    for start in range(0, n_captions, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_captions)
        order = _descending_order(np.ascontiguousarray(sims[:, start:stop].T))
        truth = np.arange(start, stop) // captions_per_image
        ranks[start:stop] = (order == truth[:, None]).argmax(axis=1)
    return ranks


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    # 100 * count / n, in this order, so the floats equal the official code's to the last bit.
    out = {f"{prefix}_r{k}": 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def retrieval_metrics(sims: np.ndarray, captions_per_image: int = 5) -> dict[str, float]:
    """R@1/5/10, medr, meanr for both directions and rsum of an (images x captions) matrix."""
    sims = np.asarray(sims)
    if sims.ndim != 2 or sims.shape[1] != sims.shape[0] * captions_per_image:
        raise ItmkitError(
            f"similarity matrix must be (images, {captions_per_image} x images), got {sims.shape}"
        )
    out = {**_summary(i2t_ranks(sims, captions_per_image), "i2t"),
           **_summary(t2i_ranks(sims, captions_per_image), "t2i")}
    out["rsum"] = _rsum(out)
    return out


def _rsum(m: dict[str, float]) -> float:
    return sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))


def protocol_metrics(sims: np.ndarray, protocol: str, captions_per_image: int = 5) -> dict[str, float]:
    """Metrics by a named protocol: f30k-1k and coco-5k use the whole matrix; coco-1k-5fold
    averages each metric over five folds of 1000 images (rsum recomputed from the means)."""
    if protocol not in PROTOCOLS:
        raise ItmkitError(f"unknown protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if protocol != "coco-1k-5fold":
        return retrieval_metrics(sims, captions_per_image)
    fold = 1000
    if sims.shape[0] != 5 * fold:
        raise ItmkitError(
            f"protocol coco-1k-5fold needs the 5000-image COCO testall split, got {sims.shape[0]} images"
        )
    folds = [
        retrieval_metrics(sims[f * fold:(f + 1) * fold, f * fold * captions_per_image:(f + 1) * fold * captions_per_image],
                          captions_per_image)
        for f in range(5)
    ]
    out = {k: float(np.mean([m[k] for m in folds])) for k in METRIC_KEYS if k != "rsum"}
    out["rsum"] = _rsum(out)
    return out
