"""VSE++'s precomp data: one 2-D global feature row per image, or that row repeated once per caption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itmkit.build import DataPorts, build_model
from itmkit.data import hdf5
from itmkit.data.check import check_dataset, summarize_dataset
from itmkit.data.loader import train_loader
from itmkit.data.split import ImageRows, SplitParts, assemble, open_split
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError
from itmkit.evaluate import similarity_matrix
from itmkit.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
N, F = 6, 8


def global_rows(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, F)).astype(np.float32)


def captions(k: int = 5) -> list[str]:
    return [f"a photo number {i} caption {j}" for i in range(N) for j in range(k)]


def write_raw(folder: Path, split: str, features: np.ndarray, caps: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", features)
    (folder / f"{split}_caps.txt").write_text("".join(f"{c}\n" for c in caps))


def test_one_row_per_image_is_one_region_read_lazily(tmp_path):
    rows = global_rows()
    write_raw(tmp_path, "test", rows, captions())
    split = open_split(tmp_path, "test")
    assert isinstance(split.features, np.memmap)  # a view of the mapped file, nothing read
    assert (split.num_images, split.num_regions, split.feature_dim, split.captions_per_image) == (N, 1, F, 5)
    np.testing.assert_array_equal(split.image_features(np.array([4, 1])), rows[[4, 1], None, :])
    assert split.truncate(2).image_features(np.array([1])).shape == (1, 1, F)


def test_each_row_repeated_per_caption_is_read_once_per_image(tmp_path):
    rows = global_rows()
    write_raw(tmp_path, "test", np.repeat(rows, 5, axis=0), captions())  # 30 rows for 30 captions
    split = open_split(tmp_path, "test")
    assert isinstance(split.features, ImageRows) and split.features.repeat == 5
    assert (split.num_images, split.num_captions, split.num_regions, split.captions_per_image) == (N, 30, 1, 5)
    np.testing.assert_array_equal(split.image_features(np.array([5, 0, 5])), rows[[5, 0, 5], None, :])
    assert [split.image_of_caption(j) for j in (0, 4, 5, 29)] == [0, 0, 1, 5]
    np.testing.assert_array_equal(split.truncate(3).image_features(np.arange(3)), rows[:3, None, :])
    assert check_dataset_problems(tmp_path) == []
    assert summarize_dataset(tmp_path)[0]["images"] == N and summarize_dataset(tmp_path)[0]["regions"] == 1


def check_dataset_problems(folder: Path) -> list[str]:
    """check_dataset's problems about the test split's features (the folder has no train split)."""
    return [p for p in check_dataset(folder) if "test_ims.npy" in p]


def test_a_declared_k_reads_rows_repeated_k_times(tmp_path):
    rows = global_rows()
    write_raw(tmp_path, "test", np.repeat(rows, 2, axis=0), captions(2))
    (tmp_path / "test_caps_per_image.txt").write_text("2\n")
    split = open_split(tmp_path, "test")
    assert (split.num_images, split.captions_per_image) == (N, 2)
    np.testing.assert_array_equal(split.image_features(np.arange(N))[:, 0], rows)


class CountingRows:
    """An on-disk array stand-in that records which rows were read."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.read = data, set()
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key):
        self.read |= set(np.arange(len(self.data))[key].reshape(-1).tolist())
        return self.data[key]


def test_the_repeated_layout_is_never_read_whole():
    many = 1000
    data = CountingRows(np.repeat(np.random.default_rng(1).standard_normal((many, F)).astype(np.float32), 5, axis=0))
    parts = SplitParts(name="train", layout="precomp", source="memory", features=data,
                       captions=["c"] * (5 * many))
    split = assemble(parts)
    assert split.num_images == many
    assert data.read == set(range(5)) | set(range(5 * many - 5, 5 * many))  # the first and last images only
    data.read.clear()
    split.image_features(np.array([7, 3]))
    assert data.read == set(range(15, 20)) | set(range(35, 40))


def test_rows_that_should_repeat_but_differ_are_an_error_naming_them(tmp_path):
    repeated = np.repeat(global_rows(), 5, axis=0)
    repeated[17, 3] += 1.0  # image 3's third row
    write_raw(tmp_path, "test", repeated, captions())
    split = open_split(tmp_path, "test")  # the first and last images repeat, so this opens
    with pytest.raises(DataError, match=r"test_ims.npy: rows 15\.\.19 should repeat the feature of image 3 .* differ"):
        split.image_features(np.array([3]))
    [problem] = check_dataset_problems(tmp_path)
    assert "the rows of 1 image(s) differ (the first is image 3, rows 15..19)" in problem
    repeated[2, 0] += 1.0  # image 0: checked when the split opens
    write_raw(tmp_path, "test", repeated, captions())
    (tmp_path / "test_caps_per_image.txt").write_text("5\n")  # declared, so it is not read as 30 images
    with pytest.raises(DataError, match=r"rows 0\.\.4 should repeat the feature of image 0"):
        open_split(tmp_path, "test")


def test_rows_that_do_not_repeat_are_one_image_per_caption(tmp_path):
    # The legacy im_div layout: as many rows as captions, each row its own image.
    rows = np.random.default_rng(2).standard_normal((30, F)).astype(np.float32)
    write_raw(tmp_path, "test", rows, captions())
    split = open_split(tmp_path, "test")
    assert (split.num_images, split.captions_per_image) == (30, 1)


def test_global_features_in_hdf5(tmp_path):
    rows = global_rows()
    hdf5.write_split(tmp_path / "data.h5", "test", features=rows, captions=captions())
    split = open_split(tmp_path, "test")
    assert (split.num_images, split.num_regions, split.feature_dim) == (N, 1, F)
    np.testing.assert_array_equal(split.image_features(np.array([2, 5]))[:, 0], rows[[2, 5]])


def test_the_image_tower_scores_and_trains_on_global_features(tmp_path):
    write_raw(tmp_path, "train", np.repeat(global_rows(3), 5, axis=0), captions())
    split = open_split(tmp_path, "train")
    vocab = Vocabulary.build(split.captions, threshold=1)
    recipe = load_recipe(RECIPES / "vsepp.toml", ["recipe.embed_dim=16", "text.encoder.word_dim=8"])
    model = build_model(recipe, DataPorts(feature_dim=F, vocab_size=len(vocab), num_regions=1), seed=0)
    batch = next(iter(train_loader(split, vocab, batch_size=4, seed=0, epoch=0)))
    assert batch.images.shape == (4, 1, F) and batch.image_lengths.tolist() == [1] * 4
    sims, _ = similarity_matrix(model, vocab, split)
    assert sims.shape == (N, 5 * N) and np.isfinite(sims).all()
