"""One side of a scoring run, encoded once and kept compact: the gallery the blocks are cut from.

A gallery holds encoded batches as they come (each padded only to its own longest item), keeps
only what the matching branches read (fragments, pooled vectors or both), and past a byte budget
writes further batches to safetensors files in a temporary folder, read back one block at a
time. So the memory of a scoring run is the block budget plus at most one gallery budget per
side, whatever the number of images and captions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file, save_file

from itmkit.build import Encoded
from itmkit.types import Local

DEFAULT_GALLERY_BUDGET = 512 * 2**20  # bytes of encoded items held in memory per side


def _nbytes(enc: Encoded) -> int:
    tensors = [enc.global_] if enc.global_ is not None else []
    if enc.local is not None:
        tensors += [enc.local.feats, enc.local.mask, *(v for v in enc.local.extras.values() if torch.is_tensor(v))]
    return sum(t.numel() * t.element_size() for t in tensors)


def _flatten(enc: Encoded) -> dict[str, torch.Tensor]:
    out = {} if enc.global_ is None else {"global": enc.global_}
    if enc.local is not None:
        out |= {"feats": enc.local.feats, "mask": enc.local.mask}
        out |= {f"extra.{k}": v for k, v in enc.local.extras.items()}
    return {k: v.contiguous() for k, v in out.items()}


def _unflatten(tensors: dict[str, torch.Tensor]) -> Encoded:
    local = None
    if "feats" in tensors:
        extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        local = Local(tensors["feats"], tensors["mask"], extras)
    return Encoded(local, tensors.get("global"))


def _pad_local(local: Local, width: int) -> Local:
    """``local`` padded along the fragment axis to ``width`` (zeros, mask False)."""
    extra = width - local.feats.shape[1]
    if extra == 0:
        return local

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)

    n = local.feats.shape[:2]
    # per-fragment extras (e.g. region boxes) grow with the fragments; per-item ones do not
    extras = {k: pad(v) if torch.is_tensor(v) and v.shape[:2] == n else v for k, v in local.extras.items()}
    return Local(pad(local.feats), pad(local.mask), extras)


def concat(parts: list[Encoded]) -> Encoded:
    """Join encoded batches along the item axis, padding fragments to the longest."""
    local = None
    if parts[0].local is not None:
        width = max(p.local.feats.shape[1] for p in parts)
        padded = [_pad_local(p.local, width) for p in parts]
        extras = {k: torch.cat([p.extras[k] for p in padded]) for k, v in padded[0].extras.items() if torch.is_tensor(v)}
        local = Local(torch.cat([p.feats for p in padded]), torch.cat([p.mask for p in padded]), extras)
    glob = None if parts[0].global_ is None else torch.cat([p.global_ for p in parts])
    return Encoded(local, glob)


@attrs.define
class _Part:
    start: int
    size: int
    data: Encoded | None = None  # in memory
    path: Path | None = None  # spilled to disk

    def load(self) -> Encoded:
        return self.data if self.data is not None else _unflatten(load_file(self.path))


class Gallery:
    """Encoded items in order, position ``i`` being item ``ids[i]`` of the split."""

    def __init__(self, *, keep_local: bool = True, keep_global: bool = True, budget: int = DEFAULT_GALLERY_BUDGET):
        self.keep_local = keep_local
        self.keep_global = keep_global
        self.budget = budget
        self.parts: list[_Part] = []
        self.ids: list[int] = []
        self.lengths: list[int] = []  # valid fragments per item (0 when fragments are not kept)
        self.in_memory = 0
        self._spill: tempfile.TemporaryDirectory | None = None

    @classmethod
    def of(cls, enc: Encoded, *, by_length: bool = False, batch: int = 256, **kwargs) -> Gallery:
        """A gallery of an already encoded side; ``by_length`` stores items shortest first."""
        g = cls(**kwargs)
        n = enc.local.feats.shape[0] if enc.local is not None else enc.global_.shape[0]
        order = torch.argsort(enc.local.lengths, stable=True) if by_length and enc.local is not None else torch.arange(n)
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            g.append(enc.select(rows), rows.tolist())
        return g

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=1)

    def append(self, enc: Encoded, ids: Iterable[int]) -> None:
        """Add one encoded batch (moved to the CPU, trimmed to its longest item) for items ``ids``."""
        enc = enc.to("cpu")
        local = enc.local.select(slice(None)) if self.keep_local and enc.local is not None else None
        enc = Encoded(local, enc.global_ if self.keep_global else None)
        ids = list(ids)
        part = _Part(len(self.ids), len(ids))
        size = _nbytes(enc)
        if self.in_memory + size <= self.budget:
            part.data = enc
            self.in_memory += size
        else:
            if self._spill is None:
                self._spill = tempfile.TemporaryDirectory(prefix="itmkit-gallery-")
            part.path = Path(self._spill.name) / f"part{len(self.parts):06d}.safetensors"
            save_file(_flatten(enc), str(part.path))
        self.parts.append(part)
        self.ids += ids
        self.lengths += local.mask.sum(dim=1).tolist() if local is not None else [0] * len(ids)

    @property
    def spilled(self) -> int:
        return sum(p.path is not None for p in self.parts)

    def block(self, start: int, stop: int) -> Encoded:
        """Items ``start..stop`` as one Encoded, padded to the longest of them."""
        pieces = []
        for p in self.parts:
            lo, hi = max(start, p.start), min(stop, p.start + p.size)
            if lo < hi:
                pieces.append(p.load().select(slice(lo - p.start, hi - p.start)))
        return pieces[0] if len(pieces) == 1 else concat(pieces)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
