"""Extra negatives ([train] extra_captions / extra_images, DIME's --extra_stc / --extra_img).

The losses on a block with extra columns or rows are checked against a slow reference written from
DIME's loss.py (forward_extraStc / forward_extraImg): each pair's image against every caption, each
pair's caption against every image, the pairs' own scores excluded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.core_stages import InfoNCELoss, TripletLoss
from itmkit.data.loader import PairDataset, add_extra_negatives, extra_negatives_generator, train_loader
from itmkit.data.split import open_split
from itmkit.datasets import text_vocabulary
from itmkit.recipe import RecipeError, load_recipe
from itmkit.train import train


def reference_triplet(x: np.ndarray, margin: float, hardest: bool) -> float:
    """DIME's contrastive loss with extra sentences (columns) or images (rows), by loops."""
    ni, nt = x.shape
    b = min(ni, nt)
    total = 0.0
    for i in range(b):  # caption retrieval: pair i's image against every caption but its own
        costs = [max(0.0, margin + x[i, j] - x[i, i]) for j in range(nt) if j != i]
        total += max(costs) if hardest else sum(costs)
    for j in range(b):  # image retrieval: pair j's caption against every image but its own
        costs = [max(0.0, margin + x[i, j] - x[j, j]) for i in range(ni) if i != j]
        total += max(costs) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("shape", [(6, 6), (6, 12), (12, 6), (5, 7)])
@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_on_blocks_with_extra_rows_or_columns_matches_the_reference(shape, hardest):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    loss = TripletLoss(margin=0.2, max_violation=hardest, warmup_epochs=0, mask_same_image=False)
    positives = torch.eye(*shape, dtype=torch.bool)
    assert loss(x, positives=positives).item() == pytest.approx(reference_triplet(x.numpy(), 0.2, hardest), abs=1e-10)


def test_triplet_masks_same_image_extras_only_when_asked():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    image_ids, caption_image_ids = torch.arange(4), torch.tensor([0, 1, 2, 3, 1, 5, 6, 0])
    positives = image_ids[:, None] == caption_image_ids[None, :]
    official = TripletLoss(margin=0.2, max_violation=False, warmup_epochs=0, mask_same_image=False)
    masked = TripletLoss(margin=0.2, max_violation=False, warmup_epochs=0, mask_same_image=True)
    # the extra captions 4 and 7 are image 1's and image 0's: masked, they are no negatives of those images
    expected = reference_triplet(x.numpy(), 0.2, False) - max(0, 0.2 + x[1, 4] - x[1, 1]) - max(0, 0.2 + x[0, 7] - x[0, 0])
    assert official(x, positives=positives).item() == pytest.approx(reference_triplet(x.numpy(), 0.2, False))
    assert masked(x, positives=positives).item() == pytest.approx(float(expected))


def test_infonce_on_a_block_with_extra_columns_is_each_sides_cross_entropy_over_what_it_sees():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = InfoNCELoss(temperature=0.1, mask_same_image=False)
    logits = x.numpy() / 0.1
    rows = [np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(3)]  # each image over all 5 captions
    cols = [np.log(np.exp(logits[:, j]).sum()) - logits[j, j] for j in range(3)]  # each pair's caption over 3 images
    expected = (np.mean(rows) + np.mean(cols)) / 2
    assert loss(x, positives=torch.eye(3, 5, dtype=torch.bool)).item() == pytest.approx(expected, abs=1e-10)


@pytest.fixture
def tiny_split(tiny_data):
    return open_split(tiny_data, "train")


def _first_batch(split, vocab, size=8):
    return next(iter(train_loader(split, vocab, batch_size=size, seed=0, epoch=0)))


def test_extra_captions_are_appended_after_the_pairs(tiny_recipe, tiny_split):
    recipe = load_recipe(tiny_recipe)
    vocab = text_vocabulary(recipe, Path(tiny_split.source), tiny_split)
    batch = _first_batch(tiny_split, vocab)
    dataset = PairDataset(tiny_split, vocab)
    more = add_extra_negatives(batch, dataset, extra_negatives_generator(0, 0), captions=2)
    assert more.images.shape == batch.images.shape and more.tokens.shape[0] == 8 + 16
    width = batch.tokens.shape[1]
    assert torch.equal(more.tokens[:8, :width], batch.tokens) and not more.tokens[:8, width:].any()
    assert torch.equal(more.lengths[:8], batch.lengths) and torch.equal(more.caption_image_ids[:8], batch.image_ids)
    for row in range(8, 24):  # each extra caption is the split's caption, with its own image
        caption = int(more.caption_ids[row])
        assert more.caption_image_ids[row] == tiny_split.image_of_caption(caption)
        assert more.tokens[row, : int(more.lengths[row])].tolist() == dataset.tokens[caption].tolist()
    again = add_extra_negatives(batch, dataset, extra_negatives_generator(0, 0), captions=2)
    assert torch.equal(again.caption_ids, more.caption_ids)  # fixed by (seed, epoch)
    other = add_extra_negatives(batch, dataset, extra_negatives_generator(0, 1), captions=2)
    assert not torch.equal(other.caption_ids, more.caption_ids)


def test_extra_images_are_appended_after_the_pairs(tiny_recipe, tiny_split):
    recipe = load_recipe(tiny_recipe)
    vocab = text_vocabulary(recipe, Path(tiny_split.source), tiny_split)
    batch = _first_batch(tiny_split, vocab)
    more = add_extra_negatives(batch, PairDataset(tiny_split, vocab), extra_negatives_generator(0, 0), images=1)
    assert more.images.shape[0] == 16 and torch.equal(more.tokens, batch.tokens)
    assert torch.equal(more.images[:8, : batch.images.shape[1]], batch.images)
    assert torch.equal(more.caption_image_ids, batch.image_ids) and torch.equal(more.text_image_ids, batch.image_ids)
    for row in range(8, 16):
        image = int(more.image_ids[row])
        features = torch.from_numpy(tiny_split.image_features(np.array([image]))[0])
        assert torch.equal(more.images[row, : features.shape[0]], features)
    if batch.boxes is not None:
        assert more.boxes.shape[:2] == more.images.shape[:2] and more.image_sizes.shape[0] == 16


def test_recipe_refuses_both_kinds_and_extras_with_objectives(tiny_recipe):
    with pytest.raises(RecipeError, match="cannot both be set"):
        load_recipe(tiny_recipe, ["train.extra_captions=1", "train.extra_images=1"])
    with pytest.raises(RecipeError, match=r"extra negatives and \[\[objective\]\] terms cannot be combined"):
        load_recipe(tiny_recipe, ["train.extra_images=1", 'objective=[{stage = "saem.angular"}]'])


@pytest.mark.parametrize("kind", ["extra_captions", "extra_images"])
def test_training_with_extra_negatives_learns_and_is_reproducible(tiny_recipe, tmp_path, kind):
    recipe = load_recipe(tiny_recipe, [f"train.{kind}=1", "train.epochs=2"])
    a = train(recipe, out_dir=tmp_path / "a", log=lambda *x: None)
    b = train(recipe, out_dir=tmp_path / "b", log=lambda *x: None)
    assert a.test == b.test
    plain = train(load_recipe(tiny_recipe, ["train.epochs=2"]), out_dir=tmp_path / "plain", log=lambda *x: None)
    assert a.test != plain.test  # the extras changed the training
    assert a.test["rsum"] > 60  # far above chance (31.5 on 100 images)
