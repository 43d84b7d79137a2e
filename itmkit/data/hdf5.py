"""itmkit's HDF5 layout: one file, one group per split, features chunked one image at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from itmkit.data import precomp
from itmkit.data.split import (CAPTIONS_PER_IMAGE, Split, SplitParts, array_problems, assemble, atomic_path,
                               data_file, stored_image_ids)
from itmkit.errors import DataError, did_you_mean

FILE_NAME = "data.h5"
FORMAT = "itmkit-hdf5"
VERSION = 1
# Images copied per step when writing, so no whole split is ever held in memory.
CHUNK_IMAGES = 256
# Optional datasets of a split group besides features and captions.
OPTIONAL_PARTS = ("boxes", "image_sizes", "region_counts", "caption_images")


def find_file(data_dir: str | Path) -> Path | None:
    """`data_dir`/data.h5, else its only *.h5 / *.hdf5 file, else None."""
    data_dir = Path(data_dir)
    if os.path.lexists(data_dir / FILE_NAME):  # a folder, FIFO or broken link too: the reader says what it is
        return data_dir / FILE_NAME
    found = sorted(p for pattern in ("*.h5", "*.hdf5") for p in data_dir.glob(pattern) if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(
            f"{data_dir} holds several HDF5 files ({names}) and no {FILE_NAME}; "
            f"name the one to use, or rename it to {FILE_NAME}"
        )
    return found[0] if found else None


def _resolve(path_or_dir: str | Path) -> Path:
    """The HDF5 file meant by a file path or a folder holding one."""
    path = Path(path_or_dir)
    if path.is_dir():
        found = find_file(path)
        if found is None:
            raise DataError(f"no HDF5 file in {path}: looked for {FILE_NAME}, *.h5 and *.hdf5")
        return found
    return data_file(path, "HDF5 file")  # never a FIFO: opening one would block


def _attribute(obj: Any, name: str, where: str) -> Any:
    """Attribute `name` of a file or group (None if absent), with a DataError if it cannot be read."""
    try:
        return obj.attrs.get(name)
    except (OSError, TypeError, ValueError) as err:
        raise DataError(f"{where} attribute {name} cannot be read: {err}") from None


def _version(value: Any, path: Path) -> int:
    """The file's `version` attribute as an int: a whole number, as the writers store it."""
    number = value
    if isinstance(number, np.ndarray) and number.shape in ((), (1,)):
        number = number.reshape(-1)[0]
    if isinstance(number, (bool, np.bool_)) or not isinstance(number, (int, np.integer, float, np.floating)) \
            or not np.isfinite(number) or number != int(number):
        raise DataError(f"{path}: root attribute version should be a whole number ({FORMAT} version, e.g. "
                        f"{VERSION}), found {value!r}")
    return int(number)


def _open_read(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, checking that a newer itmkit did not write it."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file: {err}") from None
    try:
        fmt = _attribute(f, "format", str(path))
        if isinstance(fmt, str) and fmt == FORMAT:  # an array attribute would compare elementwise
            version = _attribute(f, "version", str(path))
            if version is not None and _version(version, path) > VERSION:
                raise DataError(f"{path} uses {FORMAT} version {version}; this itmkit reads up to {VERSION}")
    except DataError:
        f.close()
        raise
    return f


def _link(group: h5py.Group, name: str) -> Any:
    """The link `name` in `group` without following it (None if absent): a broken one does not raise."""
    try:
        return group.get(name, getlink=True)
    except (KeyError, OSError, RuntimeError):
        return None


def _is_split_group(f: h5py.File, name: str) -> bool:
    """Groups holding a split (a `features` entry, whatever its kind); a leading dot marks one being written."""
    if name.startswith(".") or not isinstance(_link(f, name), h5py.HardLink):
        return False
    obj = f.get(name)
    return isinstance(obj, h5py.Group) and _link(obj, "features") is not None


def _object(group: h5py.Group, name: str, where: str) -> Any:
    """The object `name` in `group` (None if absent), refusing links that leave the file or lead nowhere."""
    link = _link(group, name)
    if link is None:
        return None
    if isinstance(link, h5py.ExternalLink):
        raise DataError(f"{where} is an external link to {link.filename}:{link.path}; expected a dataset stored "
                        f"in this file (copy the data in, e.g. with h5copy)")
    try:
        return group[name]
    except (KeyError, OSError, RuntimeError) as err:
        raise DataError(f"{where} is a link to {getattr(link, 'path', '?')}, which cannot be opened: {err}") from None


def _dataset(group: h5py.Group, name: str, where: str, what: str, *, ndim: int | None = None) -> h5py.Dataset | None:
    """Dataset `name` of `group` (None if absent), refusing a group, a broken or external link, a dataset
    without data (an empty dataspace) or of another number of dimensions, each naming `where`."""
    obj = _object(group, name, where)
    if obj is None:
        return None
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{where} is an HDF5 {type(obj).__name__.lower()}; expected a dataset holding {what}")
    if obj.shape is None:
        raise DataError(f"{where} is an empty dataset (no dataspace); expected {what}")
    if ndim is not None and obj.ndim != ndim:
        raise DataError(f"{where} has shape {obj.shape}; expected {what}")
    return obj


def _read(group: h5py.Group, name: str, where: str, what: str) -> np.ndarray | None:
    """A small dataset read whole (None if absent); split_problems checks its shape and dtype."""
    dataset = _dataset(group, name, where, what)
    if dataset is None:
        return None
    try:
        return np.asarray(dataset[()])
    except (OSError, TypeError, ValueError) as err:
        raise DataError(f"{where} cannot be read: {err}") from None


def _captions(dataset: h5py.Dataset, where: str) -> list[str]:
    """The captions of a 1-D string dataset, each decoded as UTF-8 (the bad one named)."""
    if dataset.dtype.kind not in ("O", "S", "U") or h5py.check_string_dtype(dataset.dtype) is None \
            and dataset.dtype.kind == "O":
        raise DataError(f"{where} should hold strings but has dtype {dataset.dtype}")
    try:
        raw = dataset[()]
    except (OSError, TypeError, ValueError) as err:
        raise DataError(f"{where} cannot be read: {err}") from None
    captions = []
    for i, value in enumerate(raw):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: caption {i} is not UTF-8 text (bad byte at offset {err.start}: "
                                f"{value[err.start:err.start + 1]!r})") from None
        captions.append(str(value))
    return captions


def split_names(path: str | Path) -> list[str]:
    """The splits (groups with a `features` entry) in an HDF5 file."""
    with _open_read(_resolve(path)) as f:
        return sorted(name for name in f.keys() if _is_split_group(f, name))


def read_parts(path_or_dir: str | Path, split: str) -> SplitParts:
    """The unchecked parts of `split`; the file stays open and features stay an h5py.Dataset."""
    path = _resolve(path_or_dir)
    f = _open_read(path)
    try:
        return _read_group(f, path, split)
    except BaseException:
        f.close()
        raise


def _read_group(f: h5py.File, path: Path, split: str) -> SplitParts:
    """read_parts on an open file; every object is fetched as the kind it must be."""
    splits = [name for name in f.keys() if _is_split_group(f, name)]
    if not _is_split_group(f, split):
        found = ", ".join(sorted(splits)) if splits else "none"
        raise DataError(
            f"{path} has no split group '/{split}'{did_you_mean(split, splits) if splits else ''}; "
            f"splits present: {found}"
        )
    group = f[split]
    files = {part: f"{path}:/{split}/{part}" for part in OPTIONAL_PARTS + ("features", "captions")}
    files["captions_per_image"] = f"{path}:/{split} attribute captions_per_image"
    features = _dataset(group, "features", files["features"], "the image features (images, regions, dim)")
    captions_ds = _dataset(group, "captions", files["captions"], "one caption string per row", ndim=1)
    if captions_ds is None:
        raise DataError(f"{files['captions']} does not exist (every split needs its captions)")
    captions = _captions(captions_ds, files["captions"])
    per_image = _attribute(group, "captions_per_image", f"{path}:/{split}")
    if per_image is not None and (not isinstance(per_image, (int, np.integer)) or isinstance(per_image, bool)):
        raise DataError(f"{files['captions_per_image']} should be an integer, found {per_image!r}")
    return SplitParts(
        name=split,
        layout="hdf5",
        source=str(path),
        features=features,
        captions=captions,
        boxes=_read(group, "boxes", files["boxes"], "boxes (images, regions, 4 or 30)"),
        image_sizes=_read(group, "image_sizes", files["image_sizes"], "width, height per image (images, 2)"),
        files=files,
        declared_captions_per_image=None if per_image is None else int(per_image),
        region_counts=_read(group, "region_counts", files["region_counts"], "one region count per image"),
        caption_index=_read(group, "caption_images", files["caption_images"], "the image of each caption"),
    )


def stored_ids(path: str | Path, split: str) -> list[str] | None:
    """The ``ids`` dataset of ``split`` in an HDF5 file (one image id per image), or None without one."""
    with _open_read(Path(path)) as f:
        if split not in f or "ids" not in f[split]:
            return None
        return [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in f[split]["ids"][()]]


def read_split(path_or_dir: str | Path, split: str) -> Split:
    """Open `split` of an HDF5 file (or of the HDF5 file in a folder), checking that its parts agree."""
    return assemble(read_parts(path_or_dir, split))


@contextmanager
def _writable(path: Path) -> Iterator[h5py.File]:
    """An existing file opened for changes in place, or a new one written beside and renamed."""
    if path.exists():
        try:
            f = h5py.File(path, "a")
        except OSError as err:
            raise DataError(f"cannot open {path} for writing: {err}") from None
        with f:
            yield f
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            yield f


def _write_group(
    f: h5py.File,
    split: str,
    *,
    features: Any,
    captions: Sequence[str],
    boxes: np.ndarray | None,
    image_sizes: np.ndarray | None,
    compression: str | None,
    region_counts: Any = None,
    captions_per_image: int | None = None,
    caption_images: Any = None,
    ids: Sequence[str] | None = None,
) -> None:
    """Write one split group, replacing any old one only once the new one is complete."""
    captions = list(captions)
    num_images, *_ = features.shape
    num_images = int(num_images)
    stored = tuple(int(n) for n in features.shape)
    staging = f".{split}.partial"
    if staging in f:
        del f[staging]
    group = f.create_group(staging)
    try:
        if caption_images is None:
            # Declared for any k; without a declaration, the im_div rule of the reader.
            if captions_per_image is None:
                captions_per_image = 1 if len(captions) == num_images else CAPTIONS_PER_IMAGE
            group.attrs["captions_per_image"] = int(captions_per_image)
        out = group.create_dataset(
            "features",
            shape=stored,
            dtype=np.float32,
            # One image per chunk: a batch reads exactly the rows it needs.
            chunks=(1, *stored[1:]) if num_images else None,
            compression=compression,
        )
        for start in range(0, num_images, CHUNK_IMAGES):
            stop = min(start + CHUNK_IMAGES, num_images)
            out[start:stop] = np.asarray(features[start:stop], dtype=np.float32)
        group.create_dataset("captions", data=np.array(captions, dtype=object), dtype=h5py.string_dtype("utf-8"))
        if boxes is not None:
            group.create_dataset("boxes", data=np.asarray(boxes))
        if image_sizes is not None:
            group.create_dataset("image_sizes", data=np.asarray(image_sizes))
        if region_counts is not None:
            group.create_dataset("region_counts", data=np.asarray(region_counts, dtype=np.int64))
        if caption_images is not None:
            group.create_dataset("caption_images", data=np.asarray(caption_images, dtype=np.int64))
        if ids is not None:
            group.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=h5py.string_dtype("utf-8"))
    except BaseException:
        del f[staging]
        raise
    if split in f:
        del f[split]
    f.move(staging, split)


def write_split(
    path: str | Path,
    split: str,
    *,
    features: Any,
    captions: Sequence[str],
    boxes: np.ndarray | None = None,
    image_sizes: np.ndarray | None = None,
    compression: str | None = None,
    region_counts: Any = None,
    captions_per_image: int | None = None,
    caption_images: Any = None,
) -> None:
    """Add or replace group /`split` (a new file is written atomically; an existing one in place).

    Optional declarations, as for precomp.write_split: ``region_counts`` (N_img,) valid regions
    per zero-padded image (dataset `region_counts`); ``captions_per_image`` k (the group's
    attribute); ``caption_images`` the image of each caption (dataset `caption_images`).
    """
    path = Path(path)
    if not hasattr(features, "shape"):
        features = np.asarray(features, dtype=np.float32)
    files = {part: f"{path}:/{split}/{part} (to be written)" for part in OPTIONAL_PARTS + ("features", "captions")}
    files["captions_per_image"] = f"{path}:/{split} attribute captions_per_image (to be written)"
    problems = array_problems(split, features, list(captions), boxes, image_sizes, files=files,
                              region_counts=region_counts, captions_per_image=captions_per_image,
                              caption_index=caption_images)
    if captions_per_image is not None and caption_images is not None:
        problems.append("give captions_per_image (k for every image) or caption_images (each caption's image), "
                        "not both.")
    if problems:
        raise DataError("\n".join(problems))
    with _writable(path) as f:
        _write_group(
            f,
            split,
            features=features,
            captions=captions,
            boxes=boxes,
            image_sizes=image_sizes,
            compression=compression,
            region_counts=region_counts,
            captions_per_image=captions_per_image,
            caption_images=caption_images,
        )


def convert_precomp_to_hdf5(
    src_dir: str | Path,
    dst_path: str | Path,
    splits: Sequence[str] | None = None,
    *,
    compression: str | None = None,
) -> list[str]:
    """Copy precomp splits (all of them by default) into one HDF5 file, streaming the features."""
    src_dir = Path(src_dir)
    if splits is None:
        splits = sorted(precomp.split_names(src_dir))
        if not splits:
            raise DataError(f"no precomp splits (*_ims.npy or IMRAM's *_feat.npy files) in {src_dir}")
    opened = [precomp.read_split(src_dir, name) for name in splits]  # check all before writing
    with _writable(Path(dst_path)) as f:
        for split in opened:
            _write_group(
                f,
                split.name,
                features=split.features,
                captions=split.captions,
                boxes=split.boxes,
                image_sizes=split.image_sizes,
                compression=compression,
                region_counts=split.region_counts,
                captions_per_image=split.captions_per_image,
                caption_images=split.caption_index,
                ids=stored_image_ids(src_dir, split),  # {split}_ids.txt, when there is one for every image
            )
    return list(splits)
