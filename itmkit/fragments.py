"""Encoded items on disk, memory-mapped and sharded: what re-scoring a shortlist reads.

A two-stage search re-scores, for each query, K gallery items picked anywhere in the gallery, so
the gallery's encodings must be readable by index, not only in blocks (``itmkit.gallery``). A
fragment store writes them as shards of ``shard_size`` items, each a folder of ``.npy`` arrays
(fragments padded to the shard's longest item, their mask, per-fragment and per-item extras, the
pooled vectors), and reads any set of items back by memory-mapping the shards: only the rows asked
for are read. Plain ``.npy`` (no pickle) so that an index from elsewhere can be loaded safely.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from itmkit.build import Encoded
from itmkit.errors import ItmkitError
from itmkit.gallery import concat
from itmkit.types import Local

DEFAULT_SHARD_SIZE = 4096  # items per shard: ~150 MB of 36 x 256 float32 regions
STORE_FILE = "store.json"


def _arrays(enc: Encoded) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of an encoded batch by file stem, and the extras that grow with the fragments."""
    def plain(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()

    arrays: dict[str, np.ndarray] = {}
    per_fragment: list[str] = []
    if enc.global_ is not None:
        arrays["global"] = plain(enc.global_)
    if enc.local is not None:
        arrays["feats"], arrays["mask"] = plain(enc.local.feats), plain(enc.local.mask)
        for name, value in enc.local.extras.items():
            if not torch.is_tensor(value):
                raise ItmkitError(f"fragment extra {name!r} is a {type(value).__name__}, not a tensor: it cannot be"
                                  " stored for re-scoring")
            arrays[f"extra.{name}"] = plain(value)
            if value.shape[:2] == enc.local.feats.shape[:2]:
                per_fragment.append(name)
    return arrays, per_fragment


class FragmentWriter:
    """Append encoded batches; every ``shard_size`` items become one shard folder under ``folder``."""

    def __init__(self, folder: str | Path, shard_size: int = DEFAULT_SHARD_SIZE):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.pending: list[Encoded] = []
        self.pending_items = 0
        self.shards: list[dict] = []
        self.per_fragment: list[str] = []
        self.items = 0

    def append(self, enc: Encoded) -> None:
        enc = enc.to("cpu")
        n = enc.local.feats.shape[0] if enc.local is not None else enc.global_.shape[0]
        start = 0
        while start < n:
            take = min(n - start, self.shard_size - self.pending_items)
            self.pending.append(enc.select(slice(start, start + take)))
            self.pending_items += take
            start += take
            if self.pending_items == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        arrays, self.per_fragment = _arrays(concat(self.pending))
        shard = self.folder / f"shard-{len(self.shards):05d}"
        shard.mkdir()
        for stem, array in arrays.items():
            np.save(shard / f"{stem}.npy", array, allow_pickle=False)
        self.shards.append({"start": self.items, "size": self.pending_items})
        self.items += self.pending_items
        self.pending, self.pending_items = [], 0

    def close(self) -> int:
        """Write the last shard and the store's description; the number of items stored."""
        self._flush()
        description = {"items": self.items, "shard_size": self.shard_size, "shards": self.shards,
                       "per_fragment_extras": self.per_fragment}
        (self.folder / STORE_FILE).write_text(json.dumps(description, indent=1) + "\n")
        return self.items


class FragmentStore:
    """Read side of a fragment store: ``take(positions)`` gathers any items, memory-mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            description = json.loads((self.folder / STORE_FILE).read_text())
            self.items = int(description["items"])
            self.shard_size = int(description["shard_size"])
            self.num_shards = len(description["shards"])
            self.per_fragment = set(description["per_fragment_extras"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ItmkitError(f"fragment store {self.folder}: {STORE_FILE} is missing or damaged ({exc});"
                              " rebuild the index") from None
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return self.items

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._open:
            folder = self.folder / f"shard-{k:05d}"
            try:
                self._open[k] = {p.stem: np.load(p, mmap_mode="r", allow_pickle=False) for p in folder.glob("*.npy")}
            except (OSError, ValueError) as exc:
                raise ItmkitError(f"fragment store {folder}: a shard cannot be read ({exc}); rebuild the index") from None
        return self._open[k]

    def lengths(self) -> np.ndarray:
        """Fragments of each item (N,), read from the masks once; 1 for a store of pooled vectors only."""
        if self._lengths is None:
            if "mask" in self._shard(0):
                self._lengths = np.concatenate([self._shard(k)["mask"].sum(axis=1) for k in range(self.num_shards)])
            else:
                self._lengths = np.ones(self.items, dtype=np.int64)
        return self._lengths

    def take(self, positions: np.ndarray) -> Encoded:
        """Items ``positions`` (any order, repeats allowed) as one Encoded, fragments cut to the longest."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.items):
            raise ItmkitError(f"fragment store {self.folder}: positions outside 0..{self.items - 1}")
        shard_of = positions // self.shard_size
        parts = [(np.flatnonzero(shard_of == k), self._shard(int(k))) for k in np.unique(shard_of)]
        first = parts[0][1]
        n = len(positions)

        def gather(stem: str, padded: bool) -> torch.Tensor:
            arrays = [a[stem] for _, a in parts]
            width = max(a.shape[1] for a in arrays) if padded else None
            shape = (n, width, *arrays[0].shape[2:]) if padded else (n, *arrays[0].shape[1:])
            out = np.zeros(shape, dtype=arrays[0].dtype)
            for (rows, _), array in zip(parts, arrays):
                picked = array[positions[rows] - int(shard_of[rows[0]]) * self.shard_size]
                if padded:
                    out[rows, :picked.shape[1]] = picked
                else:
                    out[rows] = picked
            return torch.from_numpy(out)

        local = None
        if "feats" in first:
            extras = {stem.removeprefix("extra."): gather(stem, stem.removeprefix("extra.") in self.per_fragment)
                      for stem in first if stem.startswith("extra.")}
            local = Local(gather("feats", True), gather("mask", True), extras).select(slice(None))
        return Encoded(local, gather("global", False) if "global" in first else None)
