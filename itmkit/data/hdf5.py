"""itmkit's HDF5 layout: one file, one group per split, features chunked one image at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from itmkit.data import precomp
from itmkit.data.split import CAPTIONS_PER_IMAGE, Split, SplitParts, array_problems, assemble, atomic_path
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
    if (data_dir / FILE_NAME).is_file():
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
    if not path.is_file():
        raise DataError(f"HDF5 file {path} does not exist")
    return path


def _open_read(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, checking that a newer itmkit did not write it."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file: {err}") from None
    version = f.attrs.get("version")
    if f.attrs.get("format") == FORMAT and version is not None and int(version) > VERSION:
        f.close()
        raise DataError(f"{path} uses {FORMAT} version {version}; this itmkit reads up to {VERSION}")
    return f


def _is_split_group(name: str, obj: Any) -> bool:
    """Groups holding a split; a leading dot marks one being written."""
    return isinstance(obj, h5py.Group) and not name.startswith(".") and "features" in obj


def split_names(path: str | Path) -> list[str]:
    """The splits (groups with a `features` dataset) in an HDF5 file."""
    with _open_read(_resolve(path)) as f:
        return sorted(name for name, obj in f.items() if _is_split_group(name, obj))


def read_parts(path_or_dir: str | Path, split: str) -> SplitParts:
    """The unchecked parts of `split`; the file stays open and features stay an h5py.Dataset."""
    path = _resolve(path_or_dir)
    f = _open_read(path)
    splits = [name for name, obj in f.items() if _is_split_group(name, obj)]
    if split not in f or not _is_split_group(split, f[split]):
        f.close()
        found = ", ".join(sorted(splits)) if splits else "none"
        raise DataError(
            f"{path} has no split group '/{split}'{did_you_mean(split, splits) if splits else ''}; "
            f"splits present: {found}"
        )
    group = f[split]
    files = {part: f"{path}:/{split}/{part}" for part in OPTIONAL_PARTS + ("features", "captions")}
    files["captions_per_image"] = f"{path}:/{split} attribute captions_per_image"
    if "captions" not in group:
        f.close()
        raise DataError(f"{files['captions']} does not exist (every split needs its captions)")
    captions_ds = group["captions"]
    if captions_ds.dtype.kind not in ("O", "S", "U"):
        f.close()
        raise DataError(f"{files['captions']} should hold strings but has dtype {captions_ds.dtype}")
    captions = [str(c) for c in captions_ds.asstr()[()]]
    per_image = group.attrs.get("captions_per_image")
    if per_image is not None and not isinstance(per_image, (int, np.integer)):
        f.close()
        raise DataError(f"{files['captions_per_image']} should be an integer, found {per_image!r}")
    return SplitParts(
        name=split,
        layout="hdf5",
        source=str(path),
        features=group["features"],
        captions=captions,
        boxes=group["boxes"][()] if "boxes" in group else None,
        image_sizes=group["image_sizes"][()] if "image_sizes" in group else None,
        files=files,
        declared_captions_per_image=None if per_image is None else int(per_image),
        region_counts=group["region_counts"][()] if "region_counts" in group else None,
        caption_index=group["caption_images"][()] if "caption_images" in group else None,
    )


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
        suffix = "_ims.npy"
        splits = sorted(p.name[: -len(suffix)] for p in src_dir.glob(f"*{suffix}"))
        if not splits:
            raise DataError(f"no precomp splits (*_ims.npy files) in {src_dir}")
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
            )
    return list(splits)
