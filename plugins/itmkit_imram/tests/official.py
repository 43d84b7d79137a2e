"""A slow reference of IMRAM's official scoring, written from HuiChen24/IMRAM's algorithm, for tests and benchmarks.

The official shape of the computation (model.py xattn_score_{Text,Image}_IMRAM, evaluation.py
shard_xattn_*_IMRAM): images and captions in shards of 128; within a pair of shards, a Python
loop over the captions, each sliced to its length and repeated over the shard's images; K
steps of SCAN attention from the current query, the cosine of the ORIGINAL fragments with the
attended context averaged over the query fragments, then the gated memory update over the
concatenation [query; attended] (computed after every step, the last one included, as the
official code does); the K per-step matrices added at the end. Nothing here is shared with
the code under test except SCAN's reference attention (itmkit_scan.tests.official), itself
independent of itmkit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from itmkit_scan.tests.official import cosine, func_attention, l2norm

SHARD = 128


def gated_memory(query: torch.Tensor, attended: torch.Tensor, linear: dict, gate: dict) -> torch.Tensor:
    """gated_memory_{t2i,i2t}: tanh(W_l [q; c] + b_l) and sigmoid(W_g [q; c] + b_g) mixed with the query."""
    both = torch.cat([query, attended], 2)
    candidate = torch.tanh(F.linear(both, linear["weight"], linear["bias"]))
    g = torch.sigmoid(F.linear(both, gate["weight"], gate["bias"]))
    return query * g + candidate * (1 - g)


def direction_steps(images, captions, cap_lens, *, side: str, steps: int, smooth: float, raw_norm: str,
                    renormalize: bool, linear: dict, gate: dict) -> list[torch.Tensor]:
    """K (n_image, n_caption) per-step score matrices of one direction, one caption at a time.

    side "text": Text-IMRAM (the words query the regions); "image": Image-IMRAM.
    """
    per_step: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    for i in range(captions.shape[0]):
        cap = captions[i, : int(cap_lens[i])].unsqueeze(0).repeat(images.shape[0], 1, 1)
        fragments, context = (cap, images) if side == "text" else (images, cap)
        query = fragments
        for k in range(steps):
            attended = func_attention(query, context, raw_norm, smooth)
            per_step[k].append(cosine(fragments, attended).mean(dim=1, keepdim=True))
            query = gated_memory(query, attended, linear, gate)
            if renormalize:
                query = l2norm(query, -1)
    return [torch.cat(columns, 1) for columns in per_step]


def shard_scores(images, captions, cap_lens, *, mode: str, steps: int, smooth: float, raw_norm: str = "clipped_l2norm",
                 renormalize: bool = False, weights: dict, shard: int = SHARD) -> np.ndarray:
    """The official evaluation's similarity matrix (float64): shards of ``shard``, the K steps (of both
    directions for mode "full") added. ``weights`` holds linear_t2i, gate_t2i, linear_i2t, gate_i2t as
    {"weight", "bias"} dicts."""
    sides = {"full": ("text", "image"), "text": ("text",), "image": ("image",)}[mode]
    n_images, n_captions = images.shape[0], captions.shape[0]
    total = np.zeros((n_images, n_captions))
    for i0 in range(0, n_images, shard):
        for t0 in range(0, n_captions, shard):
            block_images = images[i0: i0 + shard]
            block_captions, block_lens = captions[t0: t0 + shard], cap_lens[t0: t0 + shard]
            for side in sides:
                suffix = "t2i" if side == "text" else "i2t"
                matrices = direction_steps(block_images, block_captions, block_lens, side=side, steps=steps,
                                           smooth=smooth, raw_norm=raw_norm, renormalize=renormalize,
                                           linear=weights[f"linear_{suffix}"], gate=weights[f"gate_{suffix}"])
                for m in matrices:
                    total[i0: i0 + shard, t0: t0 + shard] += m.double().numpy()
    return total
