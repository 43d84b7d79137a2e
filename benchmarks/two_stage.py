"""Two-stage retrieval against full scoring on a COCO-5K-sized built-in test set (5,000 images, 25,000
captions, protocol coco-5k): the cross-attention model scoring every pair, against a first stage's
shortlist of K re-scored by the same model, in one process, same threads, warm, best of ``--repeats``.

    python benchmarks/two_stage.py --second SCAN.safetensors --first GPO.safetensors [--ks 10,20,50,100]
        [--data DIR] [--repeats 3] [--full-repeats 1] [--name coco5k_scan]

Writes benchmarks/two_stage_results.json (under ``--name``) and, with ``--plot``, the R@1 / time
against K figure of docs/retrieval.md (matplotlib, the ``bench`` extra). The test set is the built-in
generator's test split at 5,000 images (its first 1,000 are the usual test images; none is a training
image), written once into ``--data``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.shapes import write_shapes
from itmkit.datasets import open_named_split
from itmkit.evaluate import similarity_matrix
from itmkit.evaluation import protocol_metrics
from itmkit.twostage import evaluate_two_stage

from common import peak_mb

RESULTS = Path(__file__).with_name("two_stage_results.json")
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "images" / "two_stage_k.png"
GOAL_SPEEDUP, GOAL_R1_LOSS = 15.0, 0.5


def test_set(folder: Path) -> Path:
    if not (folder / "shapes.json").exists():
        write_shapes(folder, seed=0, sizes={"test": 5000})
    return folder


def best(fn, repeats: int):
    """(seconds of the fastest of ``repeats`` calls, the last result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--second", required=True, help="the re-scoring checkpoint (SCAN t-i, SGRAF)")
    parser.add_argument("--first", required=True, help="the first stage's checkpoint (GPO, VSE++)")
    parser.add_argument("--data", default="/tmp/itmkit-bench-coco5k", help="where the 5K test set is written once")
    parser.add_argument("--ks", default="5,10,20,50,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-repeats", type=int, default=1)
    parser.add_argument("--name", default="coco5k_scan")
    parser.add_argument("--protocol", default="coco-5k", help="f30k-1k for a quick trial on a smaller --data")
    parser.add_argument("--plot", action="store_true", help="also draw docs/images/two_stage_k.png")
    parser.add_argument("--replot", action="store_true", help="only draw the figure of --name's recorded results")
    args = parser.parse_args(argv)
    if args.replot:
        import json

        plot(json.loads(RESULTS.read_text())[args.name], FIGURE)
        return 0

    torch.set_grad_enabled(False)
    folder = test_set(Path(args.data))
    split = open_named_split(folder, "test")
    second, first = load_checkpoint(args.second), load_checkpoint(args.first)
    second.model.eval()
    first.model.eval()
    protocol = args.protocol
    load_before = load_average()

    def two_stage(k: int):
        return evaluate_two_stage((second.model, second.vocab), (first.model, first.vocab), split, protocol, k)

    two_stage(10)  # warm: page cache, allocator, faiss and torch kernels
    rows = []
    for k in [int(k) for k in args.ks.split(",")]:
        seconds, result = best(lambda: two_stage(k), args.repeats)
        rows.append({"k": k, "seconds": round(seconds, 2), "stages": {s: round(v, 2) for s, v in result.seconds.items()},
                     "metrics": {m: round(v, 3) for m, v in result.metrics.items()}})
        print(f"K={k}: {seconds:.1f} s, R@1 i2t {result.metrics['i2t_r1']:.2f} t2i {result.metrics['t2i_r1']:.2f},"
              f" recall@K {result.metrics['i2t_shortlist_recall']:.2f} / {result.metrics['t2i_shortlist_recall']:.2f},"
              f" stages {rows[-1]['stages']}",
              flush=True)

    def full():
        sims, _ = similarity_matrix(second.model, second.vocab, split)
        return protocol_metrics(sims, protocol, split.caption_images)

    full_seconds, full_metrics = best(full, args.full_repeats)
    print(f"full: {full_seconds:.1f} s, R@1 i2t {full_metrics['i2t_r1']:.2f} t2i {full_metrics['t2i_r1']:.2f}", flush=True)
    first_alone = protocol_metrics(similarity_matrix(first.model, first.vocab, split)[0], protocol, split.caption_images)

    for row in rows:
        row["speedup"] = round(full_seconds / row["seconds"], 1)
        row["r1_loss"] = {d: round(full_metrics[f"{d}_r1"] - row["metrics"][f"{d}_r1"], 3) for d in ("i2t", "t2i")}
        row["meets_goal"] = row["speedup"] >= GOAL_SPEEDUP and max(row["r1_loss"].values()) <= GOAL_R1_LOSS
    meeting = [row["k"] for row in rows if row["meets_goal"]]
    result = {
        "test_set": f"built-in generator, test split at {split.num_images} images x {split.num_captions} captions",
        "protocol": protocol,
        "second_stage": args.second,
        "second_stage_recipe": second.model.recipe.info.name,
        "first_stage": args.first,
        "first_stage_recipe": first.model.recipe.info.name,
        "full_seconds": round(full_seconds, 2),
        "full_metrics": {m: round(v, 3) for m, v in full_metrics.items()},
        "first_stage_alone_metrics": {m: round(v, 3) for m, v in first_alone.items()},
        "two_stage": rows,
        "goal": f">= {GOAL_SPEEDUP}x faster end to end at <= {GOAL_R1_LOSS} lower R@1 in either direction",
        "ks_meeting_goal": meeting,
        "repeats": args.repeats,
        "full_repeats": args.full_repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(load_average(), 2),
        "peak_rss_mb": round(peak_mb()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    record(args.name, result)
    if args.plot:
        plot(result, FIGURE)
    return 0


def record(name: str, result: dict) -> None:
    import json

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[name] = result
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"recorded {RESULTS} [{name}]")


def plot(result: dict, path: Path) -> None:
    """R@1 of both directions and the end-to-end time against K, full scoring as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [row["k"] for row in result["two_stage"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    for d, colour, name in (("i2t", "tab:blue", "image→text"), ("t2i", "tab:orange", "text→image")):
        left.plot(ks, [row["metrics"][f"{d}_r1"] for row in result["two_stage"]], "o-", color=colour,
                  label=f"{name}, two-stage")
        left.axhline(result["full_metrics"][f"{d}_r1"], color=colour, linestyle="--", label=f"{name}, full scoring")
        left.axhline(result["first_stage_alone_metrics"][f"{d}_r1"], color=colour, linestyle=":",
                     label=f"{name}, first stage alone")
    left.set(xscale="log", xlabel="shortlist K", ylabel="R@1 (%)", title="R@1 against K")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=2)
    right.plot(ks, [row["seconds"] for row in result["two_stage"]], "o-", color="tab:green", label="two-stage")
    right.axhline(result["full_seconds"], color="tab:red", linestyle="--", label="full scoring")
    right.set(xscale="log", yscale="log", xlabel="shortlist K", ylabel="seconds, end to end",
              title="time against K")
    right.legend(fontsize=7)
    fig.suptitle(f"{result['second_stage_recipe']} re-scoring {result['first_stage_recipe']}'s shortlist,"
                 f" {result['test_set'].split(', ')[1]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
