"""One split of a dataset (features on disk, captions in memory) and the layout dispatcher."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from itmkit.errors import DataError, did_you_mean
from itmkit.inputs import input_file, read_input

KNOWN_SPLITS = ("train", "dev", "test", "testall")
BOX_LAYOUTS = {4: "xyxy", 30: "pfan"}
CAPTIONS_PER_IMAGE = 5
UTF8_BOM = b"\xef\xbb\xbf"


def data_file(path: str | Path, what: str, *, optional: bool = False) -> Path | None:
    """`path` if it is a regular file (or a link to one); None if `optional` and nothing is there.

    Checked before opening (``itmkit.inputs.input_file``, the one check of every named input): a
    FIFO or a device named like a data file would block the reader forever, and a folder or a
    dangling link is not "missing", whatever is_file() says.
    """
    return input_file(path, what, error=DataError, optional=optional)


def read_text(path: str | Path, what: str, *, limit: int | None = None) -> str:
    """The text of a UTF-8 file, without a leading byte-order mark, lines ending in '\\n'.

    Every text file under itmkit.data (captions, vocabularies, caption declarations) is read
    here. Editors on Windows start UTF-8 files with a BOM (U+FEFF); read as plain UTF-8 it
    would stick to the first word ('\\ufeffa' -> <unk>) or break JSON, so it is dropped. Newlines
    are universal (\\r\\n and \\r become \\n), as when iterating over a file opened in text mode.
    """
    data = read_input(path, what, error=DataError, limit=limit)  # a regular file, at most `limit` bytes
    path = Path(path)
    skip = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text (bad byte at offset {skip + err.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_lines(text: str) -> list[str]:
    """The lines of `text` as iterating over a file gives them, without their line ends."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the end of the last line, not an empty line
    return lines


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


class ImageRows:
    """Image rows of a feature array stored another way, read lazily: (N_img, R, F) to the Split.

    Two layouts of VSE++'s precomp data need it: a 2-D array (rows, F) of one global feature per
    image is read as one region, (N_img, 1, F); and with ``repeat`` = k each image's row is
    stored k times in a row (one per caption), so image i is rows k*i .. k*i+k-1. Those rows are
    read with the image and must be identical: a difference is a DataError naming the rows,
    never a silent choice of one of them.
    """

    def __init__(self, base: Any, *, repeat: int = 1, file: str = "features") -> None:
        self.base = base
        self.repeat = repeat
        self.file = file

    @property
    def shape(self) -> tuple[int, ...]:
        rest = tuple(self.base.shape[1:])
        return (int(self.base.shape[0]) // self.repeat, *((1, *rest) if len(rest) == 1 else rest))

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):  # the image axis is selected here, the others once read
            key, rest = key[0], key[1:]
            rows = self[key]
            return rows[rest] if isinstance(key, (int, np.integer)) else rows[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            n = self.shape[0]
            if not -n <= key < n:
                raise IndexError(f"image {key} is out of range for {n} images")
            return self.rows(np.array([int(key) % n]))[0]
        if isinstance(key, slice):
            return self.rows(np.arange(*key.indices(self.shape[0])))
        return self.rows(np.asarray(key, dtype=np.int64))

    def rows(self, images: np.ndarray) -> np.ndarray:
        """The features of `images` (any order, repeats allowed), checking their repeated rows."""
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        if images.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        unique, inverse = np.unique(images, return_inverse=True)
        if unique[0] < 0 or unique[-1] >= self.shape[0]:
            raise IndexError(f"images must lie in [0, {self.shape[0]}), got {unique[0]}..{unique[-1]}")
        rows = (unique[:, None] * self.repeat + np.arange(self.repeat)).reshape(-1)  # increasing, as h5py needs
        if rows[-1] - rows[0] + 1 == rows.size:
            data = np.asarray(self.base[int(rows[0]) : int(rows[-1]) + 1])
        else:
            data = np.asarray(self.base[rows])
        data = data.reshape(len(unique), self.repeat, *data.shape[1:])
        if self.repeat > 1:
            first = data[:, :1]
            same = (data == first) | (np.isnan(data) & np.isnan(first))  # NaN is data check's to report
            differ = ~same.reshape(len(unique), -1).all(axis=1)
            if differ.any():
                image = int(unique[np.flatnonzero(differ)[0]])
                first = image * self.repeat
                raise DataError(
                    f"{self.file}: rows {first}..{first + self.repeat - 1} should repeat the feature of image "
                    f"{image} (one row per caption, as VSE++'s precomp data stores it) but differ; "
                    f"store one row per image, or repeat each row exactly {self.repeat} times"
                )
        return data[:, 0].reshape(len(unique), *self.shape[1:])[inverse]


# eq=False: fields hold arrays, whose == is elementwise; two splits are equal only if identical.
@attrs.frozen(eq=False)
class Split:
    """One split: image features (N_img, R, F) on disk, captions grouped by image in memory.

    Captions describe images in order: with ``captions_per_image`` = k, captions k*i .. k*i+k-1
    describe image i; when the count varies (``captions_per_image`` None), ``caption_index``
    holds the image of each caption, non-decreasing. ``region_counts`` holds how many of the R
    rows of each image are regions (the rest are zero padding); None means all of them.
    """

    name: str
    features: Any
    captions: list[str]
    boxes: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    captions_per_image: int | None = CAPTIONS_PER_IMAGE
    source: str = ""
    region_counts: np.ndarray | None = None
    caption_index: np.ndarray | None = None

    def __attrs_post_init__(self) -> None:
        where = f"split {self.name!r} of {self.source or 'memory'}"
        if self.caption_index is not None:
            problems = caption_index_problems(self.caption_index, self.num_images, len(self.captions), where)
            if problems:
                raise DataError(" ".join(problems))
        elif self.captions_per_image is None or self.captions_per_image < 1:
            raise DataError(f"{where}: captions_per_image must be a positive int, or give caption_index")
        else:
            expected = self.num_images * self.captions_per_image
            if len(self.captions) != expected:
                raise DataError(
                    f"{where}: {len(self.captions)} captions for {self.num_images} images at "
                    f"{self.captions_per_image} per image (expected {expected})"
                )
        if self.region_counts is not None:
            problems = region_count_problems(self.region_counts, self.num_images, self.num_regions, where)
            if problems:
                raise DataError(" ".join(problems))

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

    @property
    def caption_images(self) -> np.ndarray:
        """(C,) int64: the image each caption describes (what the metrics take)."""
        if self.caption_index is not None:
            return np.asarray(self.caption_index, dtype=np.int64)
        return np.arange(self.num_captions, dtype=np.int64) // self.captions_per_image

    def image_of_caption(self, caption_index: int) -> int:
        """The image that caption `caption_index` describes."""
        if self.caption_index is not None:
            return int(self.caption_index[caption_index])
        return caption_index // self.captions_per_image

    def region_lengths(self, indices: np.ndarray) -> np.ndarray:
        """(k,) int64: how many regions the images at `indices` have (R unless counts are stored)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.region_counts is None:
            return np.full(indices.shape, self.num_regions, dtype=np.int64)
        return np.asarray(self.region_counts, dtype=np.int64)[indices]

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
        if self.caption_index is not None:
            # Captions are grouped by image, so the first images' captions are a prefix.
            num_captions = int(np.searchsorted(self.caption_index, num_images, side="left"))
        else:
            num_captions = num_images * self.captions_per_image
        return attrs.evolve(
            self,
            features=features,
            captions=self.captions[:num_captions],
            boxes=None if self.boxes is None else self.boxes[:num_images],
            image_sizes=None if self.image_sizes is None else self.image_sizes[:num_images],
            region_counts=None if self.region_counts is None else self.region_counts[:num_images],
            caption_index=None if self.caption_index is None else self.caption_index[:num_captions],
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
    declared_captions_per_image: int | None = None  # a small file / an HDF5 attribute; else the im_div rule
    region_counts: np.ndarray | None = None  # (N_img,) valid regions per image, when stored
    caption_index: np.ndarray | None = None  # (C,) the image of each caption, when stored

    def file(self, part: str) -> str:
        """How messages name the file (or HDF5 dataset) holding `part`."""
        return self.files.get(part, f"{self.source} ({self.name} {part})")


def _empty_note(captions: list[str]) -> str:
    """A sentence about empty captions, which usually explain a miscounted captions file."""
    empty = [i for i, c in enumerate(captions) if not c]
    if not empty:
        return ""
    return f" {len(empty)} of them are empty (the first is number {empty[0] + 1}, counting from 1)."


def region_count_problems(counts: Any, num_images: int, num_regions: int, file: str) -> list[str]:
    """What is wrong with per-image region counts (1-D integers in 1..R, one per image), as sentences."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.shape[0] != num_images:
        return [f"{file} should hold one region count per image, shape ({num_images},), but has shape "
                f"{tuple(counts.shape)}."]
    # Integer dtypes only: booleans would be read as counts of 0 or 1, floats are a conversion mistake.
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        return [f"{file} should hold integer region counts (int64) but has dtype {counts.dtype}."]
    bad = np.flatnonzero((counts < 1) | (counts > num_regions))
    if bad.size:
        first = int(bad[0])
        return [f"{file} has {bad.size} region count(s) outside 1..{num_regions} (the regions stored per "
                f"image): image {first} has {counts[first]}."]
    return []


# Images whose boxes and sizes are checked per step: a memory-mapped file is never read whole.
SCAN_CHUNK_IMAGES = 256


def as_read(chunk: Any) -> np.ndarray:
    """`chunk` as float32, as the loader hands it to the model: float64 beyond float32's range becomes inf.

    A finiteness check of the stored values would pass 1e39 in a float64 file, which the model then
    reads as inf; every NaN/inf scan looks at this instead.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(chunk, dtype=np.float32)


def _first_image(bad_images: list[int]) -> str:
    return f"{len(bad_images)} image(s) (the first is image {bad_images[0]})"


def box_problems(
    boxes: Any,
    image_sizes: Any,
    *,
    region_counts: Any = None,
    boxes_file: str = "boxes",
    sizes_file: str = "image sizes",
) -> list[str]:
    """What is wrong with the values of boxes (N_img, R, 4 or 30) and image sizes (N_img, 2), as sentences.

    Shapes are split_problems' to check; this reads the values, SCAN_CHUNK_IMAGES images at a time,
    as float32 (what the loader gives the model). Every stored number must be finite, padded rows
    included (the loader casts them, PFAN computes a block layout from every row before masking).
    In the rows of real regions (below each image's region count, or all rows without counts):
    an xyxy box must have x1 <= x2 and y1 <= y2 (a zero-size box is allowed: PFAN gives it no block;
    a reversed one is a layout mistake, e.g. x, y, width, height stored as xyxy); a PFAN-layout row
    must have whole, non-negative block indices (the upper bound depends on the recipe's grid, the
    stage checks it) and non-negative weights. Image sizes are width, height in pixels: finite, > 0.
    """
    problems = []
    if boxes is not None:
        if not (np.issubdtype(boxes.dtype, np.integer) or np.issubdtype(boxes.dtype, np.floating)) \
                or boxes.dtype == bool:
            problems.append(f"{boxes_file} should hold numbers (float32) but has dtype {boxes.dtype}.")
        else:
            problems.extend(_box_value_problems(boxes, region_counts, boxes_file))
    if image_sizes is not None:
        if not (np.issubdtype(image_sizes.dtype, np.integer) or np.issubdtype(image_sizes.dtype, np.floating)) \
                or image_sizes.dtype == bool:
            problems.append(f"{sizes_file} should hold numbers (width, height in pixels) but has dtype "
                            f"{image_sizes.dtype}.")
        else:
            bad: list[int] = []
            for start in range(0, int(image_sizes.shape[0]), SCAN_CHUNK_IMAGES):
                chunk = as_read(image_sizes[start : start + SCAN_CHUNK_IMAGES])
                wrong = ~(np.isfinite(chunk) & (chunk > 0)).all(axis=1)
                bad.extend(start + int(i) for i in np.flatnonzero(wrong))
            if bad:
                first = as_read(image_sizes[bad[0]])
                problems.append(
                    f"{sizes_file} should hold each image's width and height in pixels, finite and positive, "
                    f"but {_first_image(bad)} do not: image {bad[0]} has ({first[0]:g}, {first[1]:g})."
                )
    return problems


def _box_value_problems(boxes: Any, region_counts: Any, file: str) -> list[str]:
    """The value checks of box_problems for a numeric (N_img, R, C) box array."""
    num_images, num_regions, columns = (int(n) for n in boxes.shape)
    counts = None
    if region_counts is not None and not region_count_problems(region_counts, num_images, num_regions, file):
        counts = np.asarray(region_counts, dtype=np.int64)
    nonfinite: list[int] = []
    reversed_: list[int] = []
    for start in range(0, num_images, SCAN_CHUNK_IMAGES):
        chunk = as_read(boxes[start : start + SCAN_CHUNK_IMAGES])  # (n, R, C)
        nonfinite.extend(start + int(i) for i in np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(1)))
        real = np.ones(chunk.shape[:2], dtype=bool)
        if counts is not None:
            real = np.arange(num_regions)[None, :] < counts[start : start + len(chunk), None]
        with np.errstate(invalid="ignore"):
            if columns == 4:
                wrong = (chunk[..., 2] < chunk[..., 0]) | (chunk[..., 3] < chunk[..., 1])
            else:
                half = columns // 2
                index, weight = chunk[..., :half], chunk[..., half:]
                wrong = ((index < 0) | (index != np.round(index)) | (weight < 0)).any(axis=-1)
        wrong &= np.isfinite(chunk).all(axis=-1)  # a non-finite row has its own sentence
        reversed_.extend(start + int(i) for i in np.flatnonzero((wrong & real).any(axis=1)))
    problems = []
    if nonfinite:
        problems.append(f"{file} has NaN or inf values in {_first_image(nonfinite)}; every row must be finite "
                        f"(padded rows too: zeros).")
    if reversed_:
        image = reversed_[0]
        rows = as_read(boxes[image])
        real = int(counts[image]) if counts is not None else num_regions
        rows = np.where(np.isfinite(rows).all(axis=-1, keepdims=True), rows, 0)[:real]
        with np.errstate(invalid="ignore"):
            if columns == 4:
                row = int(np.flatnonzero((rows[:, 2] < rows[:, 0]) | (rows[:, 3] < rows[:, 1]))[0])
                problems.append(
                    f"{file} should hold x1, y1, x2, y2 pixel boxes with x1 <= x2 and y1 <= y2, but "
                    f"{_first_image(reversed_)} have reversed boxes: region {row} of image {image} is "
                    f"{tuple(float(v) for v in rows[row])} (x, y, width, height stored as x1, y1, x2, y2?)."
                )
            else:
                half = columns // 2
                bad = np.concatenate([(rows[:, :half] < 0) | (rows[:, :half] != np.round(rows[:, :half])),
                                      rows[:, half:] < 0], axis=1)
                row, column = (int(v[0]) for v in np.nonzero(bad))
                what = "block index" if column < half else "weight"
                problems.append(
                    f"{file} should hold PFAN's block layout ({half} whole, non-negative block indices, then "
                    f"{half} non-negative weights per region), but {_first_image(reversed_)} do not: region "
                    f"{row} of image {image} has {what} {float(rows[row, column]):g} (column {column})."
                )
    return problems


def caption_index_problems(index: Any, num_images: int, num_captions: int, file: str) -> list[str]:
    """What is wrong with a caption -> image index (non-decreasing, every image described), as sentences."""
    index = np.asarray(index)
    if index.ndim != 1 or index.shape[0] != num_captions:
        return [f"{file} should give the image of each of the {num_captions} captions, shape ({num_captions},), "
                f"but has shape {tuple(index.shape)}."]
    if index.size and not np.issubdtype(index.dtype, np.integer):
        return [f"{file} should hold integer image indices but has dtype {index.dtype}."]
    if index.size == 0:
        return [] if num_images == 0 else [f"{file} gives no captions for {num_images} images."]
    outside = np.flatnonzero((index < 0) | (index >= num_images))
    if outside.size:
        first = int(outside[0])
        return [f"{file}: caption {first} is given image {index[first]}, outside 0..{num_images - 1}."]
    back = np.flatnonzero(np.diff(index) < 0)
    if back.size:
        first = int(back[0]) + 1
        return [f"{file}: caption {first} is given image {index[first]} after caption {first - 1} was given "
                f"image {index[first - 1]}; captions must be grouped by image, in image order."]
    counts = np.bincount(index, minlength=num_images)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        return [f"{file}: {missing.size} image(s) have no caption (the first is image {int(missing[0])}); "
                f"every image needs at least one for image-to-text retrieval."]
    return []


def repeated_rows(parts: SplitParts) -> int:
    """k if the features store each image's row k times in a row (VSE++'s layout), else 1.

    That layout has one row per caption: as many rows as captions. With k declared it is the
    only reading; without, k = 5 is taken when rows 0..4 are identical (a legacy one-caption-
    per-image file would not repeat them). Only 2-D global features are stored this way.
    """
    shape = tuple(parts.features.shape)
    if len(shape) != 2 or parts.caption_index is not None or shape[0] != len(parts.captions):
        return 1
    k = parts.declared_captions_per_image or CAPTIONS_PER_IMAGE
    if k < 2 or shape[0] % k or shape[0] == 0:
        return 1
    if parts.declared_captions_per_image is not None:
        return k
    first = np.asarray(parts.features[:k])
    return k if bool((first == first[:1]).all()) else 1


def image_shape(parts: SplitParts) -> tuple[int, int, int] | None:
    """(N_img, R, F) as the Split will see the features (2-D global rows as R = 1), or None if unreadable."""
    shape = tuple(parts.features.shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (shape[0] // repeated_rows(parts), 1, shape[1])
    return None


def split_problems(parts: SplitParts) -> list[str]:
    """Every way the parts of one split disagree with each other or with the layout, as sentences."""
    problems = []
    features_file = parts.file("features")
    shape = image_shape(parts)
    if shape is None:
        return [
            f"{features_file} should hold a 3-D array (images, regions, feature dim) or a 2-D array "
            f"(images, feature dim) of global features, but has shape {tuple(parts.features.shape)}."
        ]
    if not np.issubdtype(parts.features.dtype, np.floating):
        problems.append(f"{features_file} should hold floats (float32) but has dtype {parts.features.dtype}.")
    num_images, num_regions, feature_dim = shape
    if num_regions == 0:
        problems.append(f"{features_file} has shape {tuple(parts.features.shape)}: 0 regions per image; every "
                        f"image needs at least one region row.")
    if feature_dim == 0:
        problems.append(f"{features_file} has shape {tuple(parts.features.shape)}: 0-wide features; each "
                        f"region needs a feature vector of at least one number.")
    num_captions = len(parts.captions)
    repeat = repeated_rows(parts)
    rows_note = f" ({num_images * repeat} rows, each image's repeated {repeat} times)" if repeat > 1 else ""
    if parts.caption_index is not None:
        problems.extend(caption_index_problems(parts.caption_index, num_images, num_captions,
                                               parts.file("caption_images")))
        if parts.declared_captions_per_image is not None and not problems:
            k = parts.declared_captions_per_image
            if not np.array_equal(parts.caption_index, np.arange(num_captions) // k):
                problems.append(
                    f"{parts.file('captions_per_image')} declares {k} captions per image but "
                    f"{parts.file('caption_images')} gives other images; keep one of the two."
                )
    elif parts.declared_captions_per_image is not None:
        k = parts.declared_captions_per_image
        expected = num_images * k
        if k < 1:
            problems.append(f"{parts.file('captions_per_image')} declares {k} captions per image; expected a "
                            f"positive integer.")
        elif num_captions != expected:
            problems.append(
                f"{parts.file('captions')} has {num_captions} captions but {features_file} has "
                f"{num_images} images{rows_note} at {k} per image "
                f"(expected {expected}).{_empty_note(parts.captions)}"
            )
    elif num_captions not in (num_images, CAPTIONS_PER_IMAGE * num_images):
        problems.append(
            f"{parts.file('captions')} has {num_captions} captions but {features_file} has "
            f"{num_images} images; expected {CAPTIONS_PER_IMAGE * num_images} "
            f"({CAPTIONS_PER_IMAGE} per image) or {num_images} (1 per image), or declare the count: k per "
            f"image in {parts.file('captions_per_image')}, or each caption's image in "
            f"{parts.file('caption_images')} (docs/data.md, Captions per image)."
            f"{_empty_note(parts.captions)}"
        )
    if parts.region_counts is not None:
        problems.extend(region_count_problems(parts.region_counts, num_images, num_regions,
                                              parts.file("region_counts")))
    boxes, sizes = parts.boxes, parts.image_sizes  # their values are checked once their shapes fit
    if parts.boxes is not None:
        boxes_shape = tuple(parts.boxes.shape)
        if len(boxes_shape) != 3 or boxes_shape[:2] != (num_images, num_regions) or boxes_shape[2] not in BOX_LAYOUTS:
            problems.append(
                f"{parts.file('boxes')} should have shape ({num_images}, {num_regions}, 4) "
                f"or ({num_images}, {num_regions}, 30) to match {features_file} {shape}, "
                f"but has shape {boxes_shape}."
            )
            boxes = None
    if parts.image_sizes is not None:
        sizes_shape = tuple(parts.image_sizes.shape)
        if sizes_shape != (num_images, 2):
            problems.append(
                f"{parts.file('image_sizes')} should have shape ({num_images}, 2) "
                f"(width, height per image) but has shape {sizes_shape}."
            )
            sizes = None
    if boxes is not None or sizes is not None:
        problems.extend(box_problems(boxes, sizes, region_counts=parts.region_counts,
                                     boxes_file=parts.file("boxes"), sizes_file=parts.file("image_sizes")))
    return problems


def array_problems(
    name: str,
    features: Any,
    captions: list[str],
    boxes: np.ndarray | None,
    image_sizes: np.ndarray | None,
    *,
    files: dict[str, str],
    region_counts: Any = None,
    captions_per_image: int | None = None,
    caption_index: Any = None,
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
        declared_captions_per_image=captions_per_image,
        region_counts=None if region_counts is None else np.asarray(region_counts),
        caption_index=None if caption_index is None else np.asarray(caption_index),
    )
    return split_problems(parts)


def _image_features(parts: SplitParts) -> Any:
    """The features as (N_img, R, F) rows: 3-D as stored, 2-D global rows as one region each."""
    features = parts.features
    if len(features.shape) == 3:
        return features
    repeat = repeated_rows(parts)
    if repeat == 1 and isinstance(features, np.ndarray):
        return features[:, None, :]  # a view: a memmap stays a memmap, nothing is read
    return ImageRows(features, repeat=repeat, file=parts.file("features"))


def _uniform_count(index: np.ndarray, num_images: int) -> int | None:
    """k if `index` gives every image exactly k captions in order, else None."""
    if num_images == 0 or len(index) % num_images:
        return None
    k = len(index) // num_images
    return k if np.array_equal(index, np.arange(len(index)) // k) else None


def assemble(parts: SplitParts) -> Split:
    """A Split from parts that agree, or a DataError listing every disagreement."""
    problems = split_problems(parts)
    if problems:
        raise DataError("\n".join(problems))
    features = _image_features(parts)
    num_images = int(features.shape[0])
    index = None
    if parts.caption_index is not None:
        index = np.asarray(parts.caption_index, dtype=np.int64)
        per_image = _uniform_count(index, num_images)
        if per_image is not None:
            index = None  # k per image after all: the fast path, and captions_per_image is an int
    elif parts.declared_captions_per_image is not None:
        per_image = parts.declared_captions_per_image
    else:
        # The official im_div rule: as many captions as images means one per image.
        per_image = 1 if len(parts.captions) == num_images else CAPTIONS_PER_IMAGE
    if repeated_rows(parts) > 1:
        ImageRows(parts.features, repeat=repeated_rows(parts), file=parts.file("features")).rows(
            np.array([0, num_images - 1]))  # the first and last images' rows must repeat; the rest as read
    counts = None if parts.region_counts is None else np.asarray(parts.region_counts, dtype=np.int64)
    return Split(
        name=parts.name,
        features=features,
        captions=parts.captions,
        boxes=parts.boxes,
        image_sizes=parts.image_sizes,
        captions_per_image=per_image,
        source=parts.source,
        region_counts=counts,
        caption_index=index,
    )


def _ordered(splits: set[str]) -> list[str]:
    """The usual splits in their usual order, then any others alphabetically."""
    return [s for s in KNOWN_SPLITS if s in splits] + sorted(splits - set(KNOWN_SPLITS))


def available_splits(data_dir: str | Path) -> list[str]:
    """Names of the splits in `data_dir` (precomp files and the groups of its HDF5 file)."""
    from itmkit.data import hdf5, precomp  # imported here: both import this module

    data_dir = Path(data_dir)
    if data_dir.is_file():
        return _ordered(set(hdf5.split_names(data_dir)))
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    names = precomp.split_names(data_dir)
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
    if precomp.features_path(data_dir, split) is not None:  # a folder or a broken link too: read_parts says what it is
        return precomp.read_parts(data_dir, split)
    h5_path = hdf5.find_file(data_dir)
    if h5_path is not None:
        return hdf5.read_parts(h5_path, split)
    present = available_splits(data_dir)
    found = ", ".join(present) if present else "none"
    raise DataError(
        f"no split {split!r} in {data_dir}: looked for {data_dir / f'{split}_ims.npy'} (or IMRAM's {split}_feat.npy) and an "
        f"HDF5 file (data.h5, *.h5, *.hdf5); splits present: {found}"
        f"{did_you_mean(split, present) if present else ''}"
    )


def open_split(data_dir: str | Path, split: str) -> Split:
    """Open `split` of the dataset in `data_dir` (a precomp folder, or a folder or path of an HDF5 file)."""
    return assemble(open_parts(data_dir, split))


def stored_image_ids(data: str | Path, split: Split) -> list[str] | None:
    """The split's image ids as the data stores them, one per image, or None when it stores none.

    A precomp folder: ``{split}_ids.txt``, one line per image (or one per caption, the first of each image
    taken); an HDF5 file: the split's ``ids`` dataset. A file of another length is not used (None).
    """
    data = Path(data)
    if data.is_file():
        from itmkit.data.hdf5 import stored_ids

        lines = stored_ids(data, split.name)
    else:
        path = data / f"{split.name}_ids.txt"
        lines = [line.strip() for line in text_lines(read_text(path, "image id list"))] if path.is_file() else None
    if lines is None:
        return None
    if len(lines) == split.num_images:
        return lines
    if len(lines) == split.num_captions:
        return [lines[i] for i in np.searchsorted(split.caption_images, np.arange(split.num_images))]
    return None


def split_image_ids(data: str | Path, split: Split, log: Callable[[str], None] | None = None) -> list[str]:
    """The split's image ids (``stored_image_ids``), else the row numbers, said through ``log``."""
    ids = stored_image_ids(data, split)
    if ids is None:
        if log is not None and (Path(data) / f"{split.name}_ids.txt").is_file():
            log(f"{Path(data) / f'{split.name}_ids.txt'} does not have one line per image of split {split.name!r}"
                f" ({split.num_images}): images are named by row number")
        return [str(i) for i in range(split.num_images)]
    return ids
