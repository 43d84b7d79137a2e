"""The scoring engine: every image against every caption, in blocks sized by a memory budget.

Towers encode each image and each caption once; the matching branches then score blocks of
Ni images x Nt captions, vectorised over both axes. Under torch.distributed each rank scores
its share of the image blocks and the blocks are summed across ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs
import numpy as np
import torch
import torch.distributed as dist

from itmkit.build import Encoded, ITMModel
from itmkit.types import Local, Regions, Tokens

DEFAULT_BUDGET = 512 * 2**20  # bytes of working memory for one block

Progress = Callable[[int, int], None]  # (done, total)


def _concat(parts: list[Encoded]) -> Encoded:
    """Join encoded batches, padding fragments to the longest."""
    width = max(p.local.feats.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: float | bool) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra, *t.shape[2:])
        return torch.cat([t, t.new_full(shape, value)], dim=1)

    feats = torch.cat([pad(p.local.feats, 0.0) for p in parts])
    mask = torch.cat([pad(p.local.mask, False) for p in parts])
    extras = {}
    for key, value in parts[0].local.extras.items():
        if torch.is_tensor(value):
            extras[key] = torch.cat([p.local.extras[key] for p in parts])
    glob = None if parts[0].global_ is None else torch.cat([p.global_ for p in parts])
    return Encoded(Local(feats, mask, extras), glob)


@torch.no_grad()
def encode_images(model: ITMModel, batches, device: torch.device, progress: Progress | None = None) -> Encoded:
    """Encode image batches (objects with .features, .lengths, .boxes, .image_sizes); kept on CPU."""
    parts, done = [], 0
    for b in batches:
        regions = Regions(b.images.to(device), b.image_lengths.to(device),
                          None if b.boxes is None else b.boxes.to(device),
                          None if b.image_sizes is None else b.image_sizes.to(device))
        parts.append(model.encode_images(regions).to("cpu"))
        done += len(b.indices)
        if progress:
            progress(done, -1)
    return _concat(parts)


@torch.no_grad()
def encode_texts(model: ITMModel, batches, device: torch.device, progress: Progress | None = None) -> Encoded:
    """Encode caption batches (objects with .tokens, .lengths); kept on CPU."""
    parts, done = [], 0
    for b in batches:
        parts.append(model.encode_texts(Tokens(b.tokens.to(device), b.lengths.to(device))).to("cpu"))
        done += len(b.indices)
        if progress:
            progress(done, -1)
    return _concat(parts)


@attrs.frozen
class BlockPlan:
    """How the Ni x Nt matrix is cut: block sizes along images and captions."""

    images: int
    captions: int

    @classmethod
    def for_model(cls, model: ITMModel, n_images: int, n_captions: int, text_len: int, image_len: int,
                  budget: int = DEFAULT_BUDGET) -> BlockPlan:
        pair = max(model.pair_bytes(text_len=text_len, image_len=image_len), 1)
        pairs = max(budget // pair, 1)
        bi = min(n_images, max(1, int(math.sqrt(pairs))))
        bt = min(n_captions, max(1, pairs // bi))
        return cls(bi, bt)


@attrs.frozen
class ScoreStats:
    """Timing of one full scoring pass."""

    pairs: int
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / max(self.seconds, 1e-9)


@torch.no_grad()
def score_all(
    model: ITMModel,
    images: Encoded,
    texts: Encoded,
    *,
    device: torch.device | str = "cpu",
    budget: int = DEFAULT_BUDGET,
    progress: Progress | None = None,
) -> tuple[np.ndarray, ScoreStats]:
    """The (Ni, Nt) score matrix of every image against every caption, block by block."""
    n_images = images.local.feats.shape[0]
    n_texts = texts.local.feats.shape[0]
    plan = BlockPlan.for_model(model, n_images, n_texts, texts.local.feats.shape[1], images.local.feats.shape[1], budget)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    sims = torch.zeros(n_images, n_texts, dtype=torch.float32)
    # Captions in order of length: each block is padded only to its own longest caption.
    order = torch.argsort(texts.local.lengths, stable=True)
    texts = texts.select(order)
    blocks = [(i, t) for i in range(0, n_images, plan.images) for t in range(0, n_texts, plan.captions)]
    mine = blocks[rank::world]
    start = time.perf_counter()
    done = 0
    for i0, t0 in mine:
        i1, t1 = min(i0 + plan.images, n_images), min(t0 + plan.captions, n_texts)
        block_images = images.select(slice(i0, i1)).to(device)
        block_texts = texts.select(slice(t0, t1)).to(device)
        sims[i0:i1, order[t0:t1]] = model.score(block_images, block_texts).float().cpu()
        done += (i1 - i0) * (t1 - t0)
        if progress:
            progress(done, n_images * n_texts // world)
    if world > 1:
        dist.all_reduce(sims)  # each block was filled by exactly one rank
    return sims.numpy(), ScoreStats(n_images * n_texts, time.perf_counter() - start)
