"""Training on several processes: torchrun's environment, the global batch, DistributedDataParallel.

``torchrun --nproc_per_node N -m itmkit train RECIPE`` starts N processes (ranks) with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in their environment; ``process_group`` joins them
into one process group: NCCL when training on CUDA (each rank on its own GPU, ``cuda:LOCAL_RANK``),
gloo on CPUs.

The hinge losses of the papers take their negatives from the whole batch: with B pairs, every image
against every caption, B x B scores. The official code gets that on several GPUs from
``nn.DataParallel``, which encodes the batch in pieces and scores the whole of it on one GPU. Here
each of N ranks holds B/N pairs of the global batch (its slice, in rank order), encodes them,
gathers every rank's image encodings, scores all B images against its own B/N captions, and gathers
the score columns: every rank then holds the B x B matrix of one process with batch B and computes
the same loss from it (``ITMModel._global_step``). The gathers carry gradients (``torch.distributed.nn``):
the backward of a gather sums the N ranks' gradients of each rank's piece, which gives each rank N
times its share of the one-process gradient, and DDP averages over the N ranks, so the update is
exactly that of one process with batch B (``tests/test_distributed.py`` checks the loss and every
gradient to 1e-5).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from itmkit.errors import ItmkitError


@attrs.frozen
class Ranks:
    """This process's place among the ranks: rank 0 of 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current() -> Ranks:
    """The ranks of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """Join torchrun's process group for the duration of the block; yields (ranks, this rank's device).

    Without torchrun's environment (WORLD_SIZE unset or 1) this is a single process on ``device``.
    On CUDA each rank takes ``cuda:LOCAL_RANK`` and NCCL; on a CPU, gloo.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield current(), device
        return
    if not dist.is_available():
        raise ItmkitError("this PyTorch build has no torch.distributed: train in one process (without torchrun)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ItmkitError(f"rank with LOCAL_RANK {local_rank} has no GPU: this machine has"
                              f" {torch.cuda.device_count()}; start at most that many processes per node"
                              " (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        yield current(), device
    finally:
        # A DistributedDataParallel model that outlives the group deadlocks its process on exit: its
        # reducer, freed with the GIL held, destroys the gloo group, which joins a worker thread that
        # waits for the GIL to free its last work. Models no longer referenced (cycles included) go first.
        gc.collect()
        dist.destroy_process_group()


def reduction_device() -> torch.device:
    """Where a collective's tensors must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, with gradients flowing back to each rank.

    The ranks' tensors may differ in dim 1 (fragments padded to each rank's longest); they are
    zero-padded to the longest first, which is how a single batch would have padded them.
    """
    ranks = current()
    if not ranks.distributed:
        return x
    if x.dtype == torch.bool:  # gloo gathers no bools
        return gather_rows(x.to(torch.uint8)).bool()
    if x.dim() >= 2:
        sizes = torch.tensor([x.shape[1]], device=reduction_device())
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        longest = int(sizes.item())
        if longest > x.shape[1]:
            pad = torch.zeros((x.shape[0], longest - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad], dim=1)
    if not x.requires_grad:
        pieces = [torch.empty_like(x) for _ in range(ranks.world)]
        dist.all_gather(pieces, x.contiguous())
    else:
        pieces = dist_fn.all_gather(x.contiguous())
    return torch.cat(list(pieces), dim=0)


def gather_columns(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (rows, columns) block side by side in rank order, with gradients."""
    return gather_rows(x.transpose(0, 1).contiguous()).transpose(0, 1) if current().distributed else x
