"""The torch side: caption-image pairs for training and in-order batches for evaluation."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from itmkit.data.split import Split, open_split
from itmkit.errors import DataError
from itmkit.data.vocab import Vocabulary


def _move(tensor: torch.Tensor | None, device: Any, non_blocking: bool) -> torch.Tensor | None:
    """`tensor` on `device`, None staying None."""
    return None if tensor is None else tensor.to(device, non_blocking=non_blocking)


# eq=False on these batches: tensor == is elementwise, so attrs' generated __eq__ would mislead.
@attrs.frozen(eq=False)
class Batch:
    """A training batch: one caption per row and the image it describes.

    With extra negatives (``add_extra_negatives``) the image rows and the caption rows differ in number:
    the first B of each are the batch's pairs, the rest are random extra images or captions, and
    ``caption_image_ids`` gives the image of every caption row.
    """

    images: torch.Tensor  # (B, R, F) float32
    image_lengths: torch.Tensor  # (B,) long: valid regions per image
    tokens: torch.Tensor  # (B, L) long, padded with <pad>=0 to the longest caption
    lengths: torch.Tensor  # (B,) long, counting <start> and <end>
    image_ids: torch.Tensor  # (B,) long: image index in the split
    caption_ids: torch.Tensor  # (B,) long: caption index in the split
    boxes: torch.Tensor | None = None  # (B, R, 4 or 30) float32
    image_sizes: torch.Tensor | None = None  # (B, 2) float32: width, height
    caption_image_ids: torch.Tensor | None = None  # (Nt,) long, with extra negatives: each caption's image

    @property
    def text_image_ids(self) -> torch.Tensor:
        """The image of every caption row (the positives of the block are image_ids == text_image_ids)."""
        return self.image_ids if self.caption_image_ids is None else self.caption_image_ids

    def to(self, device: Any, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on `device`."""
        return Batch(**{f.name: _move(getattr(self, f.name), device, non_blocking) for f in attrs.fields(Batch)})


@attrs.frozen(eq=False)
class ImageBatch:
    """Images `indices` of a split, in order, for encoding at evaluation."""

    indices: np.ndarray  # (B,) int64
    images: torch.Tensor  # (B, R, F) float32
    image_lengths: torch.Tensor  # (B,) long
    boxes: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    def to(self, device: Any, non_blocking: bool = False) -> ImageBatch:
        """The same batch with every tensor on `device` (indices stay a NumPy array)."""
        return attrs.evolve(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            image_lengths=self.image_lengths.to(device, non_blocking=non_blocking),
            boxes=_move(self.boxes, device, non_blocking),
            image_sizes=_move(self.image_sizes, device, non_blocking),
        )


@attrs.frozen(eq=False)
class CaptionBatch:
    """Captions `indices` of a split, in order, for encoding at evaluation."""

    indices: np.ndarray  # (B,) int64
    tokens: torch.Tensor  # (B, L) long, padded to the longest caption in the batch
    lengths: torch.Tensor  # (B,) long

    def to(self, device: Any, non_blocking: bool = False) -> CaptionBatch:
        """The same batch with every tensor on `device` (indices stay a NumPy array)."""
        return attrs.evolve(
            self,
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            lengths=self.lengths.to(device, non_blocking=non_blocking),
        )


def pad_tokens(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) zero-padded to the longest sequence, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.zeros((len(sequences), int(lengths.max()) if len(sequences) else 0), dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return tokens, lengths


# Tokenising is the slow part (seconds for Flickr30K, tens for COCO), and train_loader
# builds a dataset every epoch, so the last encoding is kept. The captions list itself
# is held, so an id() can never be reused by another list while the entry lives.
_last_encoding: tuple[list[str], str, list[np.ndarray]] | None = None


def encode_captions(captions: list[str], vocab: Vocabulary) -> list[np.ndarray]:
    """Token ids of every caption, as int64 arrays; reuses the previous call's work when it can."""
    global _last_encoding
    digest = vocab.sha256()
    if _last_encoding is not None and _last_encoding[0] is captions and _last_encoding[1] == digest:
        return _last_encoding[2]
    encoded = [np.asarray(vocab.encode(c), dtype=np.int64) for c in captions]
    _last_encoding = (captions, digest, encoded)
    return encoded


def _file_backed(split: Split) -> bool:
    """Whether `split` reads its features from a file that can be opened again by name."""
    features = split.features
    return bool(split.source) and (isinstance(features, np.memmap) or not isinstance(features, np.ndarray))


class PairDataset(Dataset):
    """One item per caption: the caption's token ids and the features (and region count) of its image."""

    def __init__(self, split: Split, vocab: Vocabulary) -> None:
        self.split = split
        self.tokens = encode_captions(split.captions, vocab)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.split.num_captions

    def _live_split(self) -> Split:
        """The split, reopened once in a forked worker: an h5py handle must not cross a fork."""
        if self._pid != os.getpid():
            if _file_backed(self.split) and not isinstance(self.split.features, np.memmap):
                self.split = self.split.reopen()
            self._pid = os.getpid()
        return self.split

    def __getstate__(self) -> dict[str, Any]:
        # Pickling (spawned workers) must not copy a memmap's or an HDF5 file's
        # contents: send where the split lives and open it again on the other side.
        state = self.__dict__.copy()
        if _file_backed(self.split):
            state["split"] = None
            state["_reopen"] = (self.split.source, self.split.name, self.split.num_images)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopen = state.pop("_reopen", None)
        if reopen is not None:
            source, name, num_images = reopen
            state["split"] = open_split(source, name).truncate(num_images)
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> dict[str, Any]:
        split = self._live_split()
        image = split.image_of_caption(index)
        return {
            "image": split.image_features(np.array([image]))[0],
            "tokens": self.tokens[index],
            "image_id": image,
            "image_length": int(split.region_lengths(np.array([image]))[0]),
            "caption_id": index,
            "boxes": None if split.boxes is None else np.asarray(split.boxes[image], dtype=np.float32),
            "image_size": (
                None if split.image_sizes is None else np.asarray(split.image_sizes[image], dtype=np.float32)
            ),
        }


def _stack_or_none(rows: list[np.ndarray | None]) -> torch.Tensor | None:
    """The rows stacked into one float32 tensor, or None when the split has none."""
    if rows[0] is None:
        return None
    return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))


def _to_longest(rows: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor | None:
    """Per-region rows (B, R, ...) cut to the batch's longest image.

    Rows past an image's region count are padding (a split with region counts), which every
    stage masks (the conformance kit's check_region_padding), while the cost grows with R: an
    adaptive detector's 10 to 100 boxes are stored padded to 100. Full images are left as they are.
    """
    if rows is None or not len(lengths):
        return rows
    width = int(lengths.max())
    return rows if width == rows.shape[1] else rows[:, :width].contiguous()


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack PairDataset items into a Batch, in the order given (not sorted by length)."""
    images = torch.from_numpy(np.stack([item["image"] for item in items]))
    image_lengths = torch.tensor([item["image_length"] for item in items], dtype=torch.long)
    tokens, lengths = pad_tokens([item["tokens"] for item in items])
    return Batch(
        images=_to_longest(images, image_lengths),
        image_lengths=image_lengths,
        tokens=tokens,
        lengths=lengths,
        image_ids=torch.tensor([item["image_id"] for item in items], dtype=torch.long),
        caption_ids=torch.tensor([item["caption_id"] for item in items], dtype=torch.long),
        boxes=_to_longest(_stack_or_none([item["boxes"] for item in items]), image_lengths),
        image_sizes=_stack_or_none([item["image_size"] for item in items]),
    )


class EpochBatches(Sampler[list[int]]):
    """One epoch's caption batches: a permutation fixed by (seed, epoch), cut into global batches of
    ``batch_size``; under ``world`` ranks each rank takes its slice of every global batch (rank order),
    so N ranks together see exactly the batches of one process. ``start`` skips the first batches (a
    resumed run continues where it stopped) without reading them.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True, start: int = 0):
        if batch_size % world:
            raise DataError(f"train.batch_size = {batch_size} is the global batch of all {world} processes and must be"
                            f" a multiple of their number: use {batch_size - batch_size % world or world}"
                            f" or {batch_size + world - batch_size % world}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.drop_last, self.start = seed * 1000 + epoch, drop_last, start

    def __len__(self) -> int:
        full = self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return max(full - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        # The permutation DataLoader(shuffle=True, generator) draws: its iterator takes one int64 for the
        # workers' base seed from the generator first, then the sampler its permutation (runs made before
        # this sampler existed keep their batches).
        generator = torch.Generator().manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(self.n, generator=generator).tolist()
        for b in range(self.start, self.start + len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            share = -(-len(batch) // self.world)  # a short last batch (drop_last=False) is split as evenly
            yield batch[self.rank * share:(self.rank + 1) * share]


def train_loader(
    split: Split,
    vocab: Vocabulary,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    drop_last: bool = True,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
) -> DataLoader:
    """Shuffled caption batches; the order depends only on (seed, epoch), so a resumed run matches.

    ``batch_size`` is the global batch: under ``world`` ranks each gets its slice of every batch.
    ``start``: the first batch of the epoch to yield.
    """
    sampler = EpochBatches(split.num_captions, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank,
                           world=world, drop_last=drop_last, start=start)
    # A generator of its own, so that the loader's draw of its workers' seed leaves the global RNG (dropout's) alone.
    return DataLoader(PairDataset(split, vocab), batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(sampler.seed))


def _rows_or_none(array: np.ndarray | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows start..stop of an optional per-image array, as float32."""
    if array is None:
        return None
    return torch.from_numpy(np.array(array[start:stop], dtype=np.float32))  # a writable copy


def image_batches(split: Split, *, batch_size: int) -> Iterator[ImageBatch]:
    """Every image of `split` in index order, `batch_size` at a time."""
    for start in range(0, split.num_images, batch_size):
        stop = min(start + batch_size, split.num_images)
        indices = np.arange(start, stop, dtype=np.int64)
        lengths = torch.from_numpy(split.region_lengths(indices))
        yield ImageBatch(
            indices=indices,
            images=_to_longest(torch.from_numpy(split.image_features(indices)), lengths),
            image_lengths=lengths,
            boxes=_to_longest(_rows_or_none(split.boxes, start, stop), lengths),
            image_sizes=_rows_or_none(split.image_sizes, start, stop),
        )


def caption_batches(split: Split, vocab: Vocabulary, *, batch_size: int, by_length: bool = False) -> Iterator[CaptionBatch]:
    """Every caption of `split`, `batch_size` at a time, padded per batch.

    In index order, or with ``by_length`` shortest first (stable), so that each batch, and each
    scoring block cut from them, pads only to a length close to its own.
    """
    encoded = [np.asarray(vocab.encode(c), dtype=np.int64) for c in split.captions]
    order = np.arange(len(encoded), dtype=np.int64)
    if by_length:
        order = np.argsort(np.array([len(e) for e in encoded]), kind="stable")
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        tokens, lengths = pad_tokens([encoded[i] for i in indices])
        yield CaptionBatch(indices=indices, tokens=tokens, lengths=lengths)


def extra_negatives_generator(seed: int, epoch: int) -> torch.Generator:
    """The stream extra negatives are drawn from: fixed by (seed, epoch), apart from the shuffling's."""
    return torch.Generator().manual_seed(seed * 1000 + epoch + 2**50)


def _pad_rows(rows: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Per-region rows (N, R, ...) zero-padded along R to ``width``."""
    if rows is None or rows.shape[1] == width:
        return rows
    pad = rows.new_zeros((rows.shape[0], width - rows.shape[1], *rows.shape[2:]))
    return torch.cat([rows, pad], dim=1)


def add_extra_negatives(batch: Batch, dataset: PairDataset, generator: torch.Generator, *, captions: int = 0,
                        images: int = 0) -> Batch:
    """The batch with ``captions`` random extra captions or ``images`` random extra images per pair appended.

    DIME trains its i-t model with one extra random sentence per pair and its t-i model with one extra
    random image (Qu et al., SIGIR 2021; the official data.py samples them uniformly over the split's
    captions, an image through a random caption of it): they only ever serve as negatives. Drawn from
    ``generator`` in batch order, so a run resumed at an epoch boundary draws the same ones.
    """
    if captions and images:
        raise ValueError("extra captions and extra images cannot both be added to one batch")
    b = len(batch.caption_ids)
    picks = torch.randint(len(dataset), (b * (captions or images),), generator=generator).tolist()
    if not picks:
        return batch
    items = [dataset[i] for i in picks]
    if captions:
        own = [batch.tokens[r, : int(batch.lengths[r])].numpy() for r in range(b)]
        tokens, lengths = pad_tokens(own + [item["tokens"] for item in items])
        extra_ids = torch.tensor([item["image_id"] for item in items], dtype=torch.long)
        return attrs.evolve(batch, tokens=tokens, lengths=lengths,
                            caption_ids=torch.cat([batch.caption_ids, torch.tensor(picks, dtype=torch.long)]),
                            caption_image_ids=torch.cat([batch.image_ids, extra_ids]))
    extra = collate(items)
    width = max(batch.images.shape[1], extra.images.shape[1])
    boxes = None if batch.boxes is None else torch.cat([_pad_rows(batch.boxes, width), _pad_rows(extra.boxes, width)])
    sizes = None if batch.image_sizes is None else torch.cat([batch.image_sizes, extra.image_sizes])
    return attrs.evolve(batch, images=torch.cat([_pad_rows(batch.images, width), _pad_rows(extra.images, width)]),
                        image_lengths=torch.cat([batch.image_lengths, extra.image_lengths]),
                        image_ids=torch.cat([batch.image_ids, extra.image_ids]), boxes=boxes, image_sizes=sizes,
                        caption_image_ids=batch.image_ids)
