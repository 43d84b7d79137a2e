"""Score a split with one model or an ensemble and compute the protocol's metrics."""

from __future__ import annotations

import numpy as np
import torch

from itmkit.build import ITMModel
from itmkit.data.loader import caption_batches, image_batches
from itmkit.data.split import Split
from itmkit.data.vocab import Vocabulary
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
    return sims, stats


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
