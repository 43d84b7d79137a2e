"""`itmkit data check`: every problem in a dataset folder, each as one sentence naming its file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from itmkit.data.split import (BOX_LAYOUTS, SplitParts, as_read, available_splits, image_shape, open_parts,
                               region_count_problems, repeated_rows, split_problems)
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError

# Images scanned per step for NaN/inf: about 75 MB of BUTD features, never a whole split.
SCAN_CHUNK_IMAGES = 256
VOCAB_FILE = "vocab.json"


def _sentence(message: str) -> str:
    """`message` ending in a full stop."""
    return message if message.endswith((".", "?", "!")) else f"{message}."


def _scan_features(parts: SplitParts) -> tuple[list[int], list[int], list[int]]:
    """In one pass, 256 images at a time, the images whose features hold NaN or inf; that end in an
    all-zero row while no region counts are stored (3-D features only); and, in VSE++'s layout of
    one row per caption, whose repeated rows differ."""
    features = parts.features
    repeat = repeated_rows(parts)
    look_for_padding = len(features.shape) == 3 and features.shape[1] > 1 and parts.region_counts is None
    bad: list[int] = []
    padded: list[int] = []
    differ: list[int] = []
    step = SCAN_CHUNK_IMAGES * repeat  # whole images per chunk
    for start in range(0, int(features.shape[0]), step):
        chunk = np.asarray(features[start : start + step])
        # As the model reads them: float64 beyond float32's range is inf there.
        finite = np.isfinite(as_read(chunk)).reshape(chunk.shape[0], -1).all(axis=1)
        bad.extend(sorted({(start + int(i)) // repeat for i in np.flatnonzero(~finite)}))
        if look_for_padding:
            last_row_zero = ~chunk[:, -1].reshape(chunk.shape[0], -1).any(axis=1)
            padded.extend(start + int(i) for i in np.flatnonzero(last_row_zero))
        if repeat > 1:
            groups = chunk.reshape(-1, repeat, *chunk.shape[1:])
            first = groups[:, :1]
            same = (groups == first) | (np.isnan(groups) & np.isnan(first))
            differ.extend(start // repeat + int(i) for i in np.flatnonzero(~same.reshape(len(groups), -1).all(axis=1)))
    return bad, padded, differ


def _repeat_problem(parts: SplitParts, differ: list[int]) -> str | None:
    """A sentence about images whose rows should repeat (one per caption) but differ, or None."""
    if not differ:
        return None
    k = repeated_rows(parts)
    return (
        f"{parts.file('features')} stores one row per caption ({k} per image, as VSE++'s precomp data does), "
        f"but the rows of {len(differ)} image(s) differ (the first is image {differ[0]}, rows "
        f"{differ[0] * k}..{differ[0] * k + k - 1}); store one row per image, or repeat each row exactly {k} times."
    )


def _nonfinite_problem(parts: SplitParts, bad: list[int]) -> str | None:
    """A sentence about images whose features hold NaN or inf (read as float32), or None if there are none.

    Padded rows (past an image's region count) are refused too: the stages mask them out of every
    score, but a linear layer's weight gradient still multiplies them by 0, and NaN * 0 is NaN.
    """
    if not bad:
        return None
    note = ""
    first = bad[0]
    if parts.region_counts is not None and len(parts.features.shape) == 3 \
            and not region_count_problems(parts.region_counts, *image_shape(parts)[:2], ""):
        count = int(np.asarray(parts.region_counts)[first])
        rows = np.flatnonzero(~np.isfinite(as_read(parts.features[first])).all(axis=1))
        if rows.size and rows[0] >= count:
            note = (f"; row {int(rows[0])} of image {first} is padding past its {count} region(s), "
                    f"which is ignored but must still be finite (store zeros)")
    k = repeated_rows(parts)  # 2-D global rows: image i is rows k*i .. k*i+k-1
    stored = np.asarray(parts.features[first] if len(parts.features.shape) == 3 else
                        parts.features[first * k : first * k + k])
    if np.isfinite(stored).all():
        note += (f"; its {stored.dtype} values are finite but beyond float32's range (largest magnitude "
                 f"{float(np.abs(stored).max()):.3g}), so the model, which reads float32, gets inf")
    return f"{parts.file('features')} has NaN or inf values in {len(bad)} image(s) (the first is image {first}){note}."


def _padding_problem(parts: SplitParts, padded: list[int]) -> str | None:
    """A sentence about images that end in all-zero rows while no region counts are stored.

    Adaptive detectors (10 to 100 boxes) are stored zero-padded to the longest image; without
    a count per image every padded row is scored as a region, which lowers recall silently.
    A real region's feature is never exactly zero in every dimension.
    """
    if not padded:
        return None
    first = np.asarray(parts.features[padded[0]])
    nonzero = np.flatnonzero(first.reshape(first.shape[0], -1).any(axis=1))
    valid = int(nonzero[-1]) + 1 if nonzero.size else 0
    return (
        f"{parts.file('features')}: {len(padded)} image(s) end in all-zero rows, which look like padding "
        f"(the first is image {padded[0]}: rows {valid}..{first.shape[0] - 1} of {first.shape[0]} are zero), "
        f"but there are no region counts ({parts.file('region_counts')}), so every padded row would be "
        f"scored as a region; store each image's region count (docs/data.md, Region counts)."
    )


def _empty_captions_problem(parts: SplitParts) -> str | None:
    """A sentence about empty captions, or None if there are none."""
    empty = [i for i, c in enumerate(parts.captions) if not c.strip()]
    if not empty:
        return None
    return (
        f"{parts.file('captions')} has {len(empty)} empty caption(s) "
        f"(the first is caption {empty[0]}, line {empty[0] + 1})."
    )


def _split_checks(parts: SplitParts) -> list[str]:
    """The problems of one split on its own."""
    problems = split_problems(parts)
    shape = image_shape(parts)
    if shape is not None and 0 not in shape[1:] and np.issubdtype(parts.features.dtype, np.floating):
        try:
            bad, padded, differ = _scan_features(parts)
        except OSError as err:  # e.g. an HDF5 chunk that is corrupt or needs a filter this h5py lacks
            problems.append(f"{parts.file('features')} cannot be read: {err}.")
        else:
            problems += [_nonfinite_problem(parts, bad), _padding_problem(parts, padded),
                         _repeat_problem(parts, differ)]
    problems.append(_empty_captions_problem(parts))
    return [p for p in problems if p]


def _cross_split_checks(opened: list[SplitParts]) -> list[str]:
    """Region counts and feature dims must agree across splits: one model reads them all."""
    shaped = [(p, image_shape(p)) for p in opened if image_shape(p) is not None]  # 2-D global rows: R = 1
    if len(shaped) < 2:
        return []
    first, first_shape = shaped[0]
    problems = []
    for other, shape in shaped[1:]:
        for axis, what in ((1, "regions per image"), (2, "feature dimensions")):
            padded = first.region_counts is not None and other.region_counts is not None
            if axis == 1 and padded:
                continue  # zero-padded to each split's own longest image: the counts say what is real
            if shape[axis] != first_shape[axis]:
                problems.append(
                    f"Split {other.name!r} has {shape[axis]} {what} "
                    f"({other.file('features')}) but split {first.name!r} has "
                    f"{first_shape[axis]} ({first.file('features')})."
                )
    return problems


def open_checked(data_dir: Path, names: Iterable[str]) -> tuple[dict[str, SplitParts], list[str]]:
    """Open each split of ``names`` and check it alone and against the others (what `data check` and
    the pre-flight of `train` and `eval` share); returns the opened parts by name and the problems."""
    opened: dict[str, SplitParts] = {}
    problems: list[str] = []
    for name in dict.fromkeys(names):
        try:
            parts = open_parts(data_dir, name)
        except DataError as err:
            problems.append(_sentence(f"Split {name!r}: {err}"))
            continue
        opened[name] = parts
        problems.extend(_split_checks(parts))
    problems.extend(_cross_split_checks(list(opened.values())))
    return opened, problems


def check_dataset(data_dir: str | Path, use: Any = None) -> list[str]:
    """Every problem found in the dataset at `data_dir`, each a sentence naming its file; [] if good.

    `use` (an `itmkit.preflight.DataUse`; default: train, dev and test or testall) says which
    splits a run reads and what they must fit: the checks `itmkit train` runs before epoch 1.
    """
    from itmkit.preflight import DEFAULT_USE, name_problems, usage_problems  # preflight imports this module

    data_dir = Path(data_dir)
    use = use or DEFAULT_USE
    problems = name_problems(use)
    try:
        present = available_splits(data_dir)
    except DataError as err:
        return [*problems, _sentence(str(err))]
    opened, found = open_checked(data_dir, present)
    problems.extend(found)
    problems.extend(usage_problems(data_dir, use, present, opened))
    vocab_path = data_dir / VOCAB_FILE
    if data_dir.is_dir() and vocab_path.is_file():
        try:
            Vocabulary.load(vocab_path)
        except DataError as err:
            problems.append(_sentence(str(err)))
    return problems


def summarize_dataset(data_dir: str | Path) -> list[dict[str, Any]]:
    """One row per split (name, layout, images, captions, regions, feature_dim, boxes, source).

    A split that cannot be opened gets a row with only its name and `error`, and a folder
    whose splits cannot be listed gives []: check_dataset says what is wrong with both.
    """
    try:
        names = available_splits(data_dir)
    except DataError:
        return []
    rows = []
    for name in names:
        try:
            parts = open_parts(data_dir, name)
        except DataError as err:
            rows.append({"name": name, "error": str(err)})
            continue
        shape = image_shape(parts) or tuple(parts.features.shape)  # as the Split sees it: 2-D rows are R = 1
        boxes = None
        if parts.boxes is not None:
            boxes = BOX_LAYOUTS.get(int(parts.boxes.shape[-1]), f"unknown ({parts.boxes.shape[-1]} columns)")
        rows.append(
            {
                "name": name,
                "layout": parts.layout,
                "images": shape[0] if shape else 0,
                "captions": len(parts.captions),
                "regions": shape[1] if len(shape) > 1 else None,
                "feature_dim": shape[2] if len(shape) > 2 else None,
                "boxes": boxes,
                "source": parts.source,
            }
        )
    return rows
