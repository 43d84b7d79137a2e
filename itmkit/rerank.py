"""Re-ranking a similarity matrix with the other direction's ranks: MTFN-RR (Wang et al., ACM MM
2019, Sec. 3.4), exactly as the official ``rerank.py`` computes it, for any model's (images x
captions) matrix.

- i2t: each image's top ``k_i2t`` captions are re-sorted by the rank the image itself gets when
  each of those captions is the query (the caption's sorted image list).
- t2i: each caption's top ``k_t2i`` images are re-sorted by the best rank that *any caption of the
  query's own image* gets in that image's sorted caption list. This reads the test set's
  ground truth (which captions describe the same image), something a real query does not come
  with: re-ranked t2i figures are not plain query-by-query retrieval, and every command that
  uses them says so.

Only the top k of each list move, so ranks past k are the matrix's own. Ties: the lists are
``np.argsort(-sims)`` in float64 and the re-sort is ``np.argsort`` of float64 ranks, the official
calls made row by row on the same values, so the result equals the official one ties included
(the plain metrics of ``itmkit.evaluation`` follow VSE++'s ``argsort(sims)[::-1]`` instead, which
orders tied scores the other way round). Memory: the matrix is sorted a block of rows or columns
at a time, never whole, so it stays flat whatever the gallery (the official code holds three
int64 copies of the matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np

from itmkit.errors import ItmkitError
from itmkit.evaluation import _layout_problem, _owners

K_I2T = 15  # the official rerank.py: i2t_rerank(d, 15, ...)
K_T2I = 20  # the official rerank.py (its t2i block): t2i_rerank(d, 20, ...)
GROUPING_NOTICE = ("re-ranking (mtfn-rr) reads the test set's ground-truth caption grouping: a caption's t2i list"
                   " is re-sorted using the other captions of its own image")
_BLOCK = 256  # rows or columns sorted at a time: (256 x gallery) int64 orders, whatever the gallery


@attrs.frozen
class Reranked:
    """What MTFN-RR makes of an (Ni, Nt) matrix: the re-sorted heads of both lists and the ranks.

    ``i2t_top`` (Ni, k_i2t): each image's top captions after re-ranking; ``t2i_top`` (Nt, k_t2i):
    each caption's top images; ``i2t_ranks`` (Ni,) / ``t2i_ranks`` (Nt,): 0-based rank of the
    best true caption / the true image, as ``itmkit.evaluation.i2t_ranks`` / ``t2i_ranks`` give.
    """

    i2t_top: np.ndarray
    t2i_top: np.ndarray
    i2t_ranks: np.ndarray
    t2i_ranks: np.ndarray


def _descending(block: np.ndarray, axis: int) -> np.ndarray:
    """``np.argsort(-block, axis)`` in float64: the official call (its matrix is a float64 array)."""
    return np.argsort(-np.asarray(block, dtype=np.float64), axis=axis)


def _caption_table(caption_images: np.ndarray, n_images: int) -> np.ndarray:
    """(Ni, most captions of one image): each image's caption indices, padded with -1."""
    counts = np.bincount(caption_images, minlength=n_images)
    table = np.full((n_images, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    by_image = np.argsort(caption_images, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(len(caption_images)) - np.repeat(starts, counts)
    table[caption_images[by_image], slot] = by_image
    return table


def mtfn_rerank(sims: np.ndarray, captions_per_image: int | np.ndarray = 5, *, k_i2t: int = K_I2T,
                k_t2i: int = K_T2I, progress: Callable[[int, int], None] | None = None) -> Reranked:
    """MTFN-RR of an (images x captions) similarity matrix, both directions (see the module doc).

    ``captions_per_image``: k (captions k*i .. k*i+k-1 describe image i, the official layout) or the
    image of each caption (Nt,). ``k_i2t`` / ``k_t2i`` (the official 15 / 20) are capped at the
    gallery (the official code fails past it). ``progress(done, total)`` is called as the matrix's
    rows and columns are sorted. Raises ItmkitError on a matrix that does not fit the layout.
    """
    sims = np.asarray(sims)
    owners = _owners(captions_per_image)
    problem = _layout_problem(sims.shape, owners)
    if problem:
        raise ItmkitError(problem)
    if k_i2t < 1 or k_t2i < 1:
        raise ItmkitError(f"re-ranking depths must be at least 1, got k_i2t={k_i2t}, k_t2i={k_t2i}")
    n_images, n_captions = sims.shape
    image_of = np.arange(n_captions) // owners if isinstance(owners, int) else owners
    k1, k2 = min(k_i2t, n_captions), min(k_t2i, n_images)
    total, done = 2 * n_images + n_captions, 0
    report = progress or (lambda d, t: None)

    # 1. Rows: each image's caption list, its head and the rank of its best caption in the whole list.
    top_i2t = np.empty((n_images, k1), dtype=np.int64)
    rank_i2t = np.empty(n_images, dtype=np.int64)
    for r0 in range(0, n_images, _BLOCK):
        r1 = min(r0 + _BLOCK, n_images)
        order = _descending(sims[r0:r1], axis=1)
        top_i2t[r0:r1] = order[:, :k1]
        rank_i2t[r0:r1] = (image_of[order] == np.arange(r0, r1)[:, None]).argmax(axis=1)
        done += r1 - r0
        report(done, total)

    # 2. Columns: each caption's image list; the rank each image gets from the captions at its head.
    top_t2i = np.empty((n_captions, k2), dtype=np.int64)
    rank_t2i = np.empty(n_captions, dtype=np.int64)
    i2t_keys = np.empty((n_images, k1), dtype=np.float64)
    for c0 in range(0, n_captions, _BLOCK):
        c1 = min(c0 + _BLOCK, n_captions)
        order = _descending(sims[:, c0:c1], axis=0)  # (Ni, w): column j is caption c0 + j's image list
        top_t2i[c0:c1] = order[:k2].T
        rank_t2i[c0:c1] = (order == image_of[c0:c1]).argmax(axis=0)
        position = np.empty_like(order)
        position[order, np.arange(c1 - c0)] = np.arange(n_images)[:, None]  # position[i, j]: image i's rank
        rows, slots = np.nonzero((top_i2t >= c0) & (top_i2t < c1))
        i2t_keys[rows, slots] = position[rows, top_i2t[rows, slots] - c0]
        done += c1 - c0
        report(done, total)

    # 3. Rows again: for each caption's head images, the best rank of the caption's image-mates there.
    mates = _caption_table(image_of, n_images)[image_of]  # (Nt, m): the captions of each caption's image
    t2i_keys = np.empty((n_captions, k2), dtype=np.float64)
    for r0 in range(0, n_images, _BLOCK):
        r1 = min(r0 + _BLOCK, n_images)
        order = _descending(sims[r0:r1], axis=1)
        position = np.empty_like(order)
        position[np.arange(r1 - r0)[:, None], order] = np.arange(n_captions)  # position[i, c]: caption c's rank
        captions, slots = np.nonzero((top_t2i >= r0) & (top_t2i < r1))
        group = mates[captions]
        ranks = position[(top_t2i[captions, slots] - r0)[:, None], np.maximum(group, 0)]
        t2i_keys[captions, slots] = np.where(group >= 0, ranks, n_captions).min(axis=1)
        done += r1 - r0
        report(done, total)

    i2t_top = np.take_along_axis(top_i2t, np.argsort(i2t_keys, axis=1), axis=1)
    t2i_top = np.take_along_axis(top_t2i, np.argsort(t2i_keys, axis=1), axis=1)
    hit_i2t = image_of[i2t_top] == np.arange(n_images)[:, None]
    hit_t2i = t2i_top == image_of[:, None]
    # A true item in the head moved within it; one past the head kept the matrix's rank.
    return Reranked(i2t_top, t2i_top,
                    np.where(hit_i2t.any(axis=1), hit_i2t.argmax(axis=1), rank_i2t),
                    np.where(hit_t2i.any(axis=1), hit_t2i.argmax(axis=1), rank_t2i))


RERANKERS = ("mtfn-rr",)


def reranked_ranks(method: str, *, k_i2t: int = K_I2T, k_t2i: int = K_T2I,
                   progress: Callable[[int, int], None] | None = None
                   ) -> Callable[[np.ndarray, int | np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The (i2t ranks, t2i ranks) function of a re-ranking method, for ``evaluation.protocol_metrics``."""
    if method not in RERANKERS:
        from itmkit.errors import did_you_mean

        raise ItmkitError(f"unknown re-ranking {method!r}" + did_you_mean(method, RERANKERS))

    def ranks(sims: np.ndarray, captions_per_image: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = mtfn_rerank(sims, captions_per_image, k_i2t=k_i2t, k_t2i=k_t2i, progress=progress)
        return out.i2t_ranks, out.t2i_ranks

    return ranks


def rerank_metrics(sims: np.ndarray, protocol: str = "f30k-1k", captions_per_image: int | np.ndarray = 5,
                   method: str = "mtfn-rr", *, k_i2t: int = K_I2T, k_t2i: int = K_T2I) -> dict:
    """The protocol's metrics after re-ranking, with the plain ones under ``before_rerank``.

    A COCO 1K fold is re-ranked on its own (the fold is the gallery). Keys: those of
    ``evaluation.METRIC_KEYS`` plus ``before_rerank`` (a dict of the same keys).
    """
    from itmkit.evaluation import protocol_metrics

    after = protocol_metrics(sims, protocol, captions_per_image,
                             ranks=reranked_ranks(method, k_i2t=k_i2t, k_t2i=k_t2i))
    return {**after, "before_rerank": protocol_metrics(sims, protocol, captions_per_image)}
