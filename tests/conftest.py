"""Shared fixtures: a tiny built-in dataset and a tiny recipe that trains in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from itmkit.data.shapes import write_shapes

TINY_SIZES = {"train": 300, "dev": 100, "test": 100}

TINY_RECIPE = """
[recipe]
name = "tiny"
embed_dim = 64

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 32, bidirectional = false }
pool = { stage = "core.last" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"
margin = 0.2
max_violation = true
warmup_epochs = 1

[data]
path = "DATA"

[train]
epochs = 3
batch_size = 32
lr = 3e-3
lr_update = 3
seed = 0
"""


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """300/100/100 images of the built-in dataset, written once per test session."""
    folder = tmp_path_factory.mktemp("shapes-tiny")
    write_shapes(folder, seed=0, sizes=TINY_SIZES)
    return folder


@pytest.fixture
def tiny_recipe(tmp_path, tiny_data) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE.replace("DATA", str(tiny_data)))
    return path


TINY_SCAN_RECIPE = """
[recipe]
name = "tiny-scan"
embed_dim = 32

[image]
encoder = { stage = "core.precomp" }

[text]
encoder = { stage = "core.bigru", word_dim = 32, bidirectional = true }

[[match]]
cross = { stage = "scan.t2i", lambda_softmax = 9.0 }
similarity = { stage = "core.cosine" }
aggregate = { stage = "scan.lse", lambda_lse = 6.0 }

[loss]
stage = "core.triplet"
margin = 0.2
max_violation = true
warmup_epochs = 1

[data]
path = "DATA"

[train]
epochs = 3
batch_size = 32
lr = 2e-3
seed = 0
"""


@pytest.fixture(scope="session")
def tiny_scan(tmp_path_factory, tiny_data) -> Path:
    """A SCAN t-i model trained for 3 epochs on the tiny built-in data (seconds): its best checkpoint."""
    from cliutil import invoke

    folder = tmp_path_factory.mktemp("tiny-scan")
    recipe = folder / "scan.toml"
    recipe.write_text(TINY_SCAN_RECIPE.replace("DATA", str(tiny_data)))
    result = invoke("train", str(recipe), "--out", str(folder / "run"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return folder / "run" / "model_best.safetensors"
