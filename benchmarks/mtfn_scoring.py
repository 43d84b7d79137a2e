"""MTFN scoring speed: itmkit's block engine with mtfn.fusion against the official evaluation loop.

The paper's widths (Wang et al. 2019, option/FusionNoattn_baseline.yaml): image vectors of 2048 (the
region mean), sentence vectors of 2400 (the uni-skip state), x_v, x_t and z of 1024, R = 20, random
weights and random vectors. Both sides start from the same precomputed vectors (the official
validate() would run the region mean and the GRU inside every block; neither side is charged for them):

- ours: `itmkit eval`'s engine, ``score_all`` over galleries of the pooled vectors with the default CPU
  block budget; mtfn.fusion takes its bilinear form (no activation or dropout after the sum over r),
  folded into one (1025 x 1025) matrix when that is cheaper (it is, for this block). The unfolded
  bilinear form (one product of width R * dim_mm = 20480) is timed too, as ``ours_unfolded``.
- the reference: engine.validate's loop, batches of 128 images x batches of 128 captions, each block
  through Core_Fusion (the R products (Bv, Bt, 1024) stacked and summed) and _classif. With
  ``--official PATH`` (a clone of https://github.com/Wangt-CN/MTFN-RR-PyTorch-Code) the model is the
  official model.py's FusionNoAtt itself, built from the clone's option/FusionNoattn_baseline.yaml and
  called as validate calls it (imported by ``benchmarks/official.py``: its byte-order mark dropped;
  seq2vec, the skip-thoughts GRU, stubbed to an identity since the sentence vectors are given; each
  image vector given as a single "region", whose mean is itself). validate itself is not run: it is
  written for Flickr30K's 1014 x 5070 validation set (sizes fixed in its code), takes region features
  and token ids from a data loader, moves blocks with ``.cuda()``, and ends in metrics and
  tensorboard logging; its loop is the two lines of ``reference`` below. Without ``--official`` the
  plugin's transcription of model.py (itmkit_mtfn.tests.official) stands in; the record's
  "reference" says which.

Both run in this process with the same threads, warmed up, best of three, with the same weights (ours,
loaded into the reference's layers); the scores are compared on the reference's block. The reference
on the whole 1000 x 5000 block takes minutes per run on this CPU, so by default it scores a sub-block
(--reference-images x --reference-captions, whole 128 x 128 batches) and its full-block time is
extrapolated from pairs/s.

    python benchmarks/mtfn_scoring.py --official ~/src/MTFN-RR-PyTorch-Code   # writes benchmarks/mtfn_results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import best_of, peak_mb, write_result  # benchmarks/common.py

from itmkit.build import DataPorts, Encoded, build_model
from itmkit.recipe import parse_recipe
from itmkit.scoring import score_all
from itmkit_mtfn.tests import official

HERE = Path(__file__).parent
DIM_V, DIM_T, DIM_H, DIM_MM, RANK = 2048, 2400, 1024, 1024, 20
BATCH = 128  # engine.validate's batches (train.py's batch_size)

RECIPE = f"""
[recipe]
name = "bench-mtfn"
embed_dim = {DIM_MM}
[image]
encoder = {{ stage = "core.raw" }}
pool = {{ stage = "core.mean" }}
[text]
encoder = {{ stage = "mtfn.skipthoughts", word_dim = 8, hidden_dim = {DIM_T} }}
pool = {{ stage = "core.last" }}
[[match]]
similarity = {{ stage = "mtfn.fusion", rank = {RANK}, dim_hv = {DIM_H}, dim_ht = {DIM_H}, dim_mm = {DIM_MM} }}
[loss]
stage = "core.triplet"
"""


def models(clone: Path | None) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(our model, the reference's score of an image block x a caption block, which reference it is): random
    fusion weights, ours, loaded into the reference's FusionNoAtt (eval mode).

    With ``clone`` the reference is the official model.py's FusionNoAtt, built from the clone's
    option/FusionNoattn_baseline.yaml and called as engine.validate calls it, ``model(images, captions)``: its
    forward takes the mean over the regions (here one "region", the precomputed image vector: the mean of one
    is the vector) and the skip-thoughts vector (stubbed to an identity: the sentence vectors are given), then
    Core_Fusion and _classif. Without it, the plugin's transcription (itmkit_mtfn.tests.official) stands in.
    """
    torch.manual_seed(0)
    ours = build_model(parse_recipe(RECIPE), DataPorts(DIM_V, 10)).eval()
    head = ours.branches[0].stages[0]
    with torch.no_grad():  # a 10 times larger classifier: scores spread over (0.1, 0.9), not (0.45, 0.58)
        head.linear_classif.weight.mul_(10)
    if clone is None:
        theirs = official.FusionNoAtt(official.yaml_options(DIM_V, DIM_T, DIM_H, DIM_MM, RANK), 10, 8).eval()
        score, source = theirs.score_vectors, ("re-implemented reference (itmkit_mtfn.tests.official: a transcription"
                                               " of model.py's FusionNoAtt)")
    else:
        import yaml

        import official as official_code  # benchmarks/official.py

        options = yaml.safe_load((clone / "option" / "FusionNoattn_baseline.yaml").read_text())["model"]
        widths = {k: options["fusion"][k] for k in ("dim_v", "dim_t", "dim_hv", "dim_ht", "dim_mm", "R")}
        if widths != dict(dim_v=DIM_V, dim_t=DIM_T, dim_hv=DIM_H, dim_ht=DIM_H, dim_mm=DIM_MM, R=RANK):
            raise SystemExit(f"{clone}: FusionNoattn_baseline.yaml's widths {widths} are not the benchmark's")
        theirs = official_code.mtfn_model(clone).FusionNoAtt(options, []).eval()
        score = lambda v, t: theirs(v[:, None], t)  # noqa: E731 - the (B, 1, dim_v) "regions" of one vector each
        source = f"official: Wangt-CN/MTFN-RR-PyTorch-Code model.py FusionNoAtt from {clone}"
    with torch.no_grad():  # the fused (R * dim_mm) projections are list_linear_*[r], r = 0 .. R - 1, stacked
        for name in ("linear_v", "linear_t"):
            getattr(theirs.fusion, name).load_state_dict(getattr(head, name).state_dict())
        theirs.linear_classif.load_state_dict(head.linear_classif.state_dict())
        for side in ("hv", "ht"):
            fused = getattr(head, f"linear_{side}")
            for r, layer in enumerate(getattr(theirs.fusion, f"list_linear_{side}")):
                layer.weight.copy_(fused.weight[r * DIM_MM:(r + 1) * DIM_MM])
                layer.bias.copy_(fused.bias[r * DIM_MM:(r + 1) * DIM_MM])
    return ours, score, source


@torch.no_grad()
def reference(score, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """engine.validate's loop: every (128 images) x (128 captions) block scored by the model."""
    out = torch.zeros(len(images), len(texts))
    for i in range(0, len(images), BATCH):
        for t in range(0, len(texts), BATCH):
            out[i:i + BATCH, t:t + BATCH] = score(images[i:i + BATCH], texts[t:t + BATCH])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--reference-images", type=int, default=256)
    parser.add_argument("--reference-captions", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "mtfn_results.json")
    parser.add_argument("--official", type=Path, help="a clone of https://github.com/Wangt-CN/MTFN-RR-PyTorch-Code:"
                                                       " time its own model.py's FusionNoAtt")
    args = parser.parse_args()
    if args.official is None:
        print("no --official clone: timed against the re-implemented reference", flush=True)
    load = os.getloadavg()[0]
    ours, score, source = models(args.official)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.images, DIM_V, generator=g)  # region means of non-negative features
    texts = torch.rand(args.captions, DIM_T, generator=g) * 2 - 1  # GRU states in (-1, 1)

    def run_ours():
        return score_all(ours, Encoded(None, images), Encoded(None, texts))[0]

    with torch.no_grad():
        run_ours()  # warm-up
        seconds, sims = best_of(run_ours, args.repeats)
    ours_peak = peak_mb()
    head = ours.branches[0].stages[0]
    head.folded_is_cheaper = lambda *sizes: False  # the bilinear form of width R * dim_mm, unfolded
    with torch.no_grad():
        wide_seconds, wide_sims = best_of(run_ours, args.repeats)
    del head.folded_is_cheaper
    ni, nt = args.reference_images, args.reference_captions
    reference(score, images[:BATCH], texts[:BATCH])  # warm-up
    ref_seconds, ref_sims = best_of(lambda: reference(score, images[:ni], texts[:nt]), args.repeats)
    pairs = args.images * args.captions
    ours_pps, ref_pps = pairs / seconds, ni * nt / ref_seconds
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "load_average_1min_at_start": round(load, 2),
        "widths": {"dim_v": DIM_V, "dim_t": DIM_T, "dim_hv": DIM_H, "dim_ht": DIM_H, "dim_mm": DIM_MM, "R": RANK},
        "inputs": "precomputed image (region mean) and sentence (GRU state) vectors on both sides",
        "full_block": {"images": args.images, "captions": args.captions, "pairs": pairs,
                       "ours_seconds": round(seconds, 2),
                       "reference_seconds_extrapolated": round(pairs / ref_pps)},
        "reference_block": {"images": ni, "captions": nt, "seconds": round(ref_seconds, 2)},
        "ours_pairs_per_second": round(ours_pps),
        "ours_unfolded_pairs_per_second": round(pairs / wide_seconds),
        "unfolded_vs_folded_max_abs_difference": float(abs(wide_sims - sims).max()),
        "reference": source,
        "reference_pairs_per_second": round(ref_pps),
        "speedup": round(ours_pps / ref_pps, 1),
        "ours_peak_mb_before_reference": round(ours_peak),
        "peak_mb": round(peak_mb()),
        "max_abs_difference": float((torch.as_tensor(sims[:ni, :nt]) - ref_sims).abs().max()),
        "score_range": [round(float(ref_sims.min()), 3), round(float(ref_sims.max()), 3)],
        "timing": f"warm, best of {args.repeats}, same process and threads",
        "run_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
