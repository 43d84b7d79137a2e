"""MTFN-RR re-ranking of a COCO-5K-sized matrix (5000 images x 25000 captions): itmkit.rerank
against the official rerank.py procedure, both directions, in one process, warm, best of
``--repeats``; equal re-ranked lists and ranks required. Peak memory is the numpy allocations'
peak (tracemalloc) of one call of each.

    python benchmarks/rerank.py --official ~/src/MTFN-RR-PyTorch-Code [--images 5000] [--repeats 3]

With ``--official PATH`` (a clone of https://github.com/Wangt-CN/MTFN-RR-PyTorch-Code) the reference
is the official rerank.py itself, imported from the clone by ``benchmarks/official.py``: its
i2t_rerank (K1 = 15) and t2i_rerank (K1 = 20), then its acc_i2t2 / acc_t2i2 for the ranks, on the
float64 matrix its evaluation writes. The file ends in a script re-ranking the authors' own score
file (flickr1_stage1_d.npy); imported, that script runs on a small stand-in, and its printout, like
acc_i2t2's debugging line, is discarded. Without it, tests/official_rerank.py (a literal
transcription) stands in, and the record's "reference" says which.

The matrix is float32 sigmoid scores with a signal on the true pairs and saturation at the top,
so that its lists hold ties, as a sigmoid head's do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from itmkit.rerank import K_I2T, K_T2I, mtfn_rerank

from common import best_of, write_result

Lists = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # i2t lists, t2i lists, i2t ranks, t2i ranks


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


def reference_procedure(clone: Path | None) -> tuple[Callable[[np.ndarray], Lists], str]:
    """(the reference re-ranking of a matrix of 5 captions per image, in order; which reference it is)."""
    if clone is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from official_rerank import reference  # the literal transcription

        return (lambda sims: reference(sims, np.arange(sims.shape[1]) // 5, K_I2T, K_T2I),
                "re-implemented reference (tests/official_rerank.py: a transcription of rerank.py)")

    import official as official_code  # benchmarks/official.py

    with contextlib.redirect_stdout(io.StringIO()):  # the stand-in script's result lines
        code = official_code.mtfn_rerank(clone)

    def procedure(sims: np.ndarray) -> Lists:
        d = np.asarray(sims, dtype=np.float64)  # the official matrix: np.zeros((N, 5N)), float64
        i2t, t2i = code.i2t_rerank(d, K_I2T, 1), code.t2i_rerank(d, K_T2I, 1)  # K2: unused there
        with contextlib.redirect_stdout(io.StringIO()):  # acc_i2t2 prints 's' at image 197
            (_, (i2t_ranks, _)), (_, (t2i_ranks, _)) = code.acc_i2t2(i2t), code.acc_t2i2(t2i)
        return i2t, t2i, i2t_ranks, t2i_ranks

    return procedure, f"official: Wangt-CN/MTFN-RR-PyTorch-Code rerank.py from {clone}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("rerank_results.json")))
    parser.add_argument("--official", type=Path, help="a clone of https://github.com/Wangt-CN/MTFN-RR-PyTorch-Code:"
                                                       " time its own rerank.py")
    args = parser.parse_args(argv)
    if args.official is None:
        print("no --official clone: timed against the re-implemented reference", flush=True)
    reference, source = reference_procedure(args.official)

    sims = matrix(args.images)
    ties = int(np.count_nonzero(sims == 1.0))
    ours_seconds, ours = best_of(lambda: mtfn_rerank(sims), args.repeats)
    ref_seconds, ref = best_of(lambda: reference(sims), args.reference_repeats)
    i2t, t2i, i2t_rank, t2i_rank = ref
    equal = (np.array_equal(ours.i2t_top, i2t[:, :K_I2T]) and np.array_equal(ours.t2i_top, t2i[:K_T2I].T)
             and np.array_equal(ours.i2t_ranks, i2t_rank) and np.array_equal(ours.t2i_ranks, t2i_rank))
    result = {
        "matrix": list(sims.shape),
        "dtype": str(sims.dtype),
        "scores_saturated_to_1": ties,
        "k_i2t": K_I2T,
        "k_t2i": K_T2I,
        "reference": source,
        "seconds": round(ours_seconds, 2),
        "reference_seconds": round(ref_seconds, 2),
        "speedup": round(ref_seconds / ours_seconds, 1),
        "peak_mb": round(peak_bytes(lambda: mtfn_rerank(sims)) / 2**20),
        "reference_peak_mb": round(peak_bytes(lambda: reference(sims)) / 2**20),
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
