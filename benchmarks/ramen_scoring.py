"""RAMEN's fusion block scoring image x caption pairs: itmkit's block engine against the unvectorised computation.

The paper's widths (erobic/ramen defaults): 36 regions of 2048, q of 1024, a projection of 4 x 1024
(residual Swish), a bi-GRU of 1024 per direction over the regions, the VQA classifier's shape as the
readout (2048 -> 1). Random weights, BatchNorm running statistics away from the identity, random
inputs; captions enter as their q vectors (the text tower's pool), so only the block is timed.

Ours: the galleries as `itmkit eval` holds them and ``score_all`` with the default block budget (the
engine cuts blocks by ``pair_bytes``): BatchNorm + the first layer split into an image term and a
caption term, likewise the late fusion in front of the GRU's input projection (fusion.py).

Reference: the VQA code's computation, one pair per row, batched per caption: for every caption, the
Ni images with its q repeated over their regions through MultiModalCore + RNN and the classifier, in
eval mode. With ``--official PATH`` (a clone of https://github.com/erobic/ramen) that is the official
code itself: models/ramen.py's Ramen (components/multi_modal_core.py, models/rnn.py,
components/nonlinearity.py) built with run_network.py's defaults and one output, called by its own
forward, imported from the clone by ``benchmarks/official.py`` unchanged; only its question encoder
(GloVe embeddings and a GRU, components/language_model.py) is stubbed by identities, q being given.
Without it, the transcription plugins/itmkit_ramen/tests/official.py stands in; the record's
"reference": {"source": ...} says which. Both carry our weights, run in the same process and threads,
are warmed up and timed best of ``--repeats``; scores are compared on the reference's block.

The 1000 x 5000 test block would take hours to days on a CPU (about a GFLOP per pair), so a sub-block
is scored while galleries of the full block's size are held (the peak memory is that of a full run)
and the full block's time is extrapolated. The load average over the minute before the script starts
says whether the machine was idle.

    python benchmarks/ramen_scoring.py --threads 1 --official ~/src/ramen   # writes benchmarks/ramen_results.json
"""

from __future__ import annotations

import argparse
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
from itmkit.scoring import default_budget, score_all
from itmkit.types import Local

from common import (BATCH, best_of, block_arguments, compare_with_reference, flops_per_pair, gemm_gflops, peak_mb,
                    write_result)  # benchmarks/common.py

HERE = Path(__file__).parent
REGIONS, FEATURES, Q = 36, 2048, 1024
FULL = (1000, 5000)

RECIPE = """
[recipe]
name = "bench-ramen"
embed_dim = 1024
[image]
encoder = { stage = "core.raw" }
[text]
encoder = { stage = "ramen.question" }
pool = { stage = "ramen.question_vector" }
[[match]]
similarity = { stage = "ramen.fusion" }
[loss]
stage = "core.triplet"
"""


def ramen_model():
    torch.manual_seed(0)
    m = build_model(parse_recipe(RECIPE), DataPorts(FEATURES, 100, REGIONS)).eval()
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    return m


def inputs(ni: int, nt: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative region features (Ni, 36, 2048) like bottom-up ones, caption vectors q (Nt, 1024)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(ni, REGIONS, FEATURES, generator=g), torch.randn(nt, Q, generator=g).tanh()


def galleries(regions: torch.Tensor, q: torch.Tensor) -> tuple[Gallery, Gallery]:
    images = Gallery(keep_global=False)
    for start in range(0, len(regions), BATCH):
        part = regions[start:start + BATCH]
        images.append(Encoded(Local(part, torch.ones(part.shape[:2], dtype=torch.bool))),
                      range(start, start + len(part)))
    texts = Gallery(keep_local=False)
    for start in range(0, len(q), BATCH):
        texts.append(Encoded(None, q[start:start + BATCH]), range(start, min(start + BATCH, len(q))))
    return images, texts


def held_galleries() -> tuple[Gallery, Gallery]:
    images, texts = Gallery(keep_global=False), Gallery(keep_local=False)
    for start in range(0, FULL[0], BATCH):
        r, _ = inputs(min(BATCH, FULL[0] - start), 0, seed=start + 1)
        images.append(Encoded(Local(r, torch.ones(r.shape[:2], dtype=torch.bool))), range(start, start + len(r)))
    for start in range(0, FULL[1], BATCH):
        _, q = inputs(0, min(BATCH, FULL[1] - start), seed=start + 1)
        texts.append(Encoded(None, q), range(start, start + len(q)))
    return images, texts


def reference_block(m, clone: Path | None) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(the reference's scores of regions (B, 36, 2048) each paired with its row of q (B, 1024), which reference
    it is), holding the model's weights (the transcription's ``load_from`` maps them), eval mode.

    With ``clone`` the official models/ramen.py's Ramen (MultiModalCore, then the classifier with one output),
    built with run_network.py's defaults and called by its forward; the question encoder stubbed (q is given).
    Without it, the transcription in itmkit_ramen.tests.official.
    """
    sys.path.insert(0, str(HERE.parent / "plugins"))
    from itmkit_ramen.tests import official

    fusion = m.branches[0].stages[0]
    if clone is None:
        core = official.MultiModalCore(official.config()).eval()
        clf = official.Classifier(2 * 1024, [2048], "swish", 0.5, 0.0).eval()
        official.load_from(core, clf, fusion)
        return (lambda v, q: clf(core(v, q)),
                "re-implemented reference (itmkit_ramen.tests.official: a transcription of MultiModalCore and the"
                " classifier)")

    import official as official_code  # benchmarks/official.py

    # run_network.py's defaults (nonlinearities by class name there), one answer: the matching score
    config = official.config(mmc_nonlinearity="Swish", classifier_sizes=[2048], classifier_nonlinearity="Swish",
                             classifier_dropout=0.5, pre_classification_dropout=0, num_ans_candidates=1,
                             w_emb_size=1, glove_file=None, question_rnn_type="GRU",
                             question_dropout_before_rnn=None, question_dropout_after_rnn=None)
    ramen = official_code.ramen_model(clone).Ramen(config).eval()
    # Ramen's classifier: pre_classification_layers (Linear, Swish, Dropout per size), then classifier
    official.load_from(ramen.mmc_net, types.SimpleNamespace(layers=ramen.pre_classification_layers,
                                                            classifier=ramen.classifier), fusion)

    def score(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        boxes = v.new_zeros(v.shape[0], v.shape[1], 6)  # the loader's box features: sliced by forward, never used
        return ramen(v, boxes, q)["logits"][:, 0]

    return score, f"official: erobic/ramen models/ramen.py Ramen (components/multi_modal_core.py) from {clone}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    block_arguments(parser, images=32, captions=32, reference_images=32, reference_captions=32, repeats=1)
    parser.add_argument("--official", type=Path, help="a clone of https://github.com/erobic/ramen: time its own"
                                                       " Ramen model (MultiModalCore and classifier)")
    args = parser.parse_args()
    if args.official is None:
        print("no --official clone: timed against the re-implemented reference", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / "ramen_results.json"

    load_at_start = os.getloadavg()[0]
    m = ramen_model()
    held = held_galleries()
    ni, nt = max(args.images, args.reference_images), max(args.captions, args.reference_captions)
    regions, q = inputs(ni, nt)
    sub = galleries(regions[:args.images], q[:args.captions])
    with torch.no_grad():
        score_all(m, *galleries(regions[:2], q[:4]))  # warm-up
        before = peak_mb()
        ours_s, (sims, _) = best_of(lambda: score_all(m, *sub), args.repeats)
        ours_peak = peak_mb()
        ours_flops = flops_per_pair(lambda: score_all(m, *galleries(regions[:4], q[:8])), 32)
    ours_pps = args.images * args.captions / ours_s
    pair_bytes = m.pair_bytes(text_len=1, image_len=REGIONS)
    full_pairs = FULL[0] * FULL[1]
    result = {
        "model": "ramen",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
                   f" torch {torch.__version__}",
        "sizes": {"regions": REGIONS, "features": FEATURES, "q": Q, "mmc_sizes": [1024] * 4, "aggregator_dim": 1024,
                  "readout": [2048, 1]},
        "stage": m.recipe.to_dict()["match"][0]["similarity"],
        "command": "python benchmarks/ramen_scoring.py " + " ".join(sys.argv[1:]),
        "ours": {"block": [args.images, args.captions], "repeats": args.repeats,
                 "pairs_per_second": round(ours_pps, 2), "seconds": round(ours_s, 2),
                 "peak_rss_mb_with_full_galleries": round(ours_peak),
                 "rss_growth_mb_while_scoring": round(ours_peak - before),
                 "pair_bytes": pair_bytes, "pairs_per_block": default_budget("cpu") // pair_bytes,
                 "mflop_per_pair": round(ours_flops / 1e6, 1)},
        "galleries_held": {"images": len(held[0]), "captions": len(held[1])},
        "load_average_at_start": round(load_at_start, 2),
        "machine_was_idle": load_at_start < 1.0,
        "full_block": {"pairs": full_pairs, "ours_seconds_extrapolated": round(full_pairs / ours_pps)},
    }
    gemm = gemm_gflops(2048, 1024, 3072)  # the dominant product: (pairs x 1024) @ (1024 x 3072), the GRU's gates
    result["gemm_gflops"] = round(gemm)
    result["ours_gflops"] = round(ours_pps * ours_flops / 1e9)

    block, source = reference_block(m, args.official)
    ri, rt = args.reference_images, args.reference_captions
    with torch.no_grad():
        def reference(n_i: int = ri, n_t: int = rt) -> np.ndarray:
            cols = [block(regions[:n_i], q[t:t + 1].expand(n_i, Q)) for t in range(n_t)]
            return torch.stack(cols, dim=1).numpy()

        reference(2, 2)  # warm-up
        ref_s, ref = best_of(reference, args.repeats)
        ref_flops = flops_per_pair(lambda: reference(4, 8), 32)
    ref_pps = ri * rt / ref_s
    result["reference"] = {"source": source, "block": [ri, rt], "per": "caption (its Ni images in one batch)",
                           "pairs_per_second": round(ref_pps, 2), "seconds": round(ref_s, 2),
                           "mflop_per_pair": round(ref_flops / 1e6, 1)}
    n_i, n_t = min(ri, args.images), min(rt, args.captions)
    compare_with_reference(result, ours_pps=ours_pps, ours_flops=ours_flops, ref_pps=ref_pps, ref_flops=ref_flops,
                           gemm=gemm, difference=float(np.abs(sims[:n_i, :n_t] - ref[:n_i, :n_t]).max()))
    write_result(result, out)


if __name__ == "__main__":
    main()
