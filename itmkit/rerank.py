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
orders tied scores the other way round: on a matrix with tied scores part of a difference
between the two is tie order; ``Reranked.tied_lists`` counts the lists concerned). Memory: the
matrix is sorted a block of rows or columns at a time, never whole, so it stays flat whatever the
gallery and the captions per image (the official code holds three int64 copies of the matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np

from itmkit.errors import ItmkitError
from itmkit.evaluate import check_finite_matrix
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
    tied_lists: int = 0  # lists (rows and columns) with equal scores among their first max(k, 10) + 1


def _tied(values: np.ndarray, order: np.ndarray, depth: int, axis: int) -> int:
    """How many of the lists ``order`` sorts (along ``axis``) hold equal scores among their first ``depth``."""
    head = np.take_along_axis(values, order[:depth] if axis == 0 else order[:, :depth], axis=axis)
    return int(np.count_nonzero((np.diff(head, axis=axis) == 0).any(axis=axis)))


def _descending(values: np.ndarray, axis: int) -> np.ndarray:
    """``np.argsort(-values, axis)`` of float64 values: the official call (its matrix is a float64 array)."""
    return np.argsort(-values, axis=axis)


def _best_per_image(position: np.ndarray, by_image: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(rows, Ni): for each row's caption ranks ``position`` (rows, Nt), the best rank of each image's captions.

    ``by_image``: the caption indices grouped by image; ``starts``: where each image's group begins.
    """
    return np.minimum.reduceat(position[:, by_image], starts, axis=1)


def _check(sims: np.ndarray, captions_per_image: int | np.ndarray, k_i2t: int, k_t2i: int) -> int | np.ndarray:
    """The caption layout (``evaluation._owners``) once the matrix and the depths are known to be usable."""
    if sims.dtype.kind not in "fiu":
        raise ItmkitError(f"a similarity matrix holds real numbers; this one's dtype is {sims.dtype}")
    for name, k in (("k_i2t", k_i2t), ("k_t2i", k_t2i)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ItmkitError(f"re-ranking depth {name} must be a whole number of at least 1, got {k!r}")
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, (int, np.integer, np.ndarray,
                                                                                        list, tuple)):
        raise ItmkitError(f"captions_per_image must be a whole number or the image of each caption,"
                          f" got {captions_per_image!r}")
    owners = _owners(captions_per_image)
    problem = _layout_problem(sims.shape, owners)
    if problem or 0 in sims.shape:
        raise ItmkitError(problem or f"an empty similarity matrix {sims.shape} has nothing to re-rank")
    check_finite_matrix(sims, "the similarity matrix to re-rank")
    return owners


def mtfn_rerank(sims: np.ndarray, captions_per_image: int | np.ndarray = 5, *, k_i2t: int = K_I2T,
                k_t2i: int = K_T2I, progress: Callable[[int, int], None] | None = None) -> Reranked:
    """MTFN-RR of an (images x captions) similarity matrix, both directions (see the module doc).

    ``captions_per_image``: k (captions k*i .. k*i+k-1 describe image i, the official layout) or the
    image of each caption (Nt,). ``k_i2t`` / ``k_t2i`` (the official 15 / 20) are capped at the
    gallery (the official code fails past it). ``progress(done, total)`` is called as the matrix's
    rows and columns are sorted. Raises ItmkitError on a matrix that does not fit the layout.
    """
    sims = np.asarray(sims)
    owners = _check(sims, captions_per_image, k_i2t, k_t2i)
    n_images, n_captions = sims.shape
    image_of = np.arange(n_captions) // owners if isinstance(owners, int) else owners
    k1, k2 = min(k_i2t, n_captions), min(k_t2i, n_images)
    total, done = 2 * n_images + n_captions, 0
    report = progress or (lambda d, t: None)

    # 1. Rows: each image's caption list, its head and the rank of its best caption in the whole list.
    top_i2t = np.empty((n_images, k1), dtype=np.int64)
    rank_i2t = np.empty(n_images, dtype=np.int64)
    tied = 0
    for r0 in range(0, n_images, _BLOCK):
        r1 = min(r0 + _BLOCK, n_images)
        values = np.asarray(sims[r0:r1], dtype=np.float64)
        order = _descending(values, axis=1)
        tied += _tied(values, order, max(k1, 10) + 1, axis=1)
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
        values = np.asarray(sims[:, c0:c1], dtype=np.float64)
        order = _descending(values, axis=0)  # (Ni, w): column j is caption c0 + j's image list
        tied += _tied(values, order, max(k2, 10) + 1, axis=0)
        top_t2i[c0:c1] = order[:k2].T
        rank_t2i[c0:c1] = (order == image_of[c0:c1]).argmax(axis=0)
        position = np.empty_like(order)
        position[order, np.arange(c1 - c0)] = np.arange(n_images)[:, None]  # position[i, j]: image i's rank
        rows, slots = np.nonzero((top_i2t >= c0) & (top_i2t < c1))
        i2t_keys[rows, slots] = position[rows, top_i2t[rows, slots] - c0]
        done += c1 - c0
        report(done, total)

    # 3. Rows again: for each caption's head images, the best rank of the caption's image-mates there.
    # That rank depends on the caption only through its image, so it is taken per image (reduceat).
    by_image = np.argsort(image_of, kind="stable")
    starts = np.searchsorted(image_of[by_image], np.arange(n_images))  # every image has a caption (_check)
    t2i_keys = np.empty((n_captions, k2), dtype=np.float64)
    for r0 in range(0, n_images, _BLOCK):
        r1 = min(r0 + _BLOCK, n_images)
        order = _descending(np.asarray(sims[r0:r1], dtype=np.float64), axis=1)
        position = np.empty_like(order)
        position[np.arange(r1 - r0)[:, None], order] = np.arange(n_captions)  # position[i, c]: caption c's rank
        best = _best_per_image(position, by_image, starts)  # (h, Ni)
        captions, slots = np.nonzero((top_t2i >= r0) & (top_t2i < r1))
        t2i_keys[captions, slots] = best[top_t2i[captions, slots] - r0, image_of[captions]]
        done += r1 - r0
        report(done, total)

    i2t_top = np.take_along_axis(top_i2t, np.argsort(i2t_keys, axis=1), axis=1)
    t2i_top = np.take_along_axis(top_t2i, np.argsort(t2i_keys, axis=1), axis=1)
    hit_i2t = image_of[i2t_top] == np.arange(n_images)[:, None]
    hit_t2i = t2i_top == image_of[:, None]
    # A true item in the head moved within it; one past the head kept the matrix's rank.
    return Reranked(i2t_top, t2i_top,
                    np.where(hit_i2t.any(axis=1), hit_i2t.argmax(axis=1), rank_i2t),
                    np.where(hit_t2i.any(axis=1), hit_t2i.argmax(axis=1), rank_t2i), tied)


RERANKERS = ("mtfn-rr",)


def reranked_ranks(method: str, *, k_i2t: int = K_I2T, k_t2i: int = K_T2I,
                   progress: Callable[[int, int], None] | None = None,
                   seen: Callable[[Reranked], None] | None = None,
                   ) -> Callable[[np.ndarray, int | np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The (i2t ranks, t2i ranks) function of a re-ranking method, for ``evaluation.protocol_metrics``;
    ``seen`` gets each whole result (a COCO 1K run re-ranks five folds)."""
    if method not in RERANKERS:
        from itmkit.errors import did_you_mean

        raise ItmkitError(f"unknown re-ranking {method!r}" + did_you_mean(method, RERANKERS))

    def ranks(sims: np.ndarray, captions_per_image: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = mtfn_rerank(sims, captions_per_image, k_i2t=k_i2t, k_t2i=k_t2i, progress=progress)
        if seen:
            seen(out)
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
