"""Cross-attention scoring speed: itmkit's block engine against the official per-caption loop.

Scores a gallery of Ni images x Nt captions (36 regions, d = 1024, caption lengths 8 to 20,
random unit vectors) with each model, the way `itmkit eval` does (``score_all``), and with a
faithful reference of the official algorithm (SCAN's ``shard_xattn_*``: shards of 128 images,
one caption at a time sliced to its length and repeated over the shard). The reference is
timed on a slice of the captions (it is slow; its pairs per second do not depend on how many
captions it sees) and its scores are checked against ours on that slice. Each measurement runs
in its own process, so the peak resident memory reported is that run's own.

    python benchmarks/scoring.py                # the full 1000 x 5000 block; writes results.json
    python benchmarks/scoring.py --images 200 --captions 1000 --reference-captions 100
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from itmkit.build import DataPorts, Encoded, build_model
from itmkit.ops import l2norm
from itmkit.recipe import parse_recipe
from itmkit.scoring import score_all
from itmkit.types import Local, lengths_to_mask

HERE = Path(__file__).parent
SHARD = 128  # the official evaluation's image shard

BASE = """
[recipe]
name = "bench"
embed_dim = 1024
[image]
encoder = {{ stage = "core.precomp" }}
[text]
encoder = {{ stage = "core.bigru" }}
{match}
[loss]
stage = "core.triplet"
"""

MODELS = {
    "scan.t2i + LSE": """
[[match]]
cross = { stage = "scan.t2i", lambda_softmax = 9.0 }
similarity = { stage = "core.cosine" }
aggregate = { stage = "scan.lse", lambda_lse = 6.0 }
""",
    "scan.i2t + AVG": """
[[match]]
cross = { stage = "scan.i2t", lambda_softmax = 4.0 }
similarity = { stage = "core.cosine" }
aggregate = { stage = "core.mean" }
""",
}


def gallery(n_images: int, n_captions: int, seed: int = 0) -> tuple[Encoded, Encoded]:
    g = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(n_images, 36, 1024, generator=g))
    lengths = torch.randint(8, 21, (n_captions,), generator=g)
    captions = l2norm(torch.randn(n_captions, 20, 1024, generator=g))
    mask = lengths_to_mask(lengths, 20)
    captions = captions * mask.unsqueeze(-1)
    return (Encoded(Local(images, torch.ones(n_images, 36, dtype=torch.bool))),
            Encoded(Local(captions, mask)))


# ----------------------------------------------------------------- the official algorithm


def official_attention(query, context, smooth, eps=1e-8):
    """func_attention with clipped_l2norm: query (B, Lq, d), context (B, Lc, d)."""
    attn = torch.bmm(context, query.transpose(1, 2))
    attn = F.leaky_relu(attn, 0.1)
    attn = attn / (attn.pow(2).sum(dim=2, keepdim=True).sqrt() + eps)
    b, lc, lq = attn.shape
    attn = torch.softmax(attn.transpose(1, 2).contiguous().view(b * lq, lc) * smooth, dim=1).view(b, lq, lc)
    return torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous()).transpose(1, 2)


def official_cosine(a, b, eps=1e-8):
    return (a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2)).clamp(min=eps)


def reference_scores(name: str, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """shard_xattn_t2i / _i2t: for each shard of 128 images, for each caption, the official steps."""
    out = torch.zeros(images.shape[0], captions.shape[0])
    for s0 in range(0, images.shape[0], SHARD):
        shard = images[s0:s0 + SHARD]
        for i in range(captions.shape[0]):
            cap = captions[i, : int(lengths[i])].unsqueeze(0).repeat(shard.shape[0], 1, 1)
            if name.startswith("scan.t2i"):
                row = official_cosine(cap, official_attention(cap, shard, 9.0))
                out[s0:s0 + SHARD, i] = torch.log(torch.exp(row * 6.0).sum(1)) / 6.0
            else:
                row = official_cosine(shard, official_attention(shard, cap, 4.0))
                out[s0:s0 + SHARD, i] = row.mean(1)
    return out


# ------------------------------------------------------------------------------ the runs


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(name: str, n_images: int, n_captions: int, queue) -> None:
    torch.manual_seed(0)
    model = build_model(parse_recipe(BASE.format(match=MODELS[name])), DataPorts(2048, 100, 36)).eval()
    images, texts = gallery(n_images, n_captions)
    start = time.perf_counter()
    sims, _ = score_all(model, images, texts)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "pairs_per_second": n_images * n_captions / seconds, "peak_mb": _peak_mb(),
               "sims": sims})  # numpy: a torch tensor would travel by shared memory and die with the child


def run_reference(name: str, n_images: int, n_captions: int, n_ref: int, queue) -> None:
    images, texts = gallery(n_images, n_captions)
    captions = texts.local.feats[:n_ref]
    lengths = texts.local.lengths[:n_ref]
    with torch.no_grad():
        start = time.perf_counter()
        sims = reference_scores(name, images.local.feats, captions, lengths)
        seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "pairs_per_second": n_images * n_ref / seconds, "peak_mb": _peak_mb(),
               "sims": sims.numpy()})


def in_process(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--reference-captions", type=int, default=250)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()

    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
                          f" torch {torch.__version__}", "images": args.images, "captions": args.captions,
               "reference_captions": args.reference_captions, "models": {}}
    for name in args.models:
        ours = in_process(run_ours, name, args.images, args.captions)
        ref = in_process(run_reference, name, args.images, args.captions, args.reference_captions)
        diff = float(abs(ours["sims"][:, : args.reference_captions] - ref["sims"]).max())
        row = {
            "ours_pairs_per_second": round(ours["pairs_per_second"]),
            "ours_seconds": round(ours["seconds"], 1),
            "ours_peak_mb": round(ours["peak_mb"]),
            "reference_pairs_per_second": round(ref["pairs_per_second"]),
            "reference_peak_mb": round(ref["peak_mb"]),
            "speedup": round(ours["pairs_per_second"] / ref["pairs_per_second"], 1),
            "max_abs_difference": diff,
        }
        results["models"][name] = row
        print(f"{name}: {row}", flush=True)
        assert diff < 1e-5, f"{name}: scores differ from the reference by {diff}"
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
