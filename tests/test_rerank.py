"""MTFN-RR (itmkit.rerank) against a literal transcription of the official rerank.py, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from itmkit.errors import ItmkitError
from itmkit.evaluation import METRIC_KEYS, i2t_ranks, protocol_metrics, t2i_ranks
from itmkit.rerank import mtfn_rerank, rerank_metrics
from official_rerank import reference


def tied(shape, levels, seed):
    """Scores on a few levels, so most lists hold ties (as saturated sigmoid scores do)."""
    return np.random.default_rng(seed).integers(0, levels, size=shape).astype(np.float32) / levels


# ------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("levels", [3, 7, 1000])
@pytest.mark.parametrize("k_i2t, k_t2i", [(15, 20), (3, 4), (40, 25)])
def test_equals_the_official_rerank_on_matrices_with_ties(levels, k_i2t, k_t2i):
    n_images = 30
    sims = tied((n_images, 5 * n_images), levels, seed=levels * 100 + k_i2t)
    image_of = np.arange(5 * n_images) // 5
    i2t, t2i, i2t_rank, t2i_rank = reference(sims, image_of, k_i2t, k_t2i)
    out = mtfn_rerank(sims, 5, k_i2t=k_i2t, k_t2i=k_t2i)
    assert np.array_equal(out.i2t_top, i2t[:, :k_i2t])
    assert np.array_equal(out.t2i_top, t2i[:k_t2i].T)
    assert np.array_equal(out.i2t_ranks, i2t_rank) and np.array_equal(out.t2i_ranks, t2i_rank)


def test_a_varying_caption_count_uses_each_image_s_own_captions():
    image_of = np.array([0, 0, 1, 2, 2, 2, 1, 3, 3, 0, 4, 4, 4, 4, 2])  # interleaved, 1 to 4 per image
    sims = tied((5, len(image_of)), 4, seed=3)
    i2t, t2i, i2t_rank, t2i_rank = reference(sims, image_of, 6, 3)
    out = mtfn_rerank(sims, image_of, k_i2t=6, k_t2i=3)
    assert np.array_equal(out.i2t_top, i2t[:, :6]) and np.array_equal(out.t2i_top, t2i[:3].T)
    assert np.array_equal(out.i2t_ranks, i2t_rank) and np.array_equal(out.t2i_ranks, t2i_rank)


def test_blocks_of_rows_and_columns_change_nothing(monkeypatch):
    import itmkit.rerank

    sims = tied((40, 200), 5, seed=9)
    whole = mtfn_rerank(sims)
    monkeypatch.setattr(itmkit.rerank, "_BLOCK", 7)  # rows and columns sorted 7 at a time
    cut = mtfn_rerank(sims)
    for a, b in zip(attrs_values(whole), attrs_values(cut)):
        assert np.array_equal(a, b)


def attrs_values(reranked):
    return reranked.i2t_top, reranked.t2i_top, reranked.i2t_ranks, reranked.t2i_ranks


def test_ranks_past_the_head_are_the_matrix_s_own():
    """Without ties, a true item outside the top k keeps the rank the plain evaluation gives it."""
    sims = np.random.default_rng(1).standard_normal((20, 100))
    out = mtfn_rerank(sims, k_i2t=2, k_t2i=2)
    plain_i2t, plain_t2i = i2t_ranks(sims), t2i_ranks(sims)
    assert np.array_equal(out.i2t_ranks[plain_i2t >= 2], plain_i2t[plain_i2t >= 2])
    assert np.array_equal(out.t2i_ranks[plain_t2i >= 2], plain_t2i[plain_t2i >= 2])
    assert (out.i2t_ranks[plain_i2t < 2] < 2).all() and (out.t2i_ranks[plain_t2i < 2] < 2).all()


def test_re_ranking_helps_when_the_other_direction_knows_better():
    """Image 0 ranks caption 7 (of image 1) first, but caption 7 ranks image 1 first: RR fixes it."""
    sims = np.full((2, 10), 0.1)
    sims[0, 7], sims[0, 0] = 0.9, 0.8  # image 0: the wrong caption 7 above its own caption 0
    sims[1, 7] = 0.95  # caption 7 is surer of image 1
    sims[1, 5:] = np.maximum(sims[1, 5:], 0.5)
    assert i2t_ranks(sims)[0] == 1 and mtfn_rerank(sims).i2t_ranks[0] == 0


def test_depths_past_the_gallery_are_capped():
    sims = tied((3, 15), 4, seed=2)
    out = mtfn_rerank(sims, k_i2t=100, k_t2i=100)
    assert out.i2t_top.shape == (3, 15) and out.t2i_top.shape == (15, 3)
    i2t, t2i, i2t_rank, t2i_rank = reference(sims, np.arange(15) // 5, 15, 3)
    assert np.array_equal(out.i2t_ranks, i2t_rank) and np.array_equal(out.t2i_ranks, t2i_rank)


def test_metrics_keep_the_plain_ones_beside():
    n = 20
    sims = tied((n, 5 * n), 6, seed=5)
    out = rerank_metrics(sims, "f30k-1k")
    assert out["before_rerank"] == protocol_metrics(sims, "f30k-1k")
    _, _, i2t_rank, t2i_rank = reference(sims, np.arange(5 * n) // 5, 15, 20)
    assert out["i2t_r1"] == 100.0 * np.count_nonzero(i2t_rank < 1) / n
    assert out["t2i_r5"] == 100.0 * np.count_nonzero(t2i_rank < 5) / (5 * n)
    assert out["i2t_meanr"] == pytest.approx(i2t_rank.mean() + 1)
    assert set(out) == {*METRIC_KEYS, "before_rerank"}


def test_each_coco_fold_is_reranked_on_its_own(monkeypatch):
    """coco-1k-5fold: each fold's block is the gallery re-ranked (scaled down: 5 folds of 8 images)."""
    import itmkit.evaluation

    monkeypatch.setitem(itmkit.evaluation.PROTOCOL_IMAGES, "coco-1k-5fold", 40)
    monkeypatch.setattr(itmkit.evaluation, "COCO_FOLD_IMAGES", 8)
    sims = tied((40, 200), 6, seed=6)
    out = rerank_metrics(sims, "coco-1k-5fold")
    folds = [rerank_metrics(sims[8 * f:8 * f + 8, 40 * f:40 * f + 40], "f30k-1k") for f in range(5)]
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_meanr"):
        assert out[key] == pytest.approx(np.mean([m[key] for m in folds]))
        assert out["before_rerank"][key] == pytest.approx(np.mean([m["before_rerank"][key] for m in folds]))


def test_a_matrix_that_does_not_fit_the_layout_is_refused():
    with pytest.raises(ItmkitError, match=r"must be \(images, 5 x images\)"):
        mtfn_rerank(np.zeros((3, 14)))
    with pytest.raises(ItmkitError, match="at least 1"):
        mtfn_rerank(np.zeros((3, 15)), k_i2t=0)


def test_memory_does_not_grow_with_the_captions_per_image():
    """Two images of 4000 captions each: the image-mates' best rank is taken per image, never as a
    captions x captions-per-image table (that one alone would be 8000 x 4000 int64, 256 MB)."""
    import tracemalloc

    sims = np.random.default_rng(0).random((2, 8000)).astype(np.float32)
    tracemalloc.start()
    try:
        out = mtfn_rerank(sims, 4000, k_t2i=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    assert out.t2i_ranks.shape == (8000,)
    few = sims[:, :200]  # the same layout, small enough for the literal reference's loops
    _, _, i2t_rank, t2i_rank = reference(few, np.arange(200) // 100, 15, 2)
    out = mtfn_rerank(few, 100, k_t2i=2)
    assert np.array_equal(out.i2t_ranks, i2t_rank) and np.array_equal(out.t2i_ranks, t2i_rank)


@pytest.mark.parametrize("sims, layout, kwargs, message", [
    (np.array([[np.nan, 1.0], [0.0, 0.5]]), 1, {}, "NaN or inf"),
    (np.zeros((2, 2)).astype(str), 1, {}, "real numbers"),
    (np.zeros((2, 2), complex), 1, {}, "real numbers"),
    (np.zeros((0, 0)), 5, {}, "empty"),
    (np.zeros((2, 10)), 2.5, {}, "whole number"),
    (np.zeros((2, 10)), True, {}, "whole number"),
    (np.zeros((2, 10)), 5, {"k_i2t": 2.5}, "k_i2t must be a whole number"),
    (np.zeros((2, 10)), 5, {"k_t2i": True}, "k_t2i must be a whole number"),
    (np.zeros((2, 10)), 0, {}, r"\(images, 0 x images\)"),
])
def test_the_python_function_refuses_what_the_command_refuses(sims, layout, kwargs, message):
    with pytest.raises(ItmkitError, match=message):
        mtfn_rerank(sims, layout, **kwargs)


def test_tied_lists_are_counted():
    assert mtfn_rerank(np.random.default_rng(2).standard_normal((4, 20))).tied_lists == 0
    assert mtfn_rerank(np.zeros((4, 20))).tied_lists == 24  # every row and every column
