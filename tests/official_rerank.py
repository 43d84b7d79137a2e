"""The official MTFN-RR procedure (Wangt-CN/MTFN-RR-PyTorch-Code, rerank.py), transcribed literally:
the reference of tests/test_rerank.py and benchmarks/rerank.py. Loops, np.append into float arrays
and default argsorts, as there; the caption grouping i // 5 * 5 + k is generalised to "the captions
of caption i's image" (``mates``) so that layouts with a varying caption count can be checked too.
"""

from __future__ import annotations

import numpy as np


def official_i2t_rerank(sim, k1):
    size_i = sim.shape[0]
    sort_i2t = np.argsort(-sim, 1)
    sort_t2i = np.argsort(-sim, 0)
    sort_i2t_re = np.copy(sort_i2t)[:, :k1]
    for i in range(size_i):
        address = np.array([])
        for j in range(k1):
            query = sort_t2i[:, sort_i2t[i][j]]
            address = np.append(address, np.where(query == i)[0][0])
        sort_i2t_re[i] = sort_i2t_re[i][np.argsort(address)]
    sort_i2t[:, :k1] = sort_i2t_re
    return sort_i2t


def official_t2i_rerank(sim, k1, mates):
    size_t = sim.shape[1]
    sort_i2t = np.argsort(-sim, 1)
    sort_t2i = np.argsort(-sim, 0)
    sort_t2i_re = np.copy(sort_t2i)[:k1, :]
    for i in range(size_t):
        address = np.array([])
        for j in range(k1):
            query = sort_i2t[sort_t2i[j][i], :]
            ranks = 1e20
            for caption in mates(i):
                tmp = np.where(query == caption)[0][0]
                if tmp < ranks:
                    ranks = tmp
            address = np.append(address, ranks)
        sort_t2i_re[:, i] = sort_t2i_re[:, i][np.argsort(address)]
    sort_t2i[:k1, :] = sort_t2i_re
    return sort_t2i


def official_i2t_ranks(sorted_i2t, image_of):
    return np.array([min(int(np.where(sorted_i2t[i] == c)[0][0]) for c in np.flatnonzero(image_of == i))
                     for i in range(sorted_i2t.shape[0])])


def official_t2i_ranks(sorted_t2i, image_of):
    return np.array([int(np.where(sorted_t2i[:, c] == image_of[c])[0][0]) for c in range(sorted_t2i.shape[1])])


def reference(sims, image_of, k_i2t, k_t2i):
    sims = np.asarray(sims, dtype=np.float64)  # the official matrix: np.zeros((N, 5N)), float64
    i2t = official_i2t_rerank(sims, k_i2t)
    t2i = official_t2i_rerank(sims, k_t2i, lambda c: np.flatnonzero(image_of == image_of[c]))
    return i2t, t2i, official_i2t_ranks(i2t, image_of), official_t2i_ranks(t2i, image_of)
