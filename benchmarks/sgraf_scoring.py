"""SGRAF scoring speed: itmkit's block engine against the official per-caption loop, for SGR and SAF.

Same gallery as ``scoring.py`` (36 regions, d = 1024, caption lengths 8 to 20, random unit
vectors), scored by an SGRAF model (sim_dim 256, 3 SGR steps) with random weights in the
official layout: once the way `itmkit eval` does (galleries, ``score_all``), once by the official
evaluation (``shard_attn_scores``: shards of 100 images and 100 captions, one caption at a time
repeated over the shard's images). The reference runs on the first captions only, timed best of
three, and its scores are checked against ours there. Each run is its own process.

With ``--official PATH`` (a clone of https://github.com/Paranioar/SGRAF) the reference is the official
code itself: evaluation.py's ``shard_attn_scores`` with the official ``SGRAF`` model, both imported from
the clone with the in-memory fixes of ``benchmarks/official.py`` (``//`` for a float slice index, no
``.cuda()``); the same random sim_enc weights go into the official model's ``sim_enc`` (their own
key names) and, renamed by the importer's key map, into ours. Without it the reference is the
re-implementation of the plugin's tests/official.py. Every row says which reference it was timed against.

Both sides spend most of their time in matrix products, so the script also counts each side's
matrix-product FLOPs per pair (torch's FlopCounterMode, on the reference's captions) and times
this machine's GEMM at the shape of SGRAF's largest product: ``ceiling`` is the pairs per second
our scoring would reach if every counted FLOP ran at that rate and nothing else took time.

    python benchmarks/sgraf_scoring.py --official ~/src/SGRAF     # 1000 x 5000; writes sgraf_results.json
    python benchmarks/sgraf_scoring.py --images 200 --captions 500 --reference-captions 20 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
import types
from pathlib import Path

import numpy as np
import torch

from scoring import DIM, REGIONS, caption, caption_lengths, comparison, galleries, image_feats, in_process, peak_mb
from torch.utils.flop_counter import FlopCounterMode

import official
from common import gemm_gflops, run_context  # benchmarks/common.py

from itmkit.build import DataPorts, Encoded, build_model
from itmkit.gallery import Gallery
from itmkit.recipe import parse_recipe
from itmkit.scoring import score_all
from itmkit_sgraf.importer import rename_similarity
from itmkit_sgraf.tests.fixtures import similarity_state
from itmkit_sgraf.tests.official import forward_sim

HERE = Path(__file__).parent
SHARD = 100  # the official SGRAF evaluation's shard
SIM_DIM, STEPS = 256, 3
# The reference's best of three: this 2-core machine's speed drifts by tens of percent from
# minute to minute, and a slow moment in the reference would flatter our speed-up.
REFERENCE_REPEATS = 3

RECIPE = """
[recipe]
name = "bench-sgraf"
embed_dim = 1024
[image]
encoder = {{ stage = "core.precomp" }}
pool = {{ stage = "sgraf.visual_sa" }}
[text]
encoder = {{ stage = "core.bigru" }}
pool = {{ stage = "sgraf.text_sa" }}
[[match]]
cross = {{ stage = "sgraf.t2i" }}
similarity = {{ stage = "sgraf.vector", sim_dim = {sim_dim} }}
aggregate = {{ stage = "sgraf.{module}"{steps} }}
[loss]
stage = "core.triplet"
"""

MODULES = ("SGR", "SAF")


def official_weights(module: str) -> dict[str, torch.Tensor]:
    return similarity_state(embed=DIM, sim_dim=SIM_DIM, regions=REGIONS, module=module, steps=STEPS, seed=0)


def sgraf_model(module: str):
    steps = f", steps = {STEPS}" if module == "SGR" else ""
    recipe = parse_recipe(RECIPE.format(sim_dim=SIM_DIM, module=module.lower(), steps=steps))
    model = build_model(recipe, DataPorts(2048, 100, REGIONS)).eval()
    weights = {rename_similarity(k): v for k, v in official_weights(module).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith(("image.encoder", "text.encoder")) for k in missing)
    return model


@torch.no_grad()
def pooled(model, images: Gallery, texts: Gallery) -> tuple[Gallery, Gallery]:
    """Galleries with each tower's pool applied, as encoding through the model would give them."""
    out = []
    for gallery, pool in ((images, model.image.pool), (texts, model.text.pool)):
        g = Gallery()
        for part in gallery.parts:
            local = part.data.local
            g.append(Encoded(local, pool(local)), gallery.ids[part.start:part.start + part.size])
        out.append(g)
    return out[0], out[1]


def run_ours(module: str, n_images: int, n_captions: int, queue) -> None:
    model = sgraf_model(module)
    images, texts = pooled(model, *galleries(n_images, n_captions))
    start = time.perf_counter()
    sims, _ = score_all(model, images, texts)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "pairs_per_second": n_images * n_captions / seconds, "peak_mb": peak_mb(),
               "sims": sims})


def run_reference(module: str, n_images: int, n_captions: int, n_ref: int, queue) -> None:
    sd = official_weights(module)
    images, captions, lengths = reference_inputs(n_images, n_captions, n_ref)
    seconds = float("inf")
    with torch.no_grad():
        for _ in range(REFERENCE_REPEATS):
            start = time.perf_counter()
            sims = torch.cat([forward_sim(sd, images[s:s + SHARD], captions, lengths, module_name=module,
                                          sgr_step=STEPS) for s in range(0, n_images, SHARD)])
            seconds = min(seconds, time.perf_counter() - start)
    queue.put({"seconds": seconds, "pairs_per_second": n_images * n_ref / seconds, "peak_mb": peak_mb(),
               "sims": sims.numpy()})


def official_sgraf(clone: str, module: str) -> tuple[types.ModuleType, object, types.SimpleNamespace]:
    """(the official evaluation module, its SGRAF model with our sim_enc weights, in eval mode, its opt)."""
    evaluation = official.sgraf_evaluation(Path(clone))
    # opts.py's defaults for the Flickr30K model; the encoders are built but never called (the loop
    # is given encoded fragments), so the vocabulary's size does not matter.
    opt = types.SimpleNamespace(img_dim=2048, word_dim=300, embed_size=DIM, sim_dim=SIM_DIM, num_layers=1,
                                bi_gru=True, no_imgnorm=False, no_txtnorm=False, module_name=module,
                                sgr_step=STEPS, vocab_size=1, margin=0.2, max_violation=True,
                                learning_rate=2e-4, grad_clip=2.0)
    model = evaluation.SGRAF(opt)
    model.sim_enc.load_state_dict(official_weights(module))  # strict: the official names, every key
    model.val_start()  # as its evalrank does before scoring
    return evaluation, model, opt


def official_scores(evaluation: types.ModuleType, model, opt: types.SimpleNamespace, images: torch.Tensor,
                    captions: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    """shard_attn_scores on the arrays its encode_data would hold (float32 numpy, the lengths a list)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its per-shard progress line
        return evaluation.shard_attn_scores(model, images.numpy(), captions.numpy(), [int(n) for n in lengths], opt,
                                            shard_size=SHARD)


def run_official(module: str, n_images: int, n_captions: int, n_ref: int, clone: str, queue) -> None:
    """The official evaluation's loop from the clone on ``n_ref`` captions, best of REFERENCE_REPEATS."""
    evaluation, model, opt = official_sgraf(clone, module)
    images, captions, lengths = reference_inputs(n_images, n_captions, n_ref)
    seconds = float("inf")
    for _ in range(REFERENCE_REPEATS):
        start = time.perf_counter()
        sims = official_scores(evaluation, model, opt, images, captions, lengths)
        seconds = min(seconds, time.perf_counter() - start)
    queue.put({"seconds": seconds, "pairs_per_second": n_images * n_ref / seconds, "peak_mb": peak_mb(),
               "sims": sims.astype(np.float32)})  # its float64 matrix holds float32 scores


def reference_inputs(n_images: int, n_captions: int, n_ref: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's images, its first ``n_ref`` captions padded into one tensor, and their lengths."""
    images = image_feats(n_images)
    lengths = caption_lengths(n_captions)[:n_ref]
    captions = torch.zeros(n_ref, int(lengths.max()), DIM)
    for i, n in enumerate(lengths):
        captions[i, : int(n)] = caption(i, int(n))
    return images, captions, lengths


def run_counts(module: str, clone: str | None, queue) -> None:
    """Matrix-product FLOPs per pair of both sides on 100 images x 1000 captions, and the GEMM rate.

    A thousand captions: our blocks are padded to their longest caption, which costs little in
    a length-sorted gallery of thousands but a lot in one of a few dozen. The reference counted is
    the one timed: the official loop with ``clone``, else the re-implementation.
    """
    n_images, n_captions = 100, 1000
    model = sgraf_model(module)
    with FlopCounterMode(display=False) as ours:
        score_all(model, *pooled(model, *galleries(n_images, n_captions)))
    images, captions, lengths = reference_inputs(n_images, n_captions, n_captions)
    if clone:
        evaluation, official_model, opt = official_sgraf(clone, module)
        with FlopCounterMode(display=False) as ref:
            official_scores(evaluation, official_model, opt, images, captions, lengths)
    else:
        with FlopCounterMode(display=False) as ref, torch.no_grad():
            forward_sim(official_weights(module), images, captions, lengths, module_name=module, sgr_step=STEPS)
    pairs = n_images * n_captions
    queue.put({"ours": ours.get_total_flops() / pairs, "reference": ref.get_total_flops() / pairs,
               "gemm_gflops": gemm_gflops(2048, DIM, SIM_DIM, repeats=30)})  # SGRAF's local projection, (rows x D) @ (D x S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--reference-captions", type=int, default=100)
    parser.add_argument("--modules", nargs="*", default=list(MODULES), choices=MODULES)
    parser.add_argument("--out", type=Path, default=HERE / "sgraf_results.json")
    parser.add_argument("--official", help="a clone of https://github.com/Paranioar/SGRAF: time its own"
                                           " evaluation loop")
    args = parser.parse_args()
    if args.official is None:
        print("no --official clone: timed against the re-implemented reference", flush=True)
        source = "re-implemented reference (itmkit_sgraf/tests/official.py forward_sim)"
    else:
        source = f"official: Paranioar/SGRAF evaluation.shard_attn_scores from {args.official}"

    load_before = os.getloadavg()[0]
    results = {"images": args.images, "captions": args.captions, "reference_captions": args.reference_captions,
               "sim_dim": SIM_DIM, "sgr_steps": STEPS, "models": {}}
    for module in args.modules:
        ours = in_process(run_ours, module, args.images, args.captions)
        if args.official:
            ref = in_process(run_official, module, args.images, args.captions, args.reference_captions, args.official)
        else:
            ref = in_process(run_reference, module, args.images, args.captions, args.reference_captions)
        counts = in_process(run_counts, module, args.official)
        ceiling = counts["gemm_gflops"] * 1e9 / counts["ours"]
        row = {
            **comparison(ours, ref, args.reference_captions, speedup_digits=2),
            "ours_mflop_per_pair": round(counts["ours"] / 1e6, 2),
            "reference_mflop_per_pair": round(counts["reference"] / 1e6, 2),
            "gemm_gflops": round(counts["gemm_gflops"]),
            "ours_gflops": round(ours["pairs_per_second"] * counts["ours"] / 1e9),
            "reference_gflops": round(ref["pairs_per_second"] * counts["reference"] / 1e9),
            "ceiling_pairs_per_second": round(ceiling),
            "ceiling_speedup": round(ceiling / ref["pairs_per_second"], 2),
            "reference": source,
        }
        results["models"][f"SGRAF-{module}"] = row
        print(f"SGRAF-{module}: {row}", flush=True)
        diff = row["max_abs_difference"]
        assert diff < 1e-5, f"SGRAF-{module}: scores differ from the reference by {diff}"
    results.update(run_context(load_before))
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
