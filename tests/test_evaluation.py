"""retrieval_metrics against a slow loop written from the official SCAN/VSE++ i2t and t2i."""

from __future__ import annotations

import numpy as np
import pytest

from itmkit.errors import ItmkitError
from itmkit.evaluation import METRIC_KEYS, protocol_metrics, retrieval_metrics


def official_i2t(sims: np.ndarray) -> dict[str, float]:
    """Image->text as the official code: rank of the best of an image's 5 captions."""
    npts = sims.shape[0]
    ranks = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    return _summarise(ranks)


def official_t2i(sims: np.ndarray) -> dict[str, float]:
    """Text->image as the official code: rank of the caption's one image."""
    npts = sims.shape[0]
    ranks = np.zeros(5 * npts)
    sims_t = sims.T
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims_t[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    return _summarise(ranks)


def _summarise(ranks: np.ndarray) -> dict[str, float]:
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return {"r1": r1, "r5": r5, "r10": r10, "medr": medr, "meanr": meanr}


def official(sims: np.ndarray) -> dict[str, float]:
    i2t, t2i = official_i2t(sims), official_t2i(sims)
    out = {f"i2t_{k}": v for k, v in i2t.items()} | {f"t2i_{k}": v for k, v in t2i.items()}
    out["rsum"] = i2t["r1"] + i2t["r5"] + i2t["r10"] + t2i["r1"] + t2i["r5"] + t2i["r10"]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_official_loops_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n = 60
    # Signal on the true pairs so the recalls are neither 0 nor 100.
    sims = rng.normal(size=(n, 5 * n)).astype(np.float32)
    sims[np.arange(5 * n) // 5, np.arange(5 * n)] += rng.uniform(0, 3, size=5 * n)
    ours, ref = retrieval_metrics(sims), official(sims)
    assert set(ours) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert ours[key] == ref[key], key
    assert 0 < ours["i2t_r1"] < 100 and 0 < ours["t2i_r1"] < 100


def test_matches_the_official_loops_with_ties():
    # Coarse integer scores: many ties, broken by the same argsort order as the official code.
    rng = np.random.default_rng(7)
    sims = rng.integers(0, 3, size=(40, 200)).astype(np.float64)
    ours, ref = retrieval_metrics(sims), official(sims)
    assert all(ours[k] == ref[k] for k in METRIC_KEYS)


def test_perfect_and_known_ranks():
    n = 20
    sims = np.zeros((n, 5 * n), dtype=np.float32)
    sims[np.arange(5 * n) // 5, np.arange(5 * n)] = 1.0
    m = retrieval_metrics(sims)
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0 and m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == 1.0 and m["i2t_meanr"] == 1.0


def test_chunked_ranking_agrees_beyond_one_chunk():
    rng = np.random.default_rng(3)
    n = 300  # more images than one argsort chunk
    sims = rng.normal(size=(n, 5 * n))
    sims[np.arange(5 * n) // 5, np.arange(5 * n)] += 2.5
    ours, ref = retrieval_metrics(sims), official(sims)
    assert all(ours[k] == ref[k] for k in METRIC_KEYS)


def test_coco_5fold_is_the_mean_of_the_fold_metrics():
    rng = np.random.default_rng(11)
    sims = rng.normal(size=(5000, 25000)).astype(np.float32)
    idx = np.arange(25000)
    sims[idx // 5, idx] += rng.uniform(0, 4, size=25000).astype(np.float32)
    folds = [retrieval_metrics(sims[f * 1000:(f + 1) * 1000, f * 5000:(f + 1) * 5000]) for f in range(5)]
    m = protocol_metrics(sims, "coco-1k-5fold")
    for key in METRIC_KEYS[:-1]:
        assert m[key] == pytest.approx(np.mean([f[key] for f in folds]))
    assert m["rsum"] == pytest.approx(sum(m[k] for k in METRIC_KEYS if "_r" in k and "meanr" not in k and "medr" not in k))
    # 5K uses the whole matrix, so it is harder than the 1K folds.
    assert protocol_metrics(sims, "coco-5k")["rsum"] < m["rsum"]


def test_bad_shapes_and_protocols_are_clear_errors():
    with pytest.raises(ItmkitError, match=r"\(images, 5 x images\)"):
        retrieval_metrics(np.zeros((10, 49)))
    with pytest.raises(ItmkitError, match="5000-image"):
        protocol_metrics(np.zeros((100, 500)), "coco-1k-5fold")
    with pytest.raises(ItmkitError, match="unknown protocol"):
        protocol_metrics(np.zeros((10, 50)), "f30k")
