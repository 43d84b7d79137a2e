"""The whole ``itmkit eval`` process against the official SCAN scoring loop alone, on 500 images x 2,500
captions of real Flickr30K lengths.

    python benchmarks/eval_process.py --official ~/src/SCAN [--images 500] [--repeats 3]

itmkit's side is what a user runs: ``itmkit eval MODEL.safetensors --data DIR`` in a fresh process, timed
from its start to its exit (Python and torch start-up, reading the checkpoint and the data, encoding both
sides, scoring every pair, the R@K table). The model is SCAN t-i LSE with the Flickr30K recipe's sizes
(embed 1024, 300-d words, bi-GRU; random weights: time does not depend on them). The data is a precomp
split: random 36 x 2048 region features and the 250 real captions of ``shared/reference/pfan_sample``
repeated to five per image (mean 15 tokens, up to 31).

The official side is kuanghuei/SCAN's ``evaluation.shard_xattn_t2i`` from ``--official`` (imported with
the fixes of ``benchmarks/official.py``), timed alone on the same numbers of images and captions with
those caption lengths (unit vectors as encodings: what it computes does not depend on their values),
in this process: no start-up, no encoding, no metrics are counted on its side. Best of ``--repeats``
for each. Writes benchmarks/eval_process_results.json.

Beside them it records a lower bound on any exact float32 implementation on this machine (``floor``):
a fresh interpreter importing torch, plus the matrix products SCAN t-i cannot avoid (the region
encoder's fc, the caption bi-GRU, the word-region affinities of every pair) at this machine's GEMM
rate, plus one in-place pass (exp) over those affinities, which the softmax must make at least once.
The official loop's seconds over that bound is the largest speed-up any implementation could show here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

import official as official_code
from common import gemm_gflops, record, run_context

HERE = Path(__file__).parent
RESULTS = HERE / "eval_process_results.json"
SAMPLE = Path(os.environ.get("ITMKIT_SHARED", HERE.parents[1] / "shared")) / "reference"
REGIONS, FEATURES, DIM, PER_IMAGE = 36, 2048, 1024, 5
WORD_DIM = 300  # the recipe's word embedding, the bi-GRU's input
OPTIONS = dict(raw_feature_norm="clipped_l2norm", lambda_softmax=9.0, agg_func="LogSumExp", lambda_lse=6.0)


def write_inputs(folder: Path, images: int) -> tuple[Path, list[int]]:
    """The checkpoint and the data folder (written once); returns the checkpoint and the caption lengths."""
    from itmkit.build import DataPorts, build_model
    from itmkit.checkpoint import save_checkpoint
    from itmkit.data.precomp import write_split
    from itmkit.data.vocab import Vocabulary
    from itmkit.recipe import load_recipe

    vocab = Vocabulary.from_json(json.loads((SAMPLE / "f30k_precomp_vocab.json").read_text()))
    real = (SAMPLE / "pfan_sample" / "train_caps.txt").read_text().splitlines()
    captions = [real[i % len(real)] for i in range(images * PER_IMAGE)]
    checkpoint = folder / "scan_t2i_lse.safetensors"
    if not checkpoint.exists():
        model = build_model(load_recipe(HERE.parent / "recipes" / "scan_f30k_t2i_lse.toml"),
                            DataPorts(FEATURES, len(vocab), REGIONS), seed=0)
        save_checkpoint(checkpoint, model, vocab)
        features = np.random.default_rng(0).random((images, REGIONS, FEATURES), dtype=np.float32)
        write_split(folder / "data", "test", features=features, captions=captions)
    return checkpoint, [len(vocab.encode(c)) for c in captions]


def time_itmkit(checkpoint: Path, data: Path) -> float:
    """Wall seconds of ``itmkit eval`` in a fresh interpreter, start to exit."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "itmkit", "eval", str(checkpoint), "--data", str(data), "--json"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"itmkit eval failed:\n{done.stderr[-2000:]}")
    return seconds


def time_official(clone: Path, images: int, lengths: list[int]) -> float:
    """Seconds of the official shard_xattn_t2i on unit vectors of these sizes."""
    evaluation = official_code.scan_evaluation(clone)
    g = torch.Generator().manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(images, REGIONS, DIM, generator=g), dim=-1).numpy()
    captions = np.zeros((len(lengths), max(lengths), DIM), dtype=np.float32)  # evaluation.encode_data's layout
    for i, n in enumerate(lengths):
        captions[i, :n] = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=-1).numpy()
    with contextlib.redirect_stdout(io.StringIO()):  # its per-shard progress line
        start = time.perf_counter()
        evaluation.shard_xattn_t2i(regions, captions, lengths, types.SimpleNamespace(**OPTIONS), shard_size=128)
        return time.perf_counter() - start


def fp32_floor(images: int, lengths: list[int], repeats: int) -> dict:
    """A lower bound on the seconds of any exact float32 SCAN t-i evaluation of these sizes, here."""
    start_up = min(_seconds([sys.executable, "-c", "import torch"]) for _ in range(repeats))
    words = sum(lengths)
    flops = {  # 2 FLOPs per multiply-add
        "region_fc": 2 * images * REGIONS * FEATURES * DIM,
        "caption_bigru": 2 * words * 2 * 3 * (WORD_DIM + DIM) * DIM,  # 2 directions x 3 gates, input and hidden
        "affinities": 2 * images * REGIONS * words * DIM,  # <region, word> for every pair of every pair
    }
    gemm = gemm_gflops(4096, DIM, 4096)
    chunk = torch.rand(2**26)  # 256 MB: past the caches, as the affinities are
    pass_s = min(_timed(lambda: chunk.exp_()) for _ in range(repeats)) * images * REGIONS * words / chunk.numel()
    products_s = sum(flops.values()) / (gemm * 1e9)
    return {"import_torch_s": round(start_up, 2), "gemm_gflops": round(gemm),
            "gflop": {k: round(v / 1e9) for k, v in flops.items()}, "products_s": round(products_s, 2),
            "one_pass_over_affinities_s": round(pass_s, 2), "seconds": round(start_up + products_s + pass_s, 2)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _seconds(command: list[str]) -> float:
    return _timed(lambda: subprocess.run(command, check=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, help="a clone of https://github.com/kuanghuei/SCAN")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmkit-bench-eval-process"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.official is None:
        raise SystemExit("give --official PATH, a clone of https://github.com/kuanghuei/SCAN: this benchmark times"
                         " the official scoring loop itself")
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, lengths = write_inputs(args.work, args.images)
    ours = min(time_itmkit(checkpoint, args.work / "data") for _ in range(args.repeats))
    theirs = min(time_official(args.official, args.images, lengths) for _ in range(args.repeats))
    floor = fp32_floor(args.images, lengths, args.repeats)
    result = {
        "images": args.images, "captions": len(lengths),
        "caption_lengths": {"mean": round(float(np.mean(lengths)), 1), "max": max(lengths)},
        "itmkit_eval_process_s": round(ours, 2),
        "official_shard_xattn_t2i_s": round(theirs, 2),
        "speedup": round(theirs / ours, 2),
        "fp32_floor": floor,
        "ceiling_speedup": round(theirs / floor["seconds"], 2),
        "official": f"{args.official} (kuanghuei/SCAN evaluation.shard_xattn_t2i; fixes: "
                    + "; ".join(dict.fromkeys(why for _, _, why in official_code.SCAN_MODEL_FIXES
                                              + official_code.SCAN_EVALUATION_FIXES)) + ")",
        **run_context(load_before),
    }
    print(json.dumps(result, indent=2))
    record(RESULTS, "scan_t2i_lse_500", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
