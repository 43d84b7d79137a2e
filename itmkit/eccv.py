"""The ``eccv-caption`` protocol: ECCV Caption (mAP@R, R-Precision, R@1) and CxC R@K on the COCO 5K test split.

Chun et al. 2022, "ECCV Caption: Correcting False Negatives by Collecting Machine-and-Human-verified
Image-Caption Associations for MS-COCO", and Parekh et al. 2021, "Crisscrossed Captions" (CxC). Both
relabel the COCO 5K test set (Karpathy's split, SCAN's ``testall``): a caption may match several images and
an image many captions. The annotations and the metric code are NAVER's ``eccv-caption`` package
(``eccv_caption.Metrics``); this module only turns an (images x captions) matrix into what the package
reads, a ranked list of COCO ids per query, and calls it:

- i2t: ``{COCO image id: [COCO caption ids, best first]}``, t2i: ``{COCO caption id: [COCO image ids]}``;
- the package ranks nothing and needs no full list: R@K reads the first K items, R-Precision and mAP@R
  the first R, R = the query's number of positives (at most 48 for an image, 19 for a caption). So each
  list holds the first ``depth`` items only, ``depth`` = max(R over the queries, largest K): a few hundred
  thousand ints instead of 5000 x 25000.

Ids. Rows are images in the order of the split's ``{split}_ids.txt`` (SCAN's COCO layout: one COCO image id
per line, one line per image, or one per caption as in VSE infinity's ``cxc_annots/testall_ids.txt``, 5
equal lines per image). The package ships the COCO caption (annotation) ids of the test split in its
official order (``data/coco_test_ids.npy``, 25000 ids, the 5 of each image consecutive). Caption ids come
from ``{split}_capids.txt`` beside the split when it exists (one COCO caption id per caption line, the name
of VSE infinity's ``testall_capids.txt``); otherwise ASSUMPTION: caption k of an image (column 5 i + k) is
that image's k-th caption in the package's order, which holds when the captions file is the standard
``testall_caps.txt`` (the package's order is that of the 5K test set the field evaluates on). Ties in a
row are ordered by the lower column first (a stable sort).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from itmkit.data.precomp import _read_ints
from itmkit.errors import DataError, ItmkitError
from itmkit.inputs import input_file

PROTOCOL = "eccv-caption"
NUM_IMAGES = 5000  # the COCO 5K test split
CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)  # CxC R@K
ECCV_METRICS = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1")  # the package's names
METRIC_KEYS = tuple(f"{d}_{m}" for d in ("i2t", "t2i") for m in (*ECCV_METRICS, *(f"cxc_r{k}" for k in RECALL_KS)))
_ROWS_PER_CHUNK = 256  # sort this many queries at a time: memory stays flat


@functools.cache
def package() -> Any:
    """The package's ``Metrics`` (its annotations read once per process, about 3 MB of json)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson": it falls back to json, same result
        from eccv_caption import Metrics
    return Metrics()


@functools.cache
def test_layout() -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The package's test split: its 5000 COCO image ids in its order, and each image's 5 caption ids in order."""
    metrics = package()
    caption_ids = np.asarray(metrics.coco_ids, dtype=np.int64).reshape(NUM_IMAGES, CAPTIONS_PER_IMAGE)
    caption_to_image = metrics.coco_gts["t2i"]
    images = np.array([caption_to_image[int(c)][0] for c in caption_ids[:, 0]], dtype=np.int64)
    return images, dict(zip(images.tolist(), caption_ids))


def _expected_ids(path: Path | str) -> str:
    return (f"expected {path}: one COCO image id per line, in the order of the split's images ({NUM_IMAGES} lines)"
            f" or of its captions ({NUM_IMAGES * CAPTIONS_PER_IMAGE} lines, {CAPTIONS_PER_IMAGE} equal lines per"
            " image), as SCAN's COCO layout has it (testall_ids.txt)")


def read_image_ids(path: Path | str, num_images: int = NUM_IMAGES) -> np.ndarray:
    """The COCO image id of each image row from an ids file (per image, or per caption: k equal lines each)."""
    path = Path(path)
    if input_file(path, "image ids file", optional=True) is None:  # a folder or a FIFO there: that error
        raise DataError(f"the {PROTOCOL} protocol needs the COCO image ids of the test split: {path} is missing;"
                        f" {_expected_ids(path)}")
    ids = np.array(_read_ints(path, "image ids file", blank_lines=False), dtype=np.int64)
    per_caption = num_images * CAPTIONS_PER_IMAGE
    if len(ids) == per_caption:
        grouped = ids.reshape(num_images, CAPTIONS_PER_IMAGE)
        bad = np.flatnonzero((grouped != grouped[:, :1]).any(axis=1))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"image ids file {path} has one line per caption, but lines {CAPTIONS_PER_IMAGE * i + 1}"
                            f"..{CAPTIONS_PER_IMAGE * i + CAPTIONS_PER_IMAGE} (image {i}) differ:"
                            f" {grouped[i].tolist()}; {_expected_ids(path)}")
        ids = grouped[:, 0]
    elif len(ids) != num_images:
        raise DataError(f"image ids file {path} has {len(ids)} lines for {num_images} images; {_expected_ids(path)}")
    return ids


def read_caption_ids(path: Path | str) -> np.ndarray:
    """The COCO caption (annotation) id of each caption row, one per line."""
    return np.array(_read_ints(path, "caption ids file", blank_lines=False), dtype=np.int64)


def split_ids(image_ids: np.ndarray, caption_ids: np.ndarray | None = None,
              where: str = "the image ids") -> tuple[np.ndarray, np.ndarray]:
    """(image ids of the rows, caption ids of the columns) of a (5000, 25000) matrix, checked against the package.

    ``image_ids`` must be the package's 5000 test images, each once, in any order. ``caption_ids`` (one per
    column) must be 5 captions of each row's image; without them column 5 i + k is image i's k-th caption in
    the package's order.
    """
    package_images, captions_of = test_layout()
    image_ids = np.asarray(image_ids, dtype=np.int64)
    unknown = [int(i) for i in image_ids if int(i) not in captions_of]
    if unknown:
        raise DataError(f"{where}: {len(unknown)} of {len(image_ids)} ids are not images of the COCO 5K test split"
                        f" that the eccv-caption package annotates (e.g. {unknown[:3]}); expected the COCO image ids"
                        f" of the {NUM_IMAGES} test images ({package_images[:3].tolist()}, ...)")
    values, counts = np.unique(image_ids, return_counts=True)
    if len(image_ids) != NUM_IMAGES or len(values) != NUM_IMAGES:
        twice = values[counts > 1][:3].tolist()
        raise DataError(f"{where}: {len(values)} distinct test images in {len(image_ids)} ids"
                        + (f" (repeated: {twice})" if twice else "")
                        + f"; the {PROTOCOL} protocol needs each of the {NUM_IMAGES} COCO 5K test images once")
    if caption_ids is None:
        return image_ids, np.concatenate([captions_of[int(i)] for i in image_ids])
    caption_ids = np.asarray(caption_ids, dtype=np.int64)
    expected = NUM_IMAGES * CAPTIONS_PER_IMAGE
    if len(caption_ids) != expected:
        raise DataError(f"caption ids: {len(caption_ids)} ids for {expected} captions; expected one COCO caption id"
                        f" per caption line ({CAPTIONS_PER_IMAGE} per image, in the order of the captions file)")
    caption_to_image = package().coco_gts["t2i"]
    owners = np.repeat(image_ids, CAPTIONS_PER_IMAGE)
    for j, (c, owner) in enumerate(zip(caption_ids.tolist(), owners.tolist())):
        if caption_to_image.get(c, [None])[0] != owner:
            raise DataError(f"caption ids: line {j + 1} holds {c}, which is not a COCO caption of image {owner}"
                            f" (the image of caption {j}: line {j // CAPTIONS_PER_IMAGE + 1} of the image ids)")
    if len(np.unique(caption_ids)) != expected:
        raise DataError("caption ids: a caption id appears twice; expected each test caption once")
    return image_ids, caption_ids


def _top(rows: np.ndarray, depth: int) -> np.ndarray:
    """Column indices of each row's ``depth`` highest scores, best first, ties by the lower column: exactly
    ``np.argsort(-rows, kind="stable")[:, :depth]``, without sorting whole rows (a partition finds the cut-off,
    then only the scores at or above it are sorted)."""
    rows = np.asarray(rows, dtype=np.float64)
    if depth >= rows.shape[1]:
        return np.argsort(-rows, axis=1, kind="stable")
    cutoff = -np.partition(-rows, depth - 1, axis=1)[:, depth - 1]  # each row's depth-th highest score
    r, c = np.nonzero(rows >= cutoff[:, None])  # at least `depth` per row: more when scores tie at the cut-off
    order = np.lexsort((c, -rows[r, c], r))  # by row, then score descending, then column
    r, c = r[order], c[order]
    rank = np.arange(len(r)) - np.searchsorted(r, np.arange(len(rows)))[r]  # place within its row
    return c[rank < depth].reshape(len(rows), depth)


def retrieved_items(sims: np.ndarray, image_ids: np.ndarray, caption_ids: np.ndarray, depth_i2t: int,
                    depth_t2i: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The package's input: each image's first ``depth_i2t`` caption ids, each caption's first ``depth_t2i``
    image ids, read off an (images x captions) matrix whose rows are ``image_ids``, columns ``caption_ids``.

    Works on any matrix (a memmap is read in row and column blocks, never copied whole).
    """
    n_images, n_captions = sims.shape
    i2t: dict[int, list[int]] = {}
    for start in range(0, n_images, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_images)
        top = caption_ids[_top(sims[start:stop], depth_i2t)]
        i2t.update(zip(image_ids[start:stop].tolist(), top.tolist()))
    t2i: dict[int, list[int]] = {}
    for start in range(0, n_captions, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, n_captions)
        top = image_ids[_top(np.asarray(sims[:, start:stop]).T, depth_t2i)]
        t2i.update(zip(caption_ids[start:stop].tolist(), top.tolist()))
    return i2t, t2i


def list_depths() -> tuple[int, int]:
    """How deep each i2t and t2i list must go: the most positives of any query (ECCV or CxC), or the largest K."""
    m = package()
    deepest = {d: max(len(v) for gts in (m.eccv_gts, m.cxc_gts) for v in gts[d].values()) for d in ("i2t", "t2i")}
    return max(deepest["i2t"], max(RECALL_KS)), max(deepest["t2i"], max(RECALL_KS))


def package_metrics(i2t: dict[int, list[int]], t2i: dict[int, list[int]]) -> dict[str, float]:
    """The package's ECCV Caption metrics and CxC R@K of ranked lists, as percentages under METRIC_KEYS."""
    m = package()
    items = {"i2t": i2t, "t2i": t2i}
    # The package's ECCV loop draws a tqdm bar unconditionally: keep it off the user's terminal.
    with contextlib.redirect_stderr(io.StringIO()):
        scores = m.eccv_metrics(items, "all")
        for k in RECALL_KS:
            scores[f"cxc_r{k}"] = m.cxc_recalls(items, "all", K=k)
    return {f"{d}_{name}": 100.0 * float(scores[name][d]) for d in ("i2t", "t2i")
            for name in (*ECCV_METRICS, *(f"cxc_r{k}" for k in RECALL_KS))}


def layout_problem(shape: tuple[int, ...], captions_per_image: int | np.ndarray) -> str | None:
    """Why a matrix cannot be scored by the protocol (not the 5000 x 25000, 5-per-image layout), or None."""
    from itmkit.evaluation import _owners

    expected = (NUM_IMAGES, NUM_IMAGES * CAPTIONS_PER_IMAGE)
    if tuple(shape) != expected or _owners(captions_per_image) != CAPTIONS_PER_IMAGE:
        return (f"protocol {PROTOCOL} needs the COCO 5K test split: a {expected[0]} x {expected[1]} matrix, the"
                f" {CAPTIONS_PER_IMAGE} captions of image i at columns {CAPTIONS_PER_IMAGE}i..{CAPTIONS_PER_IMAGE}i+4;"
                f" got {tuple(shape)[0]} x {tuple(shape)[1]}" + ("" if tuple(shape) != expected
                                                                 else " with another caption grouping"))
    return None


def eccv_caption_metrics(sims: np.ndarray, image_ids: np.ndarray, caption_ids: np.ndarray | None = None,
                         captions_per_image: int | np.ndarray = CAPTIONS_PER_IMAGE,
                         where: str = "the image ids") -> dict[str, float]:
    """ECCV Caption mAP@R, R-Precision, R@1 and CxC R@1/5/10, both directions, of a COCO 5K matrix (in %).

    ``image_ids``: the COCO image id of each row; ``caption_ids``: of each column (default: the package's
    order, see the module docstring).
    """
    problem = layout_problem(sims.shape, captions_per_image)
    if problem:
        raise ItmkitError(problem)
    rows, columns = split_ids(image_ids, caption_ids, where)
    return package_metrics(*retrieved_items(sims, rows, columns, *list_depths()))


def data_ids(data_dir: Path | str, split: str, ids_file: Path | str | None = None,
             caption_ids_file: Path | str | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The image ids (and caption ids, when a file holds them) of a split: ``ids_file`` or ``{split}_ids.txt``,
    ``caption_ids_file`` or ``{split}_capids.txt`` if present. Returns (image ids, caption ids or None, where)."""
    data_dir = Path(data_dir)
    ids_path = Path(ids_file) if ids_file else data_dir / f"{split}_ids.txt"
    if not ids_file and not data_dir.is_dir():
        raise DataError(f"the {PROTOCOL} protocol reads the image ids from {split}_ids.txt beside the split's"
                        f" features (SCAN's precomp layout); {data_dir} is not such a folder: pass --ids FILE")
    image_ids = read_image_ids(ids_path)
    cap_path = Path(caption_ids_file) if caption_ids_file else data_dir / f"{split}_capids.txt"
    present = caption_ids_file or input_file(cap_path, "caption ids file", optional=True) is not None
    caption_ids = read_caption_ids(cap_path) if present else None
    return image_ids, caption_ids, str(ids_path)
