"""What the scoring benchmarks share: galleries as `itmkit eval` fills them, FLOP counts, the GEMM rate, peak memory."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from itmkit.build import Encoded
from itmkit.gallery import Gallery
from itmkit.types import Local

BATCH = 128  # encoding batch, as `itmkit eval` fills its galleries


def galleries(regions: torch.Tensor, fragments: torch.Tensor, lengths: torch.Tensor) -> tuple[Gallery, Gallery]:
    """Both sides as `itmkit eval` holds them: batches appended, captions shortest first, each batch cut to
    its longest caption; ``fragments`` (Nt, L, D) are the captions' word (or token) vectors."""
    image_side = Gallery.of(Encoded(Local(regions, torch.ones(regions.shape[:2], dtype=torch.bool))), batch=BATCH)
    texts = Gallery()
    order = torch.argsort(lengths, stable=True).tolist()
    for start in range(0, len(order), BATCH):
        rows = order[start:start + BATCH]
        width = int(lengths[rows].max())
        mask = torch.arange(width)[None] < lengths[rows][:, None]
        texts.append(Encoded(Local(fragments[rows, :width] * mask[..., None], mask)), rows)
    return image_side, texts


def flops_per_pair(fn, pairs: int) -> float:
    """Matrix-product FLOPs per pair of fn() (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / pairs


def gemm_gflops(rows: int, inner: int, outer: int, repeats: int = 10) -> float:
    """This machine's float32 GEMM rate at one shape, (rows x inner) @ (inner x outer): best of 5 timings."""
    a, b = torch.randn(rows, inner), torch.randn(inner, outer)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * rows * inner * outer / best / 1e9


def peak_mb() -> float:
    """This process's peak resident memory so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def block_arguments(parser: argparse.ArgumentParser, *, images: int, captions: int, reference_images: int,
                    reference_captions: int, repeats: int = 3) -> None:
    """The options every sub-block benchmark takes: its block, the reference's block, threads, repeats, output."""
    parser.add_argument("--images", type=int, default=images, help="images of the sub-block itmkit scores")
    parser.add_argument("--captions", type=int, default=captions, help="captions of the sub-block itmkit scores")
    parser.add_argument("--reference-images", type=int, default=reference_images,
                        help="images of the reference's block")
    parser.add_argument("--reference-captions", type=int, default=reference_captions)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default=None, help="default: benchmarks/<model>_results.json")


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(the shortest of ``repeats`` timings of fn(), its result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare_with_reference(result: dict, *, ours_pps: float, ours_flops: float, ref_pps: float, ref_flops: float,
                           gemm: float, difference: float) -> None:
    """Add the reference comparison to ``result``: speed-up, FLOP ratio, the GEMM-rate ceiling, the score difference."""
    result["reference_gflops"] = round(ref_pps * ref_flops / 1e9)
    # our pairs/s if every FLOP ran at the GEMM rate and nothing else took time
    result["ceiling_pairs_per_second"] = round(gemm * 1e9 / ours_flops)
    result["ceiling_speedup"] = round(gemm * 1e9 / ours_flops / ref_pps, 2)
    result["speedup"] = round(ours_pps / ref_pps, 2)
    result["flop_ratio"] = round(ref_flops / ours_flops, 2)
    result["max_abs_difference"] = difference
    result["full_block"]["reference_seconds_extrapolated"] = round(result["full_block"]["pairs"] / ref_pps)


def write_result(result: dict, out) -> None:
    """Print and write ``result``; refuse (after printing) scores that differ from the reference by 1e-5 or more."""
    print(json.dumps(result, indent=2))
    if "max_abs_difference" in result:
        assert result["max_abs_difference"] < 1e-5, f"scores differ from the reference by {result['max_abs_difference']}"
    out.write_text(json.dumps(result, indent=2) + "\n")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), so a record says which machine it was made on."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run_context(load_before: float) -> dict:
    """What a record says of the run beside its figures: threads, the load before and after, machine, date."""
    import os
    import platform

    return {
        "torch_threads": torch.get_num_threads(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "machine": f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }


def record(path, key: str, result: dict) -> None:
    """Write ``result`` under ``key`` in the JSON record ``path``, keeping its other keys."""
    from pathlib import Path

    path = Path(path)
    records = json.loads(path.read_text()) if path.exists() else {}
    records[key] = result
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"recorded {path} [{key}]")
