"""MTFN-RR re-ranking of a COCO-5K-sized matrix (5000 images x 25000 captions): itmkit.rerank
against the official rerank.py procedure (tests/official_rerank.py, its literal transcription),
both directions, in one process, warm, best of ``--repeats``; equal re-ranked lists and ranks
required. Peak memory is the numpy allocations' peak (tracemalloc) of one call of each.

    python benchmarks/rerank.py [--images 5000] [--repeats 3] [--reference-repeats 1]

The matrix is float32 sigmoid scores with a signal on the true pairs and saturation at the top,
so that its lists hold ties, as a sigmoid head's do.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tracemalloc
from pathlib import Path

import numpy as np

from itmkit.rerank import K_I2T, K_T2I, mtfn_rerank

from common import best_of, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official_rerank import reference  # noqa: E402  (the literal official procedure)


def matrix(n_images: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n_images, 5 * n_images), dtype=np.float32) * 3
    logits[np.arange(5 * n_images) // 5, np.arange(5 * n_images)] += 6  # the true pairs stand out
    return (1 / (1 + np.exp(-logits * 4))).astype(np.float32)  # steep: many scores saturate to 1.0


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("rerank_results.json")))
    args = parser.parse_args(argv)

    sims = matrix(args.images)
    image_of = np.arange(sims.shape[1]) // 5
    ties = int(np.count_nonzero(sims == 1.0))
    ours_seconds, ours = best_of(lambda: mtfn_rerank(sims), args.repeats)
    ref_seconds, ref = best_of(lambda: reference(sims, image_of, K_I2T, K_T2I), args.reference_repeats)
    i2t, t2i, i2t_rank, t2i_rank = ref
    equal = (np.array_equal(ours.i2t_top, i2t[:, :K_I2T]) and np.array_equal(ours.t2i_top, t2i[:K_T2I].T)
             and np.array_equal(ours.i2t_ranks, i2t_rank) and np.array_equal(ours.t2i_ranks, t2i_rank))
    result = {
        "matrix": list(sims.shape),
        "dtype": str(sims.dtype),
        "scores_saturated_to_1": ties,
        "k_i2t": K_I2T,
        "k_t2i": K_T2I,
        "seconds": round(ours_seconds, 2),
        "reference_seconds": round(ref_seconds, 2),
        "speedup": round(ref_seconds / ours_seconds, 1),
        "peak_mb": round(peak_bytes(lambda: mtfn_rerank(sims)) / 2**20),
        "reference_peak_mb": round(peak_bytes(lambda: reference(sims, image_of, K_I2T, K_T2I)) / 2**20),
        "matrix_mb": round(sims.nbytes / 2**20),
        "equal_to_reference": equal,
        "repeats": args.repeats,
        "reference_repeats": args.reference_repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}",
    }
    write_result(result, Path(args.out))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
