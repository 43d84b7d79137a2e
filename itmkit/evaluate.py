"""Score a split with one model or an ensemble and compute the protocol's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itmkit.build import ITMModel
from itmkit.data.loader import caption_batches, image_batches
from itmkit.data.split import Split
from itmkit.data.vocab import Vocabulary
from itmkit.errors import ItmkitError
from itmkit.inputs import input_file
from itmkit.evaluation import protocol_metrics
from itmkit.progress import task
from itmkit.gallery import DEFAULT_GALLERY_BUDGET
from itmkit.scoring import ScoreStats, encode_images, encode_texts, score_all


def similarity_matrix(
    model: ITMModel,
    vocab: Vocabulary,
    split: Split,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    budget: int | None = None,
    gallery_budget: int = DEFAULT_GALLERY_BUDGET,
    progress=None,
    label: str = "",
) -> tuple[np.ndarray, ScoreStats]:
    """(images, captions) scores of one model on a split: encode each side once, then score blocks.

    Working memory: ``budget`` for a block (by default sized for the device) plus at most ``gallery_budget`` of encodings per side
    (the rest waits on disk), besides the 4-byte-per-pair matrix itself.
    """
    was_training = model.training
    model.eval()
    try:
        with task(progress, f"encode {label}images", split.num_images) as update:
            images = encode_images(model, image_batches(split, batch_size=batch_size), device,
                                   lambda d, t: update(d), budget=gallery_budget)
        with task(progress, f"encode {label}captions", split.num_captions) as update:
            texts = encode_texts(model, caption_batches(split, vocab, batch_size=batch_size, by_length=True), device,
                                 lambda d, t: update(d), budget=gallery_budget)
        with images, texts, task(progress, f"score {label}pairs", split.num_images * split.num_captions) as update:
            sims, stats = score_all(model, images, texts, device=device, budget=budget,
                                    progress=lambda d, t: update(d, t, info=""))
    finally:
        model.train(was_training)
    check_finite(sims, split, label)
    return sims, stats


class NonFiniteScores(ItmkitError):
    """A similarity matrix holds NaN or inf: its ranks would be meaningless."""


_ROWS_PER_CHECK = 1024  # rows checked at a time: a (rows x captions) bool mask, never the whole matrix's


def _first(indices: np.ndarray, count: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:count])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > count else "")


def check_finite(sims: np.ndarray, split: Split, label: str = "") -> None:
    """Refuse a similarity matrix with NaN or inf entries, naming the images or captions.

    Every evaluation passes through here (training's dev and test scoring, ``itmkit eval`` and its
    ``--save-sims``). Sorting puts NaN last, so one NaN image silently drops every caption's rank of
    it to the bottom (t2i R@1 29.6 -> 2.0 on a test) instead of failing: hence the refusal.
    """
    source = f" of {split.source}" if split.source else ""
    check_finite_matrix(sims, f"{label}split {split.name!r}{source}",
                        "Check the features with `itmkit data check` (NaN or inf values), or the checkpoint's weights")


def check_finite_matrix(sims: np.ndarray, where: str, hint: str = "") -> None:
    """``check_finite`` for any matrix: ``where`` names it in the message, ``hint`` ends it."""
    n_images, n_captions = sims.shape
    image_bad_somewhere = np.zeros(n_images, dtype=bool)
    image_bad_everywhere = np.zeros(n_images, dtype=bool)
    caption_bad_somewhere = np.zeros(n_captions, dtype=bool)
    caption_bad_everywhere = np.ones(n_captions, dtype=bool)
    count = 0
    for start in range(0, n_images, _ROWS_PER_CHECK):
        bad = ~np.isfinite(sims[start:start + _ROWS_PER_CHECK])
        rows_bad = bad.sum(axis=1)
        count += int(rows_bad.sum())
        image_bad_somewhere[start:start + len(bad)] = rows_bad > 0
        image_bad_everywhere[start:start + len(bad)] = rows_bad == n_captions
        caption_bad_somewhere |= bad.any(axis=0)
        caption_bad_everywhere &= bad.all(axis=0)
    if count == 0:
        return
    images = np.flatnonzero(image_bad_everywhere)
    captions = np.flatnonzero(caption_bad_everywhere)
    if images.size or captions.size:
        parts = []
        if images.size:
            parts.append(f"image(s) {_first(images)} against every caption")
        if captions.size:
            parts.append(f"caption(s) {_first(captions)} against every image")
        found = "; ".join(parts)
    else:
        found = (f"image(s) {_first(np.flatnonzero(image_bad_somewhere))} and caption(s)"
                 f" {_first(np.flatnonzero(caption_bad_somewhere))}")
    raise NonFiniteScores(f"{where}: {count} similarity score(s) are NaN or inf, for {found}; no metrics computed"
                          + (f". {hint}" if hint else ""))


def read_similarity_matrix(path: str | Path) -> np.ndarray:
    """A saved (images x captions) matrix (``.npy``, any real dtype), memory-mapped, checked to be
    2-D, non-empty and finite. Read without pickle: an object array or a pickle is refused."""
    path = input_file(path, "similarity matrix", error=ItmkitError)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PK\x03\x04":  # a zip: numpy.savez
        raise ItmkitError(f"similarity matrix {path}: an .npz archive; expected one .npy array (numpy.save)")
    if magic != b"\x93NUMPY":
        raise ItmkitError(f"similarity matrix {path}: not a .npy file (it does not start with numpy's magic"
                          " string); save the matrix with numpy.save(path, matrix)")
    try:
        sims = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # an object array, a damaged header
        raise ItmkitError(f"similarity matrix {path}: not a plain numeric .npy array ({str(exc).split('.')[0]});"
                          " save it with numpy.save(path, matrix) from a float array") from None
    except (OSError, EOFError) as exc:
        raise ItmkitError(f"similarity matrix {path}: cannot be read as .npy ({exc})") from None
    if sims.dtype.kind not in "fiu":
        raise ItmkitError(f"similarity matrix {path}: dtype {sims.dtype}; expected real numbers (float32 or float64)")
    if sims.ndim != 2 or 0 in sims.shape:
        raise ItmkitError(f"similarity matrix {path}: shape {sims.shape}; expected (images, captions), both at least 1")
    check_finite_matrix(sims, f"similarity matrix {path}")
    return sims


def ensemble_similarity(members: list[tuple[ITMModel, Vocabulary]], split: Split, **kwargs) -> tuple[np.ndarray, list[ScoreStats]]:
    """Mean of the members' similarity matrices (how SCAN, SGRAF, VSRN and GPO report ensembles)."""
    total, stats = None, []
    for i, (model, vocab) in enumerate(members):
        label = f"model {i + 1}/{len(members)}: " if len(members) > 1 else ""
        sims, s = similarity_matrix(model, vocab, split, label=label, **kwargs)
        total = sims if total is None else np.add(total, sims, out=total)  # in place: one matrix in memory
        stats.append(s)
    return total / np.float32(len(members)), stats


def evaluate(model: ITMModel, vocab: Vocabulary, split: Split, protocol: str = "f30k-1k", **kwargs) -> dict[str, float]:
    sims, _ = similarity_matrix(model, vocab, split, **kwargs)
    return protocol_metrics(sims, protocol, split.caption_images)
