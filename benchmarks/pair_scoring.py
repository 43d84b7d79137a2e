"""DIME scoring speed against its official evaluation; DP-RNN's pairs/s and memory beside it.

Both models rebuild one side for every image x caption pair, so every pair runs a deep computation.

DIME (``--model dime``, i-t or t-i): the official sizes (36 regions, D = 256, BERT states of 768 at
32 positions, 16 heads, hidden 512), random weights and inputs. Ours is the block engine as `itmkit
eval` runs it: galleries of fc(f) regions (and the image vectors for t-i) and of the captions' BERT
states with their token counts, then ``score_all`` with the default CPU block budget; the text head
(the n-gram CNN over the BERT states) runs inside the scoring, per block. The reference is the
official evaluation (evaluation.calItr: shards of 64 images x 64 captions through InteractionModule)
on inputs the official encoder already produced (l2-normalised regions, words and sentence vectors:
its encode_data runs before calItr), so its time holds no text head. With ``--official PATH`` (a
clone of https://github.com/LgQu/DIME) that is the official code itself: evaluation.py's calItr,
models/InteractionModule.py and its cells, and TextNet.py's EncoderText for the words and sentence
vectors, imported from the clone by ``benchmarks/official.py`` (calItr's ``.cuda()`` dropped; BERT,
the data loader and model.py's DIME stubbed: the states are given). Without it, the transcription
itmkit_dime.tests.official (the same names and loops) stands in, and the record says which
("reference": {"source": ...}). Both sides carry our weights (the importer's key maps, inverted),
run in the same process and threads, are warmed up and timed best of three; scores are compared on
the reference's block.

DP-RNN (``--model dprnn``, model-W): 36 objects, h = 1024, captions of 8 to 20 words, the object
bi-GRU over each pair's reordered objects. No official code exists: its pairs/s, FLOPs per pair
and peak memory are recorded.

The full 1000 x 5000 block would take hours on a 2-core CPU with either model (tens to hundreds of
MFLOP per pair), so a sub-block is scored while galleries of the full block's size are held (the
peak memory is that of a full run) and the full block's time is extrapolated from pairs/s. The load
average over the minute before the script starts says whether the machine was idle.

    python benchmarks/pair_scoring.py --model dime --official ~/src/DIME    # writes dime_results.json
    python benchmarks/pair_scoring.py --model dime --direction t2i --official ~/src/DIME \
        --out benchmarks/dime_t2i_results.json
    python benchmarks/pair_scoring.py --model dprnn                # writes dprnn_results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from itmkit.build import DataPorts, Encoded, build_model
from itmkit.gallery import Gallery
from itmkit.recipe import parse_recipe
from itmkit.scoring import score_all
from itmkit.types import Local

from common import (BATCH, best_of, block_arguments, compare_with_reference, flops_per_pair, gemm_gflops, peak_mb,
                    write_result)  # benchmarks/common.py

HERE = Path(__file__).parent
REGIONS = 36
FULL = (1000, 5000)
REPEATS = 3
SHARD = 64  # the official calItr shard: 2 x batch_size 32

# DIME (train.py defaults, README lambdas)
DIME_DIM, BERT, POSITIONS = 256, 768, 32
DIME_LAMBDA = {"i2t": 4.0, "t2i": 9.0}
# DP-RNN (the paper's h)
DPRNN_DIM, MIN_WORDS, MAX_WORDS = 1024, 8, 20


def dime_model(direction: str):
    pool = 'pool = { stage = "dime.image_pool", batchnorm = true }' if direction == "t2i" else ""
    recipe = f"""
[recipe]
name = "bench-dime"
embed_dim = {DIME_DIM}
[image]
encoder = {{ stage = "core.precomp", normalize = false }}
{pool}
[text]
encoder = {{ stage = "core.bigru", embed_dim = {BERT} }}
[[match]]
similarity = {{ stage = "dime.interaction", direction = "{direction}", lambda_softmax = {DIME_LAMBDA[direction]} }}
[loss]
stage = "core.triplet"
"""
    torch.manual_seed(0)
    m = build_model(parse_recipe(recipe), DataPorts(2048, 100, REGIONS)).eval()
    with torch.no_grad():  # a trained score head: running statistics away from (0, 1)
        for module in m.branches[0].stages[0].head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return m


def dprnn_model():
    recipe = f"""
[recipe]
name = "bench-dprnn"
embed_dim = {DPRNN_DIM}
[image]
encoder = {{ stage = "core.precomp" }}
[text]
encoder = {{ stage = "core.bigru" }}
[[match]]
similarity = {{ stage = "dprnn.macm", orientation = "word" }}
[loss]
stage = "core.triplet"
"""
    torch.manual_seed(0)
    return build_model(parse_recipe(recipe), DataPorts(2048, 100, REGIONS)).eval()


def dime_inputs(ni: int, nt: int, seed: int = 0):
    """fc(f) regions (Ni, 36, 256), image vectors (Ni, 256), BERT states (Nt, 32, 768), token counts (Nt,)."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(ni, REGIONS, DIME_DIM, generator=g)
    image = F.normalize(torch.randn(ni, DIME_DIM, generator=g), dim=-1)
    states = torch.randn(nt, POSITIONS, BERT, generator=g)
    lengths = torch.randint(10, POSITIONS + 1, (nt,), generator=g)
    return regions, image, states, lengths


def dprnn_inputs(ni: int, nt: int, seed: int = 0):
    """Unit objects (Ni, 36, h), unit words (Nt, 20, h) zero past each length, lengths (Nt,)."""
    g = torch.Generator().manual_seed(seed)
    objects = F.normalize(torch.randn(ni, REGIONS, DPRNN_DIM, generator=g), dim=-1)
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (nt,), generator=g)
    words = F.normalize(torch.randn(nt, MAX_WORDS, DPRNN_DIM, generator=g), dim=-1)
    return objects, None, words * (torch.arange(MAX_WORDS)[None] < lengths[:, None])[..., None], lengths


def image_part(regions: torch.Tensor, image: torch.Tensor | None) -> Encoded:
    return Encoded(Local(regions, torch.ones(regions.shape[:2], dtype=torch.bool)), image)


def text_part(model: str, fragments: torch.Tensor, lengths: torch.Tensor) -> Encoded:
    """DP-RNN's captions cut to the batch's longest; DIME's at their 32 positions (all of them fragments, as
    dime.bert gives them) with their token counts."""
    if model == "dprnn":
        width = int(lengths.max())
        mask = torch.arange(width)[None] < lengths[:, None]
        return Encoded(Local(fragments[:, :width] * mask[..., None], mask))
    return Encoded(Local(fragments, torch.ones(fragments.shape[:2], dtype=torch.bool), {"token_lengths": lengths}))


def galleries(model: str, regions, image, fragments, lengths) -> tuple[Gallery, Gallery]:
    """Both sides as `itmkit eval` holds them: batches of 128, DP-RNN's captions shortest first."""
    images = Gallery()
    for start in range(0, len(regions), BATCH):
        rows = slice(start, start + BATCH)
        images.append(image_part(regions[rows], None if image is None else image[rows]),
                      range(start, min(start + BATCH, len(regions))))
    texts = Gallery()
    order = torch.argsort(lengths, stable=True).tolist() if model == "dprnn" else list(range(len(lengths)))
    for start in range(0, len(order), BATCH):
        rows = order[start:start + BATCH]
        texts.append(text_part(model, fragments[rows], lengths[rows]), rows)
    return images, texts


def held_galleries(model: str, inputs) -> tuple[Gallery, Gallery]:
    """Galleries of the full block's size, filled batch by batch (never the whole block as one tensor)."""
    images, texts = Gallery(), Gallery()
    for start in range(0, FULL[0], BATCH):
        r, img, _, _ = inputs(min(BATCH, FULL[0] - start), 0, seed=start + 1)
        images.append(image_part(r, img), range(start, start + len(r)))
    for start in range(0, FULL[1], BATCH):
        _, _, w, n = inputs(0, min(BATCH, FULL[1] - start), seed=start + 1)
        texts.append(text_part(model, w, n), range(start, start + len(n)))
    return images, texts


def dime_reference(m, direction: str, regions, image, fragments, lengths,
                   clone: Path | None) -> tuple[Callable[[int, int], np.ndarray], str]:
    """(the reference's scores of the first ni images x nt captions, which reference it is), holding our weights.

    Its inputs are what the official encode_data stores before calItr: l2-normalised regions, the image vectors,
    and the text head's words and sentence vectors of the BERT states (computed here, once, untimed).
    With ``clone`` the official code itself: models/InteractionModule.py and TextNet.py's EncoderText (BERT
    stubbed: it is handed the states) called by evaluation.calItr; else the transcription in
    itmkit_dime.tests.official (the same names and loops). Both take the importer's key maps, inverted.
    """
    from itmkit_dime.importer import interaction_keys, text_keys

    spec = m.recipe.match[0].similarity.spec
    ours = m.branches[0].stages[0].state_dict()
    itr_state = {theirs: ours[mine] for theirs, (mine, _) in
                 interaction_keys(DIME_DIM, spec.path_hid, spec.hid_router, spec.hid_imrc).items()}
    head_state = {theirs: ours[mine] for theirs, (mine, _) in text_keys(DIME_DIM, BERT).items()}
    rgn = F.normalize(regions, dim=-1)
    if clone is None:
        from itmkit_dime.tests import official

        itr = official.OfficialInteraction(DIME_DIM, direction, hid_router=spec.hid_router, hid_imrc=spec.hid_imrc,
                                           heads=spec.heads, raw_feature_norm=spec.raw_feature_norm,
                                           lambda_softmax=spec.lambda_softmax, path_hid=spec.path_hid).eval()
        head = official.OfficialTextHead(BERT, DIME_DIM).eval()
        itr.load_state_dict(itr_state)
        head.load_state_dict(head_state)
        with torch.no_grad():
            (stc, _), wrd = head(fragments)
        return (lambda ni, nt: official.cal_itr(itr, rgn[:ni], image[:ni], wrd[:nt], stc[:nt], lengths[:nt],
                                                shard_size=SHARD),
                "re-implemented reference (itmkit_dime.tests.official: a transcription of evaluation.calItr)")

    import contextlib
    import io
    import types

    import official as official_code  # benchmarks/official.py

    # train.py's option names; the BERT config and checkpoint are read by the stubbed BERT only
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    opt = types.SimpleNamespace(
        embed_size=DIME_DIM, direction=direction, hid_router=spec.hid_router, hid_IMRC=spec.hid_imrc,
        num_head_IMRC=spec.heads, raw_feature_norm_CMRC=spec.raw_feature_norm,
        lambda_softmax_CMRC=spec.lambda_softmax, init_checkpoint=empty,
        bert_config_file=types.SimpleNamespace(hidden_size=BERT, hidden_dropout_prob=0.1))
    itr = official_code.dime_interaction(clone).InteractionModule(opt, path_hid=spec.path_hid).eval()
    head = official_code.dime_text_net(clone).EncoderText(opt).eval()
    itr.load_state_dict(itr_state)
    head.load_state_dict(head_state)  # EncoderText's own load_state_dict: keys it lacks keep their values
    with torch.no_grad():
        stc, wrd = head(fragments, None, None, lengths)  # eval mode: (sentence vectors, words)
    embs = [x.numpy() for x in (rgn, image, wrd, stc)]  # encode_data's float32 arrays
    lens = lengths.numpy()
    cal_itr = official_code.dime_evaluation(clone).calItr
    holder = types.SimpleNamespace(itr_module=itr)  # calItr reads model.itr_module only

    def scores(ni: int, nt: int) -> np.ndarray:
        rgn_, img_, wrd_, stc_ = embs
        with contextlib.redirect_stdout(io.StringIO()):  # its elapsed-time line
            return cal_itr(holder, (rgn_[:ni], img_[:ni], wrd_[:nt], stc_[:nt]), lens[:nt], None, shard_size=SHARD)

    return scores, f"official: LgQu/DIME evaluation.calItr (models/InteractionModule.py) from {clone}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dime", "dprnn"), default="dime")
    parser.add_argument("--direction", choices=("i2t", "t2i"), default="i2t", help="DIME's direction")
    block_arguments(parser, images=64, captions=128, reference_images=SHARD, reference_captions=SHARD, repeats=REPEATS)
    parser.add_argument("--official", type=Path, help="a clone of https://github.com/LgQu/DIME: time its own"
                                                       " evaluation.calItr (--model dime)")
    args = parser.parse_args()
    if args.official is not None and args.model != "dime":
        parser.error("--official is for --model dime: DP-RNN has no official code")
    if args.model == "dime" and args.official is None:
        print("no --official clone: DIME is timed against the re-implemented reference", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / f"{args.model}_results.json"

    load_at_start = os.getloadavg()[0]  # before this script's own threads count in the load
    dime = args.model == "dime"
    m = dime_model(args.direction) if dime else dprnn_model()
    inputs = dime_inputs if dime else dprnn_inputs
    held = held_galleries(args.model, inputs)  # kept alive for the peak memory, as a real run holds them
    ni, nt = max(args.images, args.reference_images), max(args.captions, args.reference_captions)
    regions, image, fragments, lengths = inputs(ni, nt)
    sub = galleries(args.model, regions[:args.images], None if image is None else image[:args.images],
                    fragments[:args.captions], lengths[:args.captions])
    with torch.no_grad():
        score_all(m, *galleries(args.model, regions[:4], None if image is None else image[:4], fragments[:8],
                                lengths[:8]))  # warm-up
        ours_s, (sims, _) = best_of(lambda: score_all(m, *sub), args.repeats)
        ci, ct = min(args.images, 8), min(args.captions, 16)
        small = galleries(args.model, regions[:ci], None if image is None else image[:ci], fragments[:ct], lengths[:ct])
        ours_flops = flops_per_pair(lambda: score_all(m, *small), ci * ct)
    ours_peak = peak_mb()
    ours_pps = args.images * args.captions / ours_s
    full_pairs = FULL[0] * FULL[1]
    spec = m.recipe.match[0].similarity.spec
    result = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
                   f" torch {torch.__version__}",
        "sizes": ({"regions": REGIONS, "d": DIME_DIM, "bert_width": BERT, "positions": POSITIONS,
                   "heads": spec.heads, "hid_imrc": spec.hid_imrc, "hid_router": spec.hid_router}
                  if dime else {"regions": REGIONS, "h": DPRNN_DIM, "caption_words": [MIN_WORDS, MAX_WORDS]}),
        "stage": m.recipe.to_dict()["match"][0]["similarity"],
        "command": "python benchmarks/pair_scoring.py " + " ".join(sys.argv[1:]),
        "ours": {"block": [args.images, args.captions], "repeats": args.repeats,
                 "pairs_per_second": round(ours_pps, 1), "seconds": round(ours_s, 2),
                 "peak_rss_mb_with_full_galleries": round(ours_peak), "mflop_per_pair": round(ours_flops / 1e6, 1)},
        "galleries_held": {"images": len(held[0]), "captions": len(held[1])},
        "load_average_at_start": round(load_at_start, 2),
        "machine_was_idle": load_at_start < 1.0,
        "full_block": {"pairs": full_pairs, "ours_seconds_extrapolated": round(full_pairs / ours_pps)},
    }
    # the dominant product's shape: (pair fragments x D) @ (D x D) for DIME's cells, (pairs x h) @ (h x 3h)
    # for DP-RNN's GRU gates
    gemm = gemm_gflops(8192, DIME_DIM, DIME_DIM) if dime else gemm_gflops(2048, DPRNN_DIM, 3 * DPRNN_DIM)
    result["gemm_gflops"] = round(gemm)
    result["ours_gflops"] = round(ours_pps * ours_flops / 1e9)
    result["ceiling_pairs_per_second"] = round(gemm * 1e9 / ours_flops)
    if dime:
        ri, rt = args.reference_images, args.reference_captions
        reference, source = dime_reference(m, args.direction, regions[:ri], image[:ri], fragments[:rt], lengths[:rt],
                                           args.official)
        with torch.no_grad():
            reference(2, 2)  # warm-up
            ref_s, ref = best_of(lambda: reference(ri, rt), args.repeats)
            rci, rct = min(ri, 8), min(rt, 16)
            ref_flops = flops_per_pair(lambda: reference(rci, rct), rci * rct)
        ref_pps = ri * rt / ref_s
        result["reference"] = {"source": source, "block": [ri, rt], "shard": SHARD,
                               "pairs_per_second": round(ref_pps, 1), "seconds": round(ref_s, 2),
                               "mflop_per_pair": round(ref_flops / 1e6, 1)}
        n_i, n_t = min(ri, args.images), min(rt, args.captions)
        compare_with_reference(result, ours_pps=ours_pps, ours_flops=ours_flops, ref_pps=ref_pps, ref_flops=ref_flops,
                               gemm=gemm, difference=float(np.abs(sims[:n_i, :n_t] - ref[:n_i, :n_t]).max()))
    write_result(result, out)

if __name__ == "__main__":
    main()
