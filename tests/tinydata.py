"""Tiny precomp datasets and a tiny recipe for the tests of bad inputs: a run takes about a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itmkit.data.precomp import write_split

WORDS = "a red blue green square circle triangle small big left right of the".split()
SIZES = {"train": 16, "dev": 6, "test": 6}

RECIPE = """
[recipe]
name = "tiny"
embed_dim = 16

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 8, bidirectional = false }
pool = { stage = "core.last" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"

[data]
path = "DATA"

[train]
epochs = 1
batch_size = 8
eval_batch_size = 4
"""


def captions(num_images: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(5 * num_images)]


def write_tiny(folder: Path, sizes: dict[str, int] | None = None, *, width: int = 8, regions: int = 3, seed: int = 0) -> Path:
    """A precomp dataset of a few images per split (``width``-d features, ``regions`` per image)."""
    rng = np.random.default_rng(seed)
    for name, n in (sizes or SIZES).items():
        write_split(folder, name, features=rng.standard_normal((n, regions, width)).astype(np.float32),
                    captions=captions(n, rng))
    return folder


def write_recipe(path: Path, data: Path | str) -> Path:
    path.write_text(RECIPE.replace("DATA", str(data)))
    return path


def train_tiny(folder: Path, data: Path | str) -> Path:
    """Train the tiny recipe (written to folder/tiny.toml) on ``data`` into folder/run; returns the run folder."""
    from itmkit.recipe import load_recipe
    from itmkit.train import train

    train(load_recipe(write_recipe(folder / "tiny.toml", data)), out_dir=folder / "run", log=lambda *a: None)
    return folder / "run"
