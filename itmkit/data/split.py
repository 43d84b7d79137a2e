"""One split of a dataset (features on disk, captions in memory) and the layout dispatcher."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from itmkit.errors import DataError, did_you_mean

KNOWN_SPLITS = ("train", "dev", "test", "testall")
BOX_LAYOUTS = {4: "xyxy", 30: "pfan"}
CAPTIONS_PER_IMAGE = 5


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    # Same directory, so os.replace is a rename on one file system; the writer creates
    # the file itself, so it gets the usual permissions rather than mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RowPrefix:
    """The first `num_rows` rows of an on-disk array, without reading them (h5py cannot slice lazily)."""

    def __init__(self, base: Any, num_rows: int) -> None:
        self.base = base
        self.num_rows = num_rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_rows, *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: Any) -> Any:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num_rows)
            key = slice(start, stop, step)
        elif isinstance(key, (int, np.integer)):
            if not -self.num_rows <= key < self.num_rows:
                raise IndexError(f"row {key} is out of range for {self.num_rows} rows")
            key = int(key) % self.num_rows
        else:
            key = np.asarray(key)
            if key.size and (key.min() < 0 or key.max() >= self.num_rows):
                raise IndexError(f"rows must lie in [0, {self.num_rows})")
        return self.base[(key, *rest)]


# eq=False: fields hold arrays, whose == is elementwise; two splits are equal only if identical.
@attrs.frozen(eq=False)
class Split:
    """One split: image features (N_img, R, F) on disk, captions 5i..5i+4 for image i."""

    name: str
    features: Any
    captions: list[str]
    boxes: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    captions_per_image: int = CAPTIONS_PER_IMAGE
    source: str = ""

    def __attrs_post_init__(self) -> None:
        expected = self.num_images * self.captions_per_image
        if len(self.captions) != expected:
            raise DataError(
                f"split {self.name!r} of {self.source or 'memory'}: {len(self.captions)} captions "
                f"for {self.num_images} images at {self.captions_per_image} per image "
                f"(expected {expected})"
            )

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[2])

    @property
    def box_layout(self) -> str | None:
        """'xyxy' for raw pixel boxes, 'pfan' for PFAN's 30-column block layout, None without boxes."""
        if self.boxes is None:
            return None
        return BOX_LAYOUTS.get(int(self.boxes.shape[-1]))

    def image_of_caption(self, caption_index: int) -> int:
        """The image that caption `caption_index` describes."""
        return caption_index // self.captions_per_image

    def image_features(self, indices: np.ndarray) -> np.ndarray:
        """Float32 features (k, R, F) of the images at `indices`, reading only those rows."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size == 0:
            return np.empty((0, self.num_regions, self.feature_dim), dtype=np.float32)
        if indices.min() < 0 or indices.max() >= self.num_images:
            raise IndexError(
                f"image indices must lie in [0, {self.num_images}) for split {self.name!r}; "
                f"got {indices.min()}..{indices.max()}"
            )
        if isinstance(self.features, np.ndarray):
            return np.asarray(self.features[indices], dtype=np.float32)
        # h5py fancy indexing wants strictly increasing indices: read each row once, in
        # order, then put them back in the order asked for.
        unique, inverse = np.unique(indices, return_inverse=True)
        if unique.size == unique[-1] - unique[0] + 1:
            rows = self.features[int(unique[0]) : int(unique[-1]) + 1]
        else:
            rows = self.features[unique]
        return np.asarray(rows, dtype=np.float32)[inverse]

    def truncate(self, num_images: int) -> Split:
        """The first `num_images` images and their captions (all of them if there are fewer)."""
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if num_images >= self.num_images:
            return self
        features = self.features
        if isinstance(features, np.ndarray):
            features = features[:num_images]  # a memmap slice stays a memmap
        elif isinstance(features, RowPrefix):
            features = RowPrefix(features.base, num_images)
        else:
            features = RowPrefix(features, num_images)
        return attrs.evolve(
            self,
            features=features,
            captions=self.captions[: num_images * self.captions_per_image],
            boxes=None if self.boxes is None else self.boxes[:num_images],
            image_sizes=None if self.image_sizes is None else self.image_sizes[:num_images],
        )

    def reopen(self) -> Split:
        """The same split read again from `source` (fresh file handles, e.g. in a worker process)."""
        if not self.source:
            return self
        return open_split(self.source, self.name).truncate(self.num_images)


@attrs.frozen(eq=False)
class SplitParts:
    """The arrays of one split as read from disk, before they are checked against each other."""

    name: str
    layout: str  # 'precomp', 'hdf5', or 'memory' for arrays about to be written
    source: str
    features: Any
    captions: list[str]
    boxes: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    files: dict[str, str] = attrs.field(factory=dict)  # part -> how messages name it
    declared_captions_per_image: int | None = None  # an HDF5 attribute; else the im_div rule

    def file(self, part: str) -> str:
        """How messages name the file (or HDF5 dataset) holding `part`."""
        return self.files.get(part, f"{self.source} ({self.name} {part})")


def _empty_note(captions: list[str]) -> str:
    """A sentence about empty captions, which usually explain a miscounted captions file."""
    empty = [i for i, c in enumerate(captions) if not c]
    if not empty:
        return ""
    return f" {len(empty)} of them are empty (the first is number {empty[0] + 1}, counting from 1)."


def split_problems(parts: SplitParts) -> list[str]:
    """Every way the parts of one split disagree with each other or with the layout, as sentences."""
    problems = []
    features_file = parts.file("features")
    shape = tuple(parts.features.shape)
    if len(shape) != 3:
        return [
            f"{features_file} should hold a 3-D array (images, regions, feature dim) "
            f"but has shape {shape}."
        ]
    if not np.issubdtype(parts.features.dtype, np.floating):
        problems.append(f"{features_file} should hold floats (float32) but has dtype {parts.features.dtype}.")
    num_images, num_regions, _ = shape
    num_captions = len(parts.captions)
    if parts.declared_captions_per_image is not None:
        expected = num_images * parts.declared_captions_per_image
        if num_captions != expected:
            problems.append(
                f"{parts.file('captions')} has {num_captions} captions but {features_file} has "
                f"{num_images} images at {parts.declared_captions_per_image} per image "
                f"(expected {expected}).{_empty_note(parts.captions)}"
            )
    elif num_captions not in (num_images, CAPTIONS_PER_IMAGE * num_images):
        problems.append(
            f"{parts.file('captions')} has {num_captions} captions but {features_file} has "
            f"{num_images} images; expected {CAPTIONS_PER_IMAGE * num_images} "
            f"({CAPTIONS_PER_IMAGE} per image) or {num_images} (1 per image)."
            f"{_empty_note(parts.captions)}"
        )
    if parts.boxes is not None:
        boxes_shape = tuple(parts.boxes.shape)
        if len(boxes_shape) != 3 or boxes_shape[:2] != (num_images, num_regions) or boxes_shape[2] not in BOX_LAYOUTS:
            problems.append(
                f"{parts.file('boxes')} should have shape ({num_images}, {num_regions}, 4) "
                f"or ({num_images}, {num_regions}, 30) to match {features_file} {shape}, "
                f"but has shape {boxes_shape}."
            )
    if parts.image_sizes is not None:
        sizes_shape = tuple(parts.image_sizes.shape)
        if sizes_shape != (num_images, 2):
            problems.append(
                f"{parts.file('image_sizes')} should have shape ({num_images}, 2) "
                f"(width, height per image) but has shape {sizes_shape}."
            )
    return problems


def array_problems(
    name: str,
    features: Any,
    captions: list[str],
    boxes: np.ndarray | None,
    image_sizes: np.ndarray | None,
    *,
    files: dict[str, str],
) -> list[str]:
    """split_problems for arrays about to be written; `files` names where each part is going."""
    parts = SplitParts(
        name=name,
        layout="memory",
        source="(arrays to write)",
        features=features,
        captions=captions,
        boxes=boxes,
        image_sizes=image_sizes,
        files=files,
    )
    return split_problems(parts)


def assemble(parts: SplitParts) -> Split:
    """A Split from parts that agree, or a DataError listing every disagreement."""
    problems = split_problems(parts)
    if problems:
        raise DataError("\n".join(problems))
    num_images = int(parts.features.shape[0])
    if parts.declared_captions_per_image is not None:
        per_image = parts.declared_captions_per_image
    else:
        # The official im_div rule: as many captions as images means one per image.
        per_image = 1 if len(parts.captions) == num_images else CAPTIONS_PER_IMAGE
    return Split(
        name=parts.name,
        features=parts.features,
        captions=parts.captions,
        boxes=parts.boxes,
        image_sizes=parts.image_sizes,
        captions_per_image=per_image,
        source=parts.source,
    )


def _ordered(splits: set[str]) -> list[str]:
    """The usual splits in their usual order, then any others alphabetically."""
    return [s for s in KNOWN_SPLITS if s in splits] + sorted(splits - set(KNOWN_SPLITS))


def available_splits(data_dir: str | Path) -> list[str]:
    """Names of the splits in `data_dir` (precomp files and the groups of its HDF5 file)."""
    from itmkit.data import hdf5  # imported here: hdf5 imports this module

    data_dir = Path(data_dir)
    if data_dir.is_file():
        return _ordered(set(hdf5.split_names(data_dir)))
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    names = {p.name[: -len("_ims.npy")] for p in data_dir.glob("*_ims.npy")}
    h5_path = hdf5.find_file(data_dir)
    if h5_path is not None:
        names |= set(hdf5.split_names(h5_path))
    return _ordered(names)


def open_parts(data_dir: str | Path, split: str) -> SplitParts:
    """The unchecked parts of `split`, from precomp files or an HDF5 file, whichever is there."""
    from itmkit.data import hdf5, precomp  # imported here: both import this module

    data_dir = Path(data_dir)
    if data_dir.is_file():
        return hdf5.read_parts(data_dir, split)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    if (data_dir / f"{split}_ims.npy").is_file():
        return precomp.read_parts(data_dir, split)
    h5_path = hdf5.find_file(data_dir)
    if h5_path is not None:
        return hdf5.read_parts(h5_path, split)
    present = available_splits(data_dir)
    found = ", ".join(present) if present else "none"
    raise DataError(
        f"no split {split!r} in {data_dir}: looked for {data_dir / f'{split}_ims.npy'} and an "
        f"HDF5 file (data.h5, *.h5, *.hdf5); splits present: {found}"
        f"{did_you_mean(split, present) if present else ''}"
    )


def open_split(data_dir: str | Path, split: str) -> Split:
    """Open `split` of the dataset in `data_dir` (a precomp folder, or a folder or path of an HDF5 file)."""
    return assemble(open_parts(data_dir, split))
