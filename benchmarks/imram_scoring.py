"""IMRAM scoring speed against the official shard loop; SHAN's and CAAN's pairs/s and memory beside it.

The issue's setting: 1000 images x 5000 captions, 36 regions, d = 1024, caption lengths 8 to 20,
random unit vectors (what the encoders give), random weights. Ours is the block engine as `itmkit
eval` runs it (galleries filled in batches of 128, captions shortest first, then ``score_all`` with
the default CPU block budget). For IMRAM (Full, K = 3, lambda 9) the reference is the official
evaluation's loop (shards of 128 images and 128 captions, one caption at a time sliced to its length
and repeated over the shard, K steps of attention, cosine and the gated update over [query;
attended], both directions, the per-step matrices added), in the same process and threads; each
side is warmed up and timed best of three, and the scores are compared on the reference's slice.
SHAN and CAAN have no official code: their pairs/s and peak memory are recorded.

With ``--official PATH`` (a clone of https://github.com/HuiChen24/IMRAM) that loop is the official code
itself: evaluation.py's ``shard_xattn`` (model_mode full_IMRAM) calling model.py's
``xattn_score_Text_IMRAM`` / ``xattn_score_Image_IMRAM``, imported from the clone with the in-memory fix
of ``benchmarks/official.py`` (no ``.cuda()``), its four memory layers given our weights. Without it the
reference is the re-implementation of itmkit_imram/tests/official.py; the record says which one
(``reference.code``).

One model per process (peak RSS is the process's). Both galleries hold the full 1000 x 5000
encodings, so the peak memory includes them; but scoring the whole block with IMRAM K = 3 takes
hours on a 2-core CPU (each pair multiplies its memory by a D x 2D matrix in each update), so by
default a sub-block of it is scored and the full block's time extrapolated from pairs/s
(``--images 1000 --captions 5000 --repeats 1`` measures it). The load average over the minute
before the script starts says whether the machine was idle.

    python benchmarks/imram_scoring.py --official ~/src/IMRAM  # IMRAM, writes imram_results.json
    python benchmarks/imram_scoring.py --model shan --out benchmarks/shan_results.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from itmkit.build import DataPorts, Encoded, build_model
from itmkit.gallery import Gallery
from itmkit.recipe import parse_recipe
from itmkit.scoring import score_all
from itmkit.types import Local

import official
from common import (BATCH, best_of, block_arguments, compare_with_reference, flops_per_pair, galleries, gemm_gflops,
                    peak_mb, write_result)  # benchmarks/common.py

HERE = Path(__file__).parent
REGIONS, DIM = 36, 1024
MIN_LEN, MAX_LEN = 8, 20
REPEATS = 3
FULL = (1000, 5000)
STEPS, LAMBDA = 3, 9.0
SHARD = 128  # the official evaluation's shard (shard_xattn passes 128 whatever it is given)

HEAD = f"""
[recipe]
name = "bench"
embed_dim = {DIM}
[image]
encoder = {{ stage = "core.precomp" }}
[text]
encoder = {{ stage = "core.bigru" }}
[loss]
stage = "core.triplet"
"""
BRANCHES = {
    "imram": "".join(f"""
[[match]]
similarity = {{ stage = "imram.{side}", steps = {STEPS}, lambda_softmax = {LAMBDA} }}
aggregate = {{ stage = "imram.steps" }}
""" for side in ("t2i", "i2t")),
    "shan": """
[[match]]
similarity = { stage = "shan.hierarchy" }
""",
    "caan": """
[[match]]
similarity = { stage = "caan.attention" }
""",
}


def model(name: str):
    torch.manual_seed(0)
    return build_model(parse_recipe(HEAD + BRANCHES[name]), DataPorts(2048, 100, REGIONS)).eval()


def inputs(n_images: int, n_captions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit region vectors (Ni, 36, d), unit word vectors (Nt, 20, d) zero past each length, lengths (Nt,)."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.nn.functional.normalize(torch.randn(n_images, REGIONS, DIM, generator=g), dim=-1)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n_captions,), generator=g)
    words = torch.nn.functional.normalize(torch.randn(n_captions, MAX_LEN, DIM, generator=g), dim=-1)
    return regions, words * (torch.arange(MAX_LEN)[None] < lengths[:, None])[..., None], lengths


def full_galleries(n_images: int, n_captions: int) -> tuple[Gallery, Gallery]:
    """Galleries of the full block's size, filled batch by batch as `itmkit eval` fills them (never the whole
    block as one tensor): held while the sub-block is scored, so the peak memory is that of a full run."""
    images, texts = Gallery(), Gallery()
    for start in range(0, n_images, BATCH):
        r, _, _ = inputs(min(BATCH, n_images - start), 0, seed=start + 1)
        images.append(Encoded(Local(r, torch.ones(r.shape[:2], dtype=torch.bool))), list(range(start, start + len(r))))
    for start in range(0, n_captions, BATCH):
        _, w, n = inputs(0, min(BATCH, n_captions - start), seed=start + 1)
        n, order = n.sort()
        width = int(n.max())
        texts.append(Encoded(Local(w[order, :width], torch.arange(width)[None] < n[:, None])),
                     list(range(start, start + len(n))))
    return images, texts


def official_weights(m) -> dict:
    """Our two memory units' weights under the official names (linear_t2i, gate_t2i, linear_i2t, gate_i2t)."""
    units = {"t2i": m.branches[0].stages[0], "i2t": m.branches[1].stages[0]}
    return {f"{layer}_{side}": {"weight": getattr(u, layer).weight.detach(), "bias": getattr(u, layer).bias.detach()}
            for side, u in units.items() for layer in ("linear", "gate")}


Scores = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], np.ndarray]  # (regions, words, lengths) -> (Ni, Nt)


def official_scores(clone: str, m) -> Scores:
    """The official evaluation's Full-IMRAM loop from ``clone``, its model holding our memory units' weights."""
    evaluation = official.imram_evaluation(Path(clone))
    # Our stages' settings (the recipe above), as the official options: renormalize = false is
    # --no_IMRAM_norm, which every official script passes. The encoders are built but never called
    # (the loop is given encoded fragments), so the vocabulary's size does not matter.
    opt = types.SimpleNamespace(model_mode="full_IMRAM", iteration_step=STEPS, lambda_softmax=LAMBDA,
                                raw_feature_norm="clipped_l2norm", no_IMRAM_norm=True, data_name="f30k_precomp",
                                img_dim=2048, embed_size=DIM, precomp_enc_type="basic", no_imgnorm=False,
                                vocab_size=1, word_dim=300, num_layers=1, bi_gru=True, no_txtnorm=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor's banner
        model = evaluation.SCAN(opt)
    state = {f"{layer}.{name}": value
             for layer, params in official_weights(m).items() for name, value in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("img_enc.", "txt_enc.")) for k in missing), (missing, unexpected)
    model.eval()  # as its evalrank does; the scores also read self.training

    def scores(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        images = regions.numpy()
        # images_fc and caption_ht (its encoders' global vectors) are only cast, never used by the
        # IMRAM scores: the images' mean and zeros stand in for them.
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # its shard-count line
            return evaluation.shard_xattn(model, images.mean(1), images, np.zeros((len(words), DIM), np.float32),
                                          words.numpy(), [int(n) for n in lengths], opt, shard_size=SHARD)

    return scores


def reimplemented_scores(m) -> Scores:
    """The re-implementation of the official loop (itmkit_imram/tests/official.py) with the same weights."""
    from itmkit_imram.tests import official as reimplemented

    weights = official_weights(m)
    return lambda regions, words, lengths: reimplemented.shard_scores(regions, words, lengths, mode="full", steps=STEPS,
                                                                      smooth=LAMBDA, weights=weights, shard=SHARD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BRANCHES), default="imram")
    block_arguments(parser, images=100, captions=500, reference_images=64, reference_captions=16, repeats=REPEATS)
    parser.add_argument("--official", help="a clone of https://github.com/HuiChen24/IMRAM: time its own evaluation loop"
                                           " (IMRAM only)")
    args = parser.parse_args()
    if args.official and args.model != "imram":
        parser.error(f"--official: {args.model} has no official code to time; IMRAM only")
    if args.model == "imram" and args.official is None:
        print("no --official clone: IMRAM is timed against the re-implemented reference", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / f"{args.model}_results.json"

    load_at_start = os.getloadavg()[0]  # before this script's own threads count in the load
    m = model(args.model)
    held = full_galleries(*FULL)  # kept alive for the peak memory, as a real run holds them
    regions, words, lengths = inputs(max(args.images, args.reference_images, 8),
                                     max(args.captions, args.reference_captions, 32))
    sub = galleries(regions[:args.images], words[:args.captions], lengths[:args.captions])
    with torch.no_grad():
        score_all(m, *galleries(regions[:8], words[:32], lengths[:32]))  # warm-up
        ours_s, (sims, _) = best_of(lambda: score_all(m, *sub), args.repeats)
        ci, ct = min(args.images, 16), min(args.captions, 64)
        ours_flops = flops_per_pair(lambda: score_all(m, *galleries(regions[:ci], words[:ct], lengths[:ct])), ci * ct)
    ours_peak = peak_mb()
    ours_pps = args.images * args.captions / ours_s
    full_pairs = FULL[0] * FULL[1]
    measured_full = (args.images, args.captions) == FULL
    result = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
                   f" torch {torch.__version__}",
        "sizes": {"regions": REGIONS, "d": DIM, "caption_words": [MIN_LEN, MAX_LEN],
                  **({"steps": STEPS, "lambda_softmax": LAMBDA, "mode": "full"} if args.model == "imram" else {})},
        "stages": {b["similarity"]["stage"]: b["similarity"] for b in m.recipe.to_dict()["match"]},
        "command": "python benchmarks/imram_scoring.py " + " ".join(sys.argv[1:]),
        "ours": {"block": [args.images, args.captions], "repeats": args.repeats,
                 "pairs_per_second": round(ours_pps, 1), "seconds": round(ours_s, 2),
                 "peak_rss_mb_with_full_galleries": round(ours_peak), "mflop_per_pair": round(ours_flops / 1e6, 1)},
        "galleries_held": {"images": len(held[0]), "captions": len(held[1])},
        "load_average_at_start": round(load_at_start, 2),
        "machine_was_idle": load_at_start < 1.0,
        "full_block": {"pairs": full_pairs, "measured": measured_full,
                       "ours_seconds" + ("" if measured_full else "_extrapolated"): round(full_pairs / ours_pps)},
    }
    if args.model == "imram":
        ri, rt = args.reference_images, args.reference_captions
        if args.official:
            score, code = official_scores(args.official, m), ("official: HuiChen24/IMRAM evaluation.shard_xattn"
                                                              f" (full_IMRAM) from {args.official}")
        else:
            score, code = reimplemented_scores(m), "re-implemented reference (itmkit_imram/tests/official.py)"

        def reference():
            return score(regions[:ri], words[:rt], lengths[:rt])

        with torch.no_grad():
            score(regions[:4], words[:2], lengths[:2])  # warm-up
            ref_s, ref = best_of(reference, args.repeats)
            ref_flops = flops_per_pair(reference, ri * rt)
        ref_pps = ri * rt / ref_s
        result["reference"] = {"code": code, "block": [ri, rt], "pairs_per_second": round(ref_pps, 1),
                               "seconds": round(ref_s, 2), "mflop_per_pair": round(ref_flops / 1e6, 1)}
        gemm = gemm_gflops(8192, DIM, DIM)  # the memory update's shape, (pair fragments x D) @ (D x D)
        result["gemm_gflops"] = round(gemm)
        result["ours_gflops"] = round(ours_pps * ours_flops / 1e9)
        compare_with_reference(result, ours_pps=ours_pps, ours_flops=ours_flops, ref_pps=ref_pps, ref_flops=ref_flops,
                               gemm=gemm, difference=float(np.abs(sims[:ri, :rt] - ref).max()))
    write_result(result, out)

if __name__ == "__main__":
    main()
