"""The scoring engine: every image against every caption, in blocks sized by a memory budget.

Towers encode each image and each caption once into a gallery per side (``itmkit.gallery``:
compact, spilled to disk past a budget); the matching branches then score blocks of Ni images
x Nt captions, vectorised over both axes. Under torch.distributed each rank scores
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

from itmkit import distributed
from itmkit.allocator import reuse_freed_memory
from itmkit.build import Encoded, ITMModel
from itmkit.gallery import DEFAULT_GALLERY_BUDGET, Gallery
from itmkit.ops import gram
from itmkit.types import Regions, Tokens

# Bytes of working memory for one block. On a CPU, blocks whose arrays stay near the cache
# beat big ones (benchmarks/README.md: 2-core EPYC, scan.t2i 87k pairs/s at 128 MiB, 76k at
# 512 MiB); a GPU wants large blocks to fill its cores.
CPU_BUDGET = 128 * 2**20
GPU_BUDGET = 1024 * 2**20


def default_budget(device: torch.device | str) -> int:
    return CPU_BUDGET if torch.device(device).type == "cpu" else GPU_BUDGET


Progress = Callable[[int, int], None]  # (done, total)


def _gallery(model: ITMModel, side: str, budget: int) -> Gallery:
    keep_local, keep_global = model.reads(side)
    return Gallery(keep_local=keep_local, keep_global=keep_global, budget=budget)


@torch.no_grad()
def encode_images(model: ITMModel, batches, device: torch.device, progress: Progress | None = None, *,
                  budget: int = DEFAULT_GALLERY_BUDGET) -> Gallery:
    """Encode image batches (objects with .indices, .images, .image_lengths, .boxes, .image_sizes)."""
    gallery = _gallery(model, "image", budget)
    for b in batches:
        regions = Regions(b.images.to(device), b.image_lengths.to(device),
                          None if b.boxes is None else b.boxes.to(device),
                          None if b.image_sizes is None else b.image_sizes.to(device))
        gallery.append(model.encode_images(regions), b.indices.tolist())
        if progress:
            progress(len(gallery), -1)
    return gallery


@torch.no_grad()
def encode_texts(model: ITMModel, batches, device: torch.device, progress: Progress | None = None, *,
                 budget: int = DEFAULT_GALLERY_BUDGET) -> Gallery:
    """Encode caption batches (objects with .indices, .tokens, .lengths); feed them shortest first."""
    gallery = _gallery(model, "text", budget)
    for b in batches:
        gallery.append(model.encode_texts(Tokens(b.tokens.to(device), b.lengths.to(device))), b.indices.tolist())
        if progress:
            progress(len(gallery), -1)
    return gallery


@attrs.frozen
class BlockPlan:
    """How the Ni x Nt matrix is cut: block sizes along images and captions."""

    images: int
    captions: int

    @classmethod
    def for_model(cls, model: ITMModel, n_images: int, n_captions: int, text_len: int, image_len: int,
                  budget: int = CPU_BUDGET) -> BlockPlan:
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
    images: Gallery | Encoded,
    texts: Gallery | Encoded,
    *,
    device: torch.device | str = "cpu",
    budget: int | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, ScoreStats]:
    """The (Ni, Nt) score matrix of every image against every caption, block by block.

    Captions are best stored shortest first (``encode_texts`` of length-ordered batches, or an
    Encoded, which is ordered here): each block is then padded only to its own longest caption.
    """
    reuse_freed_memory()
    if isinstance(images, Encoded):
        images = Gallery.of(images, budget=2**62)
    if isinstance(texts, Encoded):
        texts = Gallery.of(texts, by_length=True, budget=2**62)
    n_images, n_texts = len(images), len(texts)
    budget = default_budget(device) if budget is None else budget
    plan = BlockPlan.for_model(model, n_images, n_texts, texts.max_length, images.max_length, budget)
    ranks = distributed.current()
    rank, world = ranks.rank, ranks.world
    sims = np.zeros((n_images, n_texts), dtype=np.float32)
    image_ids, text_ids = np.asarray(images.ids), np.asarray(texts.ids)
    blocks = [(i, t) for i in range(0, n_images, plan.images) for t in range(0, n_texts, plan.captions)]
    mine = blocks[rank::world]
    start = time.perf_counter()
    done = 0
    loaded: tuple[int, Encoded] | None = None  # the current image block, read once per row of blocks
    for i0, t0 in mine:
        i1, t1 = min(i0 + plan.images, n_images), min(t0 + plan.captions, n_texts)
        if loaded is None or loaded[0] != i0:
            loaded = (i0, images.block(i0, i1).to(device))
        scores = model.score(loaded[1], texts.block(t0, t1).to(device)).float().cpu().numpy()
        sims[np.ix_(image_ids[i0:i1], text_ids[t0:t1])] = scores
        done += (i1 - i0) * (t1 - t0)
        if progress:
            progress(done, n_images * n_texts // world)
    gram.clear()  # the last image block's Gram matrices (core.cosine reuses them along a row of blocks)
    if world > 1:
        sum_over_ranks(sims)  # each block was filled by exactly one rank
    return sims, ScoreStats(n_images * n_texts, time.perf_counter() - start)


REDUCE_ROWS_BYTES = 64 * 2**20


def sum_over_ranks(sims: np.ndarray) -> None:
    """Sum a float32 matrix over the ranks, in place, in row chunks of at most 64 MiB.

    The chunks go through the device the process group's backend reduces on: the CPU for gloo, this
    rank's GPU for NCCL, which refuses CPU tensors; chunking keeps that copy small whatever the gallery.
    """
    device = distributed.reduction_device()
    rows = max(1, REDUCE_ROWS_BYTES // max(sims.shape[1] * sims.itemsize, 1))
    for r0 in range(0, sims.shape[0], rows):
        chunk = torch.from_numpy(sims[r0:r0 + rows])
        if device.type == "cpu":
            dist.all_reduce(chunk)  # a view of sims: reduced in place
        else:
            on_device = chunk.to(device)
            dist.all_reduce(on_device)
            chunk.copy_(on_device.cpu())
