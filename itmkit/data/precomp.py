"""The SCAN / VSE++ precomp layout: {split}_ims.npy (or IMRAM's {split}_feat.npy), {split}_caps.txt and optional extras."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from itmkit.data.split import (Split, SplitParts, array_problems, assemble, atomic_path, data_file, read_text,
                               text_lines)
from itmkit.errors import DataError
from itmkit.inputs import strict_int

# Rows copied per step when writing features, so a memmap or HDF5 source is streamed.
CHUNK_IMAGES = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def file_names(split: str) -> dict[str, str]:
    """The file name of each part of `split` in the precomp layout."""
    return {
        "features": f"{split}_ims.npy",
        "captions": f"{split}_caps.txt",
        "boxes": f"{split}_boxes.npy",
        "image_sizes": f"{split}_sizes.npy",
        "ids": f"{split}_ids.txt",
        "region_counts": f"{split}_region_counts.npy",
        "captions_per_image": f"{split}_caps_per_image.txt",
        "caption_images": f"{split}_cap_images.txt",
    }


# The features of a split: {split}_ims.npy (SCAN, VSE++ and most repositories) or, the same array
# under IMRAM's name, {split}_feat.npy (HuiChen24/IMRAM's data.py). Written as _ims.npy.
FEATURE_SUFFIXES = ("_ims.npy", "_feat.npy")


def split_names(data_dir: Path) -> set[str]:
    """The splits whose features are in ``data_dir`` under either name."""
    return {p.name[: -len(suffix)] for suffix in FEATURE_SUFFIXES for p in data_dir.glob(f"*{suffix}")}


def features_path(data_dir: Path, split: str) -> Path | None:
    """Where ``split``'s features are (either name), None when neither exists.

    Both names present are refused unless they are the same file (a link made for IMRAM's loader):
    two different arrays for one split leave no way to tell which the user meant.
    """
    found = [path for path in (data_dir / f"{split}{suffix}" for suffix in FEATURE_SUFFIXES) if os.path.lexists(path)]
    if len(found) == 2:
        for path in found:  # a dangling link or a folder under one name is that problem, not "two files"
            data_file(path, "features file")
        if found[0].samefile(found[1]):
            return found[0]
        raise DataError(f"split {split!r} has two feature files, {found[0]} and {found[1]} (IMRAM's name for the"
                        " same array): keep one, or make one a link to the other")
    return found[0] if found else None


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map an .npy file read-only (never read whole), with a DataError if it is not one."""
    data_file(path, "array file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy array: {err}") from None


def read_captions(path: Path) -> list[str]:
    """One caption per line, stripped as the official loader does (`line.strip()`); a BOM is dropped."""
    return [line.strip() for line in text_lines(read_text(path, "captions file"))]


def _read_ints(path: Path, what: str, *, blank_lines: bool = True) -> list[int]:
    """One integer (fitting int64) per line of a small text file, with the line of a bad one named.

    Blank lines are skipped, unless the line number means something (``blank_lines=False``: line j
    is about caption j, so a skipped line would shift every later one).
    """
    values = []
    for number, line in enumerate(text_lines(read_text(path, what)), start=1):
        if not line.strip():
            if blank_lines:
                continue
            raise DataError(f"{what} {path}, line {number} is blank: expected one integer per line "
                            f"(line j is about caption j - 1)")
        value = strict_int(line)  # ASCII digits only: not '٣', '1_0', '+5' or ' 5'
        if value is None:
            raise DataError(f"{what} {path}, line {number}: expected an integer in ASCII digits, nothing around it;"
                            f" found {line[:30]!r}")
        if not INT64_MIN <= value <= INT64_MAX:
            raise DataError(f"{what} {path}, line {number}: {line.strip()[:30]} is out of range (expected an "
                            f"integer that fits 64 bits)")
        values.append(value)
    return values


def read_captions_per_image(path: Path) -> int:
    """The k of a `{split}_caps_per_image.txt`: one positive integer."""
    values = _read_ints(path, "captions-per-image file")
    if len(values) != 1 or values[0] < 1:
        raise DataError(f"captions-per-image file {path} should hold one positive integer (captions k*i .. "
                        f"k*i+k-1 describe image i), found {values[:3]}")
    return values[0]


def read_caption_images(path: Path) -> np.ndarray:
    """A `{split}_cap_images.txt`: the image (0-based row of the features) of each caption, one per line."""
    return np.array(_read_ints(path, "caption-to-image file", blank_lines=False), dtype=np.int64)


def read_parts(data_dir: str | Path, split: str) -> SplitParts:
    """The unchecked parts of `split` in a precomp folder; features stay memory-mapped."""
    data_dir = Path(data_dir)
    names = file_names(split)
    paths = {part: data_dir / name for part, name in names.items()}
    paths["features"] = features_path(data_dir, split) or paths["features"]
    features = _load_npy(data_file(paths["features"], "features file"))
    captions = read_captions(paths["captions"])
    # Optional parts: absent is fine, a folder, a FIFO or a broken link in their place is not.
    present = {part: data_file(paths[part], f"{part.replace('_', ' ')} file", optional=True) is not None
               for part in ("boxes", "image_sizes", "region_counts", "captions_per_image", "caption_images")}
    boxes = _load_npy(paths["boxes"]) if present["boxes"] else None
    sizes = _load_npy(paths["image_sizes"]) if present["image_sizes"] else None
    # Small per-image and per-caption arrays: read whole.
    counts = np.asarray(_load_npy(paths["region_counts"])) if present["region_counts"] else None
    per_image = paths["captions_per_image"]
    index = paths["caption_images"]
    return SplitParts(
        name=split,
        layout="precomp",
        source=str(data_dir),
        features=features,
        captions=captions,
        boxes=boxes,
        image_sizes=sizes,
        files={part: str(path) for part, path in paths.items()},
        declared_captions_per_image=read_captions_per_image(per_image) if present["captions_per_image"] else None,
        region_counts=counts,
        caption_index=read_caption_images(index) if present["caption_images"] else None,
    )


def read_split(data_dir: str | Path, split: str) -> Split:
    """Open `split` of a precomp folder, checking that its files agree."""
    return assemble(read_parts(data_dir, split))


def _check_inputs(
    data_dir: Path,
    split: str,
    features: Any,
    captions: Sequence[str],
    boxes: np.ndarray | None,
    image_sizes: np.ndarray | None,
    ids: Sequence[str] | None,
    **declared: Any,
) -> None:
    """Refuse arrays that would make an inconsistent split, before any file is written."""
    files = {part: f"{data_dir / name} (to be written)" for part, name in file_names(split).items()}
    problems = array_problems(split, features, list(captions), boxes, image_sizes, files=files, **declared)
    broken = [i for i, c in enumerate(captions) if "\n" in c or "\r" in c]
    if broken:
        problems.append(
            f"caption {broken[0]} holds a line break, which would split it in two in {files['captions']}."
        )
    if ids is not None and len(ids) != features.shape[0]:
        problems.append(f"{len(ids)} image ids were given for {features.shape[0]} images.")
    if declared.get("captions_per_image") is not None and declared.get("caption_index") is not None:
        problems.append("give captions_per_image (k for every image) or caption_images (each caption's image), "
                        "not both.")
    if problems:
        raise DataError("\n".join(problems))


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write one string per line, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{line}\n" for line in lines)


def _write_npy(path: Path, array: Any, dtype: Any = None) -> None:
    """Write an .npy file atomically, copying `array` in chunks so a memmap source is streamed."""
    dtype = np.dtype(dtype or array.dtype)
    with atomic_path(path) as tmp:
        if array.size == 0:  # an empty file cannot be memory-mapped
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(array.shape, dtype=dtype))
            return
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(array.shape))
        for start in range(0, array.shape[0], CHUNK_IMAGES):
            stop = min(start + CHUNK_IMAGES, array.shape[0])
            out[start:stop] = np.asarray(array[start:stop], dtype=dtype)
        out.flush()
        del out  # close the map before the rename


def write_split(
    data_dir: str | Path,
    split: str,
    *,
    features: np.ndarray,
    captions: Sequence[str],
    boxes: np.ndarray | None = None,
    image_sizes: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    region_counts: Sequence[int] | np.ndarray | None = None,
    captions_per_image: int | None = None,
    caption_images: Sequence[int] | np.ndarray | None = None,
) -> None:
    """Write `split` in the precomp layout (features as float32), each file atomically.

    Optional declarations: ``region_counts`` (N_img,) the valid regions of each zero-padded
    image (`{split}_region_counts.npy`); ``captions_per_image`` k for any k
    (`{split}_caps_per_image.txt`); ``caption_images`` the image of each caption when the count
    varies (`{split}_cap_images.txt`). Without them the im_div rule (1 or 5 per image) applies.
    """
    if not hasattr(features, "shape"):
        features = np.asarray(features, dtype=np.float32)
    data_dir = Path(data_dir)
    _check_inputs(data_dir, split, features, captions, boxes, image_sizes, ids, region_counts=region_counts,
                  captions_per_image=captions_per_image, caption_index=caption_images)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = file_names(split)
    _write_npy(data_dir / names["features"], features, np.float32)
    _write_lines(data_dir / names["captions"], captions)
    if boxes is not None:
        _write_npy(data_dir / names["boxes"], boxes)
    if image_sizes is not None:
        _write_npy(data_dir / names["image_sizes"], image_sizes)
    if ids is not None:
        _write_lines(data_dir / names["ids"], [str(i) for i in ids])
    # A declaration left from an earlier write would now describe other data: replace or remove it.
    for part in ("region_counts", "captions_per_image", "caption_images"):
        (data_dir / names[part]).unlink(missing_ok=True)
    if region_counts is not None:
        _write_npy(data_dir / names["region_counts"], np.asarray(region_counts), np.int64)
    if captions_per_image is not None:
        _write_lines(data_dir / names["captions_per_image"], [str(int(captions_per_image))])
    if caption_images is not None:
        _write_lines(data_dir / names["caption_images"], [str(int(i)) for i in caption_images])
