"""A tiny precomp dataset with boxes and image sizes (DP-RNN's position branch reads them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itmkit.data.precomp import write_split

WORDS = "a red blue green square circle triangle small big left right of the".split()


def write_tiny_boxes(folder: Path, *, width: int = 8, regions: int = 4, seed: int = 0, boxes: bool = True,
                     sizes: dict[str, int] | None = None) -> Path:
    """Each split: ``regions`` regions of ``width``-d features per image, x1 y1 x2 y2 boxes in a 64 x 48 image."""
    rng = np.random.default_rng(seed)
    for name, n in (sizes or {"train": 16, "dev": 6, "test": 6}).items():
        corner = rng.uniform(0, 30, (n, regions, 2))
        extent = rng.uniform(2, 18, (n, regions, 2))
        write_split(folder, name, features=rng.standard_normal((n, regions, width)).astype(np.float32),
                    captions=[" ".join(rng.choice(WORDS, int(rng.integers(2, 8)))) for _ in range(5 * n)],
                    boxes=np.concatenate([corner, corner + extent], axis=-1).astype(np.float32) if boxes else None,
                    image_sizes=np.tile(np.array([[64, 48]]), (n, 1)) if boxes else None)
    return folder
