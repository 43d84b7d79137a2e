"""Convert bottom-up-attention region features into the precomp or HDF5 layout, streaming.

Two sources, both as the extractors write them:

- the ``generate_tsv`` TSV of peteanderson80/bottom-up-attention: no header, tab-separated
  fields ``image_id, image_w, image_h, num_boxes, boxes, features``, the last two base64 of
  float32 arrays (num_boxes, 4) (x1, y1, x2, y2 in pixels) and (num_boxes, D);
- a folder of per-image ``.npz`` files (py-bottom-up-attention / bua-caffe: features ``x``,
  boxes ``bbox``, ``num_bbox``, ``image_w``, ``image_h``; also ``feat`` / ``features`` and
  ``boxes`` / ``num_boxes``) or ``.npy`` files holding just the (num_boxes, D) features; the
  file name without its extension is the image id.

COCO's features are tens of GB, so nothing is held whole: a first pass reads only sizes (the
box counts, the feature width; for the TSV from the base64 lengths, for .npz from the array
headers), then each image is decoded and written into its row of a memory-mapped .npy or an
HDF5 dataset. Images have varying box counts (10 to 100 for the adaptive features): rows are
zero-padded to the largest count (or ``regions``, keeping the first boxes of a larger image)
and each image's count is written beside them (``{split}_region_counts.npy``). Image ids go to
``{split}_ids.txt`` (HDF5: dataset ``ids``) in row order, so captions can be joined; given a
captions table, they are joined here.

Output appears only complete: every file is written under a hidden temporary name and renamed
at the end, the features file last (a split exists once its features do); an HDF5 split group
is built under a hidden name and moved into place. A killed conversion leaves only hidden
``*.tmp`` files (or a hidden ``.{split}.partial`` group), which no reader picks up.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import math
import os
import re
import sys
import unicodedata
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import h5py
import numpy as np

from itmkit.data import hdf5, precomp
from itmkit.data.split import read_text, text_lines
from itmkit.errors import DataError
from itmkit.inputs import input_file, strict_int

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# keys of a per-image .npz, in the order they are looked for
NPZ_KEYS = {
    "features": ("x", "feat", "features"),
    "boxes": ("bbox", "boxes"),
    "count": ("num_bbox", "num_boxes"),
    "width": ("image_w",),
    "height": ("image_h",),
}
FORMATS = ("precomp", "hdf5")
Progress = Callable[..., None]  # update(done, total=None, info="")


@attrs.frozen
class Image:
    """One image as a source gives it: its id, (count, D) features and optionally boxes and size."""

    image_id: str
    features: np.ndarray
    boxes: np.ndarray | None
    size: tuple[float, float] | None  # (width, height)
    where: str  # file and line or file, for messages


@attrs.frozen
class Survey:
    """What the first pass learns: the ids in source order, each image's box count, the feature width."""

    ids: list[str]
    counts: list[int]
    dim: int
    boxes: bool
    sizes: bool


@attrs.frozen
class Converted:
    """What ``convert`` wrote."""

    split: str
    images: int
    regions: int
    dim: int
    truncated: int  # images with more boxes than ``regions``, cut to the first ones
    captions: int
    files: list[str]


# ==================================================================================== sources


@contextlib.contextmanager
def _huge_csv_fields() -> Iterator[None]:
    """A feature field is megabytes of base64, far over csv's default limit (128 KiB): lift it, then restore it."""
    old = csv.field_size_limit()
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # where a C long is 32 bits
        csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _b64_size(text: str) -> int:
    """Bytes that a base64 string decodes to, without decoding it."""
    return len(text) // 4 * 3 - text.endswith("=") - text.endswith("==")


class TsvSource:
    """The generate_tsv TSV: one image per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self) -> Iterator[tuple[int, list[str]]]:
        # surrogateescape keeps a byte that is not UTF-8 visible (as U+DC80..U+DCFF) so that it is refused
        # below; errors="replace" made it U+FFFD, and two different ids could become one.
        with _huge_csv_fields(), open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for number, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
                if not row:
                    continue
                if len(row) != len(TSV_FIELDS):
                    raise DataError(f"{self.path}, line {number}: {len(row)} tab-separated fields, expected"
                                    f" {len(TSV_FIELDS)} ({', '.join(TSV_FIELDS)}) as generate_tsv writes them")
                bad = next((i for i, field in enumerate(row[:4]) if _NOT_UTF8.search(field)), None)
                if bad is not None:
                    byte = ord(_NOT_UTF8.search(row[bad]).group()) - 0xDC00
                    raise DataError(f"{self.path}, line {number}: {TSV_FIELDS[bad]} holds the byte 0x{byte:02x}, which"
                                    " is not UTF-8 text; save the file as UTF-8")
                problem = id_problem(row[0])
                if problem:
                    raise DataError(f"{self.path}, line {number}: {problem}")
                yield number, row

    def _count(self, row: list[str], where: str) -> int:
        count = strict_int(row[3])
        if count is None:
            raise DataError(f"{where}: num_boxes is {row[3][:20]!r}, expected an integer in ASCII digits")
        if count < 1:
            raise DataError(f"{where}: num_boxes is {count}; every image needs at least one box")
        return count

    def survey(self, progress: Progress) -> Survey:
        ids, counts, dim = [], [], None
        for number, row in self._rows():
            where = f"{self.path}, line {number} (image {row[0]})"
            count = self._count(row, where)
            if _b64_size(row[4]) != count * 4 * 4:
                raise DataError(f"{where}: boxes hold {_b64_size(row[4])} bytes, expected num_boxes x 4 float32 ="
                                f" {count * 16}")
            width, rest = divmod(_b64_size(row[5]), count * 4)
            if rest or width < 1:
                raise DataError(f"{where}: features hold {_b64_size(row[5])} bytes, not num_boxes ({count}) rows of"
                                " float32")
            if dim is not None and width != dim:
                raise DataError(f"{where}: {width}-d features, but earlier images have {dim}-d")
            _check_size(_tsv_size(row, where), where)  # cheap, so before any work rather than midway
            dim = width
            ids.append(row[0])
            counts.append(count)
            progress(len(ids), None, f"surveyed {len(ids)} images")
        if dim is None:
            raise DataError(f"{self.path} holds no images")
        return Survey(ids, counts, dim, boxes=True, sizes=True)

    def images(self) -> Iterator[Image]:
        for number, row in self._rows():
            where = f"{self.path}, line {number} (image {row[0]})"
            count = self._count(row, where)
            try:
                boxes, feats = (np.frombuffer(base64.b64decode(row[i], validate=True), dtype=np.float32)
                                for i in (4, 5))
            except (binascii.Error, ValueError) as err:
                raise DataError(f"{where}: cannot decode the image's fields: {err}") from None
            yield Image(row[0], feats.reshape(count, -1), boxes.reshape(count, 4), _tsv_size(row, where), where)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape decodes them
_WHOLE = re.compile(r"([0-9]{1,9})(\.0*)?")  # a pixel count: '640', or '640.0' as a float column writes it


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be an image id, or None: ids are joined to captions and written one per line,
    so an empty one, or one with white space around it (' 1' and '1' would be two images), is refused."""
    if not image_id:
        return "the image id is empty"
    if image_id != image_id.strip():
        return f"the image id {image_id[:40]!r} has white space around it; ids are compared as written"
    return None


def _tsv_size(row: list[str], where: str) -> tuple[float, float]:
    found = [_WHOLE.fullmatch(text) for text in row[1:3]]
    if not all(found):
        raise DataError(f"{where}: image_w, image_h are {row[1][:20]!r}, {row[2][:20]!r}; expected whole numbers of"
                        " pixels in ASCII digits (as generate_tsv writes them)")
    return float(found[0].group(1)), float(found[1].group(1))


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    return tuple(shape), dtype


class FolderSource:
    """A folder of per-image .npz (features, boxes, size) or .npy (features only) files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        found = (p for p in folder.iterdir() if p.suffix in (".npz", ".npy") and not p.name.startswith("."))
        # Each per-image file a regular file before any is opened: a FIFO among them would block the scan.
        self.files = sorted((input_file(p, "per-image file") for p in found), key=_natural)
        if not self.files:
            raise DataError(f"{folder} holds no .npz or .npy files (one per image)")

    def _keys(self, path: Path, archive: zipfile.ZipFile) -> dict[str, str | None]:
        names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
        keys = {part: next((k for k in options if k in names), None) for part, options in NPZ_KEYS.items()}
        if keys["features"] is None:
            raise DataError(f"{path} has no features array: looked for {', '.join(NPZ_KEYS['features'])};"
                            f" it holds {', '.join(sorted(names)) or 'nothing'}")
        if (keys["width"] is None) != (keys["height"] is None):
            raise DataError(f"{path} has only one of image_w and image_h")
        return keys

    def _read(self, path: Path, archive: zipfile.ZipFile, key: str) -> np.ndarray:
        with archive.open(key + ".npy") as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)  # never unpickle (bua-caffe's 'info')

    def _number(self, path: Path, archive: zipfile.ZipFile, key: str, integer: bool = False) -> float:
        """A scalar entry (num_bbox, image_w, image_h): one real number, saved as a 0-d or one-element array."""
        value = self._read(path, archive, key)
        if value.size != 1 or value.dtype.kind not in ("iu" if integer else "iuf"):
            what = "an integer" if integer else "a number"
            raise DataError(f"{path}: {key} holds {value.dtype} of shape {value.shape}; expected one number ({what})")
        return int(value.item()) if integer else float(value.item())

    def _count(self, path: Path, archive: zipfile.ZipFile, keys: dict[str, str | None], rows: int) -> int:
        """The box count: the feature rows, or fewer when num_bbox says the rest are padding."""
        if keys["count"] is None:
            return rows
        count = self._number(path, archive, keys["count"], integer=True)
        if count > rows:
            raise DataError(f"{path}: {keys['count']} = {count}, but {keys['features']} has only {rows} feature rows")
        return count

    def _box_rows(self, path: Path, shape: tuple[int, ...], keys: dict[str, str | None], rows: int, count: int) -> None:
        """One (x1, y1, x2, y2) row per box: as many as the feature rows, or as num_bbox says when those are padded."""
        box_rows = 1 if shape == (4,) else shape[0] if len(shape) == 2 and shape[1] == 4 else None
        if box_rows is None:
            raise DataError(f"{path}: {keys['boxes']} has shape {shape}; expected (num_boxes, 4) boxes x1, y1, x2, y2")
        if box_rows not in (rows, count):
            counted = f" and {keys['count']} = {count}" if count != rows else ""
            raise DataError(f"{path}: {keys['boxes']} has {box_rows} boxes but {keys['features']} has {rows} feature"
                            f" rows{counted}; each box needs its feature row")

    def _shape(self, path: Path) -> tuple[int, int, bool, bool]:
        """(count, D, has boxes, has size) of one file, from headers and scalars only."""
        try:
            if path.suffix == ".npy":
                with open(path, "rb") as stream:
                    shape, _ = _npy_header(stream)
                return (*_rows_and_width(shape, path), False, False)
            with zipfile.ZipFile(path) as archive:
                keys = self._keys(path, archive)
                with archive.open(keys["features"] + ".npy") as stream:
                    shape, _ = _npy_header(stream)
                rows, width = _rows_and_width(shape, path)
                count = self._count(path, archive, keys, rows)
                if keys["boxes"] is not None:
                    with archive.open(keys["boxes"] + ".npy") as stream:
                        self._box_rows(path, _npy_header(stream)[0], keys, rows, count)
                if keys["width"] is not None:
                    _check_size(self._size(path, archive, keys), str(path))  # cheap, so before any work
                return count, width, keys["boxes"] is not None, keys["width"] is not None
        except (OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
            raise DataError(f"{path} is not a readable .npy/.npz file: {err}") from None

    def survey(self, progress: Progress) -> Survey:
        ids, counts, dim, kinds = [], [], None, None
        for path in self.files:
            count, width, has_boxes, has_size = self._shape(path)
            if count < 1:
                raise DataError(f"{path}: no boxes; every image needs at least one")
            if dim is not None and width != dim:
                raise DataError(f"{path}: {width}-d features, but {self.files[0].name} has {dim}-d")
            if kinds is not None and (has_boxes, has_size) != kinds:
                raise DataError(f"{path}: boxes {'present' if has_boxes else 'absent'}, size"
                                f" {'present' if has_size else 'absent'}, unlike {self.files[0].name}; every file"
                                " must hold the same arrays")
            dim, kinds = width, (has_boxes, has_size)
            problem = id_problem(path.stem)
            if problem:
                raise DataError(f"{path}: {problem} (a file's name is its image's id)")
            ids.append(path.stem)
            counts.append(count)
            progress(len(ids), len(self.files), f"surveyed {path.name}")
        return Survey(ids, counts, dim, boxes=kinds[0], sizes=kinds[1])

    def images(self) -> Iterator[Image]:
        for path in self.files:
            where = str(path)
            try:
                if path.suffix == ".npy":
                    feats = np.load(path, allow_pickle=False)
                    yield Image(path.stem, feats.reshape(-1, feats.shape[-1]), None, None, where)
                    continue
                with zipfile.ZipFile(path) as archive:
                    keys = self._keys(path, archive)
                    feats = self._read(path, archive, keys["features"])
                    feats = feats.reshape(-1, feats.shape[-1])
                    count = self._count(path, archive, keys, feats.shape[0])
                    boxes = None
                    if keys["boxes"] is not None:
                        boxes = self._read(path, archive, keys["boxes"])
                        self._box_rows(path, boxes.shape, keys, feats.shape[0], count)
                        boxes = boxes.reshape(-1, 4)[:count]
                    size = self._size(path, archive, keys) if keys["width"] is not None else None
            except (OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
                raise DataError(f"{path} is not a readable .npy/.npz file: {err}") from None
            yield Image(path.stem, feats[:count], boxes, size, where)

    def _size(self, path: Path, archive: zipfile.ZipFile, keys: dict[str, str | None]) -> tuple[float, float]:
        return self._number(path, archive, keys["width"]), self._number(path, archive, keys["height"])


# Image sizes are stored as int64 pixels: a width past this is no photograph, and past 2**63 it would wrap.
MAX_SIDE = 2**31 - 1


def _check_size(size: tuple[float, float] | None, where: str) -> None:
    """Refuse an image size that is not a positive, finite pixel count (PFAN and DP-RNN divide by it)."""
    if size is None:
        return
    width, height = size
    if not all(math.isfinite(v) and 0 < v <= MAX_SIDE for v in size):
        raise DataError(f"{where}: image size (image_w, image_h) is {width!r} x {height!r}; expected positive,"
                        f" finite pixel counts (at most {MAX_SIDE})")


def checked(image: Image) -> Image:
    """The image as it will be written (float32 features and boxes), refused where that would be wrong.

    One place for every source: the values are checked after the cast to float32, because a float64
    feature of 1e39 is finite in the source and infinite in the file.
    """
    for part, array in (("features", image.features), ("boxes", image.boxes)):
        if array is not None and array.dtype.kind not in "iuf":
            raise DataError(f"{image.where}: the {part} are {array.dtype}; expected real numbers (float32)")
    with np.errstate(over="ignore", invalid="ignore"):
        feats = np.asarray(image.features, dtype=np.float32)
        boxes = None if image.boxes is None else np.asarray(image.boxes, dtype=np.float32)
    for part, array, source in (("features", feats, image.features), ("boxes", boxes, image.boxes)):
        if array is None or np.all(np.isfinite(array)):
            continue
        bad = ~np.isfinite(array)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        beyond = bool(np.all(np.isfinite(source)))
        cause = ("values beyond float32's range (|x| > 3.4e38), which become inf" if beyond
                 else "non-finite values (NaN or inf)")
        raise DataError(f"{image.where}: the {part} hold {cause}: {int(bad.sum())} value(s), the first in row"
                        f" {first[0]}")
    _check_size(image.size, image.where)
    return attrs.evolve(image, features=feats, boxes=boxes)


def _rows_and_width(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    if len(shape) == 1:  # one global feature
        return 1, shape[0]
    if len(shape) != 2:
        raise DataError(f"{path}: features of shape {shape}; expected (num_boxes, D)")
    return shape[0], shape[1]


def _natural(path: Path) -> tuple:
    """Sort key putting '2.npz' before '10.npz'."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def open_source(src: str | Path) -> TsvSource | FolderSource:
    """The source at ``src``: a TSV file, or a folder of per-image files."""
    src = Path(src)
    if src.is_dir():
        return FolderSource(src)
    return TsvSource(input_file(src, "source", missing="{path} does not exist"))  # a FIFO or a device: refused


# =================================================================================== captions


def normal_id(image_id: str) -> str:
    """An image id in Unicode NFC: 'ü' as one code point and as 'u' + a combining mark look identical, are one id.

    File names from macOS are decomposed (NFD), caption tables usually composed: both sides are
    compared, and ids written, in NFC.
    """
    return unicodedata.normalize("NFC", image_id)


def image_key(image_id: str) -> str:
    """The id that joins images and captions: Flickr's '1000092795.jpg#0' and a '1000092795' file are one image."""
    key = normal_id(image_id).strip().split("#", 1)[0]
    stem, dot, extension = key.rpartition(".")
    return stem if dot and extension.lower() in ("jpg", "jpeg", "png") else key


def read_caption_table(path: str | Path) -> dict[str, list[str]]:
    """``IMAGE_ID<TAB>caption`` lines (Flickr30K's results_20130124.token layout) -> captions by image key."""
    table: dict[str, list[str]] = {}
    for number, line in enumerate(text_lines(read_text(path, "captions table")), start=1):
        if not line.strip():
            continue
        image_id, tab, caption = line.partition("\t")
        if not tab or not caption.strip():
            raise DataError(f"captions table {path}, line {number}: expected IMAGE_ID<TAB>caption, found {line[:60]!r}")
        table.setdefault(image_key(image_id), []).append(caption.strip())
    return table


def join_captions(ids: Sequence[str], table: dict[str, list[str]], path: str | Path
                  ) -> tuple[list[str], int | None, list[int] | None]:
    """Captions in image order, and either k (the same count for every image) or each caption's image."""
    captions, owners = [], []
    for row, image_id in enumerate(ids):
        found = table.get(image_key(image_id))
        if not found:
            raise DataError(f"captions table {path} has no caption for image {image_id!r} (row {row});"
                            " its ids must match the feature source's")
        captions.extend(found)
        owners.extend([row] * len(found))
    counts = {len(table[image_key(i)]) for i in ids}
    return (captions, counts.pop(), None) if len(counts) == 1 else (captions, None, owners)


# ==================================================================================== writers


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class PrecompWriter:
    """Rows into memory-mapped .npy files under temporary names; ``commit`` renames them, features last."""

    def __init__(self, folder: Path, split: str, images: int, regions: int, dim: int, boxes: bool, sizes: bool):
        folder.mkdir(parents=True, exist_ok=True)
        self.names = {part: folder / name for part, name in precomp.file_names(split).items()}
        self.temps: dict[str, Path] = {}
        self.features = self._array("features", (images, regions, dim), np.float32)
        self.boxes = self._array("boxes", (images, regions, 4), np.float32) if boxes else None
        self.sizes = np.zeros((images, 2), dtype=np.int64) if sizes else None
        self.counts = np.zeros(images, dtype=np.int64)

    def _array(self, part: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        self.temps[part] = _temp(self.names[part])
        return np.lib.format.open_memmap(self.temps[part], mode="w+", dtype=dtype, shape=shape)  # zero-filled

    def put(self, row: int, feats: np.ndarray, boxes: np.ndarray | None, size: tuple[float, float] | None) -> None:
        count = feats.shape[0]
        self.features[row, :count] = feats
        if self.boxes is not None:
            self.boxes[row, :count] = boxes
        if self.sizes is not None:
            self.sizes[row] = np.round(size)
        self.counts[row] = count

    def _small(self, part: str, array: np.ndarray | None = None, lines: Sequence[str] | None = None) -> None:
        self.temps[part] = _temp(self.names[part])
        if array is not None:
            with open(self.temps[part], "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, array)
        else:
            self.temps[part].write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    def commit(self, ids: Sequence[str], captions: Sequence[str] | None, per_image: int | None,
               owners: Sequence[int] | None) -> list[str]:
        for array in (self.features, self.boxes):
            if array is not None:
                array.flush()
        self.features = self.boxes = None  # close the maps before the renames
        if self.sizes is not None:
            self._small("image_sizes", self.sizes)
        self._small("region_counts", self.counts)
        self._small("ids", lines=list(ids))
        if captions is not None:
            self._small("captions", lines=list(captions))
            if owners is not None:
                self._small("caption_images", lines=[str(i) for i in owners])
            else:
                self._small("captions_per_image", lines=[str(per_image)])
        # The features file marks a split as present: take the old one away first, put the new one in last,
        # and drop declarations of an earlier conversion that this one does not replace.
        self.names["features"].unlink(missing_ok=True)
        for part in ("boxes", "image_sizes", "captions_per_image", "caption_images"):
            if part not in self.temps:
                self.names[part].unlink(missing_ok=True)
        for part in sorted(self.temps, key=lambda p: p == "features"):
            os.replace(self.temps[part], self.names[part])
        written = [str(self.names[p]) for p in self.temps]
        self.temps = {}
        return written

    def abort(self) -> None:
        self.features = self.boxes = None
        for path in self.temps.values():
            path.unlink(missing_ok=True)


class Hdf5Writer:
    """Rows into a split group built under a hidden name (in a new file: a temporary file), moved in at the end."""

    def __init__(self, path: Path, split: str, images: int, regions: int, dim: int, boxes: bool, sizes: bool):
        self.path, self.split = path, split
        self.staging = f".{split}.partial"
        self.temp = None if path.exists() else _temp(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = h5py.File(self.temp or path, "w" if self.temp else "a")
        except OSError as err:
            raise DataError(f"cannot open {path} for writing: {err}") from None
        if self.temp:
            self.file.attrs["format"], self.file.attrs["version"] = hdf5.FORMAT, hdf5.VERSION
        if self.staging in self.file:
            del self.file[self.staging]
        group = self.group = self.file.create_group(self.staging)
        # one image per chunk, as hdf5.write_split lays it out: a batch reads exactly its rows
        self.features = group.create_dataset("features", (images, regions, dim), np.float32, chunks=(1, regions, dim))
        self.boxes = group.create_dataset("boxes", (images, regions, 4), np.float32) if boxes else None
        self.sizes = np.zeros((images, 2), dtype=np.int64) if sizes else None
        self.counts = np.zeros(images, dtype=np.int64)

    def put(self, row: int, feats: np.ndarray, boxes: np.ndarray | None, size: tuple[float, float] | None) -> None:
        count = feats.shape[0]
        padded = np.zeros(self.features.shape[1:], dtype=np.float32)  # a whole chunk per write
        padded[:count] = feats
        self.features[row] = padded
        if self.boxes is not None:
            self.boxes[row, :count] = boxes
        if self.sizes is not None:
            self.sizes[row] = np.round(size)
        self.counts[row] = count

    def commit(self, ids: Sequence[str], captions: Sequence[str] | None, per_image: int | None,
               owners: Sequence[int] | None) -> list[str]:
        strings = h5py.string_dtype("utf-8")
        group = self.group
        if self.sizes is not None:
            group.create_dataset("image_sizes", data=self.sizes)
        group.create_dataset("region_counts", data=self.counts)
        group.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=strings)
        group.create_dataset("captions", data=np.array(list(captions or []), dtype=object), dtype=strings)
        if owners is not None:
            group.create_dataset("caption_images", data=np.asarray(owners, dtype=np.int64))
        elif per_image is not None:
            group.attrs["captions_per_image"] = int(per_image)
        if self.split in self.file:
            del self.file[self.split]
        self.file.move(self.staging, self.split)
        self.file.close()
        if self.temp:
            os.replace(self.temp, self.path)
            self.temp = None
        return [f"{self.path}:/{self.split}"]

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self.file and self.staging in self.file:
                del self.file[self.staging]
        with contextlib.suppress(Exception):
            self.file.close()
        if self.temp:
            self.temp.unlink(missing_ok=True)


# =================================================================================== convert


def _order(survey: Survey, ids: Sequence[str] | None, source: str) -> tuple[list[str], dict[str, int]]:
    """The ids to write in row order, and each one's row (the source's order unless ``ids`` is given)."""
    seen: dict[str, int] = {}
    for i, raw in enumerate(survey.ids):
        image_id = normal_id(raw)
        if image_id in seen:
            first = survey.ids[seen[image_id]]
            if first == raw:
                raise DataError(f"{source}: image {raw!r} appears twice (entries {seen[image_id] + 1} and {i + 1})")
            raise DataError(f"{source}: images {ascii(first)} (entry {seen[image_id] + 1}) and {ascii(raw)} (entry"
                            f" {i + 1}) are one id written two ways (Unicode normalisation: they look identical);"
                            " rename one")
        seen[image_id] = i
    if ids is None:
        order = [normal_id(i) for i in survey.ids]
        return order, {image_id: row for row, image_id in enumerate(order)}
    wanted = [normal_id(str(i).strip()) for i in ids if str(i).strip()]
    missing = [i for i in wanted if i not in seen]
    if missing:
        raise DataError(f"{len(missing)} image id(s) of the id list are not in {source}, e.g. {missing[:3]}")
    rows = {}
    for row, image_id in enumerate(wanted):
        if image_id in rows:
            raise DataError(f"the id list names image {image_id!r} twice")
        rows[image_id] = row
    return wanted, rows


def _refuse_stale_captions(folder: Path, split: str) -> None:
    """Without --captions, captions already in the folder would stay beside the new features and be scored with them."""
    names = precomp.file_names(split)
    for part in ("captions", "caption_images", "captions_per_image"):
        stale = folder / names[part]
        if stale.exists():
            raise DataError(f"{stale} exists (an earlier dataset's captions) and this conversion writes no captions:"
                            " they would be scored against the new features; pass --captions FILE"
                            " (IMAGE_ID<TAB>caption) to replace them, or remove the file")


def convert(src: str | Path, dst: str | Path, *, split: str, fmt: str = "precomp", regions: int | None = None,
            ids: Sequence[str] | None = None, captions: str | Path | None = None,
            progress: Progress | None = None) -> Converted:
    """Convert a generate_tsv TSV or a folder of per-image .npz/.npy files into split ``split`` of ``dst``.

    ``dst`` is a folder (precomp) or an HDF5 file (hdf5). ``regions`` fixes the regions per image
    (default: the most any image has); ``ids`` picks and orders the images (default: all, in the
    source's order); ``captions`` is an ``IMAGE_ID<TAB>caption`` table joined to the images.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split):
        raise DataError(f"split name {split!r} is not a plain name (letters, digits, '_', '-', '.')")
    if regions is not None and regions < 1:
        raise DataError(f"regions must be at least 1, got {regions}")
    if fmt == "hdf5" and captions is None:
        raise DataError("an HDF5 split holds its captions: give the captions table (IMAGE_ID<TAB>caption lines)")
    if fmt == "precomp" and captions is None:
        _refuse_stale_captions(Path(dst), split)
    update = progress or (lambda done, total=None, info="": None)
    source = open_source(src)
    table = read_caption_table(captions) if captions is not None else None  # read before the long passes
    survey = source.survey(update)
    order, rows = _order(survey, ids, str(src))
    counts = {normal_id(image_id): c for image_id, c in zip(survey.ids, survey.counts)}
    width = regions or max(counts[i] for i in order)
    joined = join_captions(order, table, captions) if table is not None else (None, None, None)
    writer_class = PrecompWriter if fmt == "precomp" else Hdf5Writer
    writer = writer_class(Path(dst), split, len(order), width, survey.dim, survey.boxes, survey.sizes)
    truncated = done = 0
    try:
        for image in source.images():
            row = rows.get(normal_id(image.image_id))
            if row is None:
                continue
            image = checked(image)
            feats = image.features
            if feats.shape[0] > width:
                truncated += 1
            keep = min(feats.shape[0], width)
            writer.put(row, feats[:keep], None if image.boxes is None else image.boxes[:keep], image.size)
            done += 1
            update(done, len(order), image.image_id)
        written = writer.commit(order, *joined)
    except BaseException:
        writer.abort()
        raise
    return Converted(split, len(order), width, survey.dim, truncated, len(joined[0] or []), written)
