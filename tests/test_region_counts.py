"""Per-image region counts: zero-padded adaptive features score as the images without their padding."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.data import hdf5, precomp
from itmkit.data.check import check_dataset
from itmkit.data.loader import caption_batches, image_batches, train_loader
from itmkit.data.split import Split, open_split
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError
from itmkit.evaluate import similarity_matrix
from itmkit.recipe import load_recipe
from itmkit.types import Regions, Tokens

RECIPES = Path(__file__).parents[1] / "recipes"
COUNTS = np.array([3, 7, 1, 10, 5])  # an adaptive detector's boxes per image, stored padded to 10
STORED, DIM = 10, 12
WORDS = ["dog", "cat", "man", "red", "blue", "runs", "sits", "car", "on", "grass", "a", "the"]
# Every recipe family whose image side reads regions: VSE++ mean pool, SCAN both directions,
# SGRAF (BatchNorm over region slots), GPO (sorted pooling, MLP with BatchNorm), BFAN, PFAN (boxes).
MODELS = ["vsepp", "scan_f30k_t2i_avg", "scan_f30k_i2t_lse", "sgraf_sgr_f30k", "sgraf_saf_f30k",
          "gpo_f30k_bigru", "bfan_f30k_prob", "pfan_f30k_t2i", "vsrn_f30k", "vsrn_coco"]


def make_arrays(seed: int = 0, padding: str = "zeros") -> dict:
    rng = np.random.default_rng(seed)
    n = len(COUNTS)
    real = rng.uniform(0.1, 1.0, (n, STORED, DIM)).astype(np.float32)
    valid = np.arange(STORED)[None, :] < COUNTS[:, None]
    corner = rng.uniform(0, 300, (n, STORED, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(20, 200, (n, STORED, 2))], axis=-1).astype(np.float32)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(5 * n)]
    pad = np.zeros_like(real) if padding == "zeros" else rng.uniform(-5, 5, real.shape).astype(np.float32)
    return {
        "features": np.where(valid[..., None], real, pad),
        "captions": captions,
        "boxes": np.where(valid[..., None], boxes, 0).astype(np.float32),
        "image_sizes": np.full((n, 2), 640),
    }


def write(folder: Path, layout: str, arrays: dict, counts=COUNTS) -> Path:
    if layout == "precomp":
        precomp.write_split(folder, "test", region_counts=counts, **arrays)
        return folder
    hdf5.write_split(folder / "data.h5", "test", region_counts=counts, **arrays)
    return folder


def model_for(name: str):
    recipe = load_recipe(RECIPES / f"{name}.toml", ["recipe.embed_dim=16", "text.encoder.word_dim=8"])
    # through the text encoder's vocabulary hook, as training does (gpo.bigru adds <mask>)
    vocab = recipe.text.encoder.spec.vocabulary(lambda: Vocabulary.build(WORDS, threshold=1))
    ports = DataPorts(feature_dim=DIM, vocab_size=len(vocab), num_regions=STORED, mask_id=getattr(vocab, "mask_id", None))
    return build_model(recipe, ports, seed=0).eval(), vocab


def alone(arrays: dict, i: int) -> Split:
    """Image i as a split of its own real rows only, described by every caption."""
    count = COUNTS[i]
    return Split("alone", arrays["features"][i:i + 1, :count], arrays["captions"],
                 boxes=arrays["boxes"][i:i + 1, :count], image_sizes=arrays["image_sizes"][i:i + 1],
                 captions_per_image=len(arrays["captions"]))


def unpadded_scores(model, vocab, arrays: dict) -> np.ndarray:
    """Each image alone, scored against every caption by the scoring engine."""
    return np.stack([similarity_matrix(model, vocab, alone(arrays, i))[0][0] for i in range(len(COUNTS))])


def float64_scores(model, vocab, split: Split) -> np.ndarray:
    """Images and captions from the evaluation loaders, encoded and scored in float64."""
    model = model.double()
    images = [model.encode_images(Regions(b.images.double(), b.image_lengths, b.boxes.double(),
                                          b.image_sizes.double()))
              for b in image_batches(split, batch_size=2)]
    [captions] = caption_batches(split, vocab, batch_size=len(split.captions))
    texts = model.encode_texts(Tokens(captions.tokens, captions.lengths))
    with torch.no_grad():
        return np.concatenate([model.score(image, texts).numpy() for image in images])


@pytest.mark.parametrize("name", MODELS)
def test_a_padded_split_with_counts_scores_as_the_unpadded_images(tmp_path, name):
    model, vocab = model_for(name)
    arrays = make_arrays()
    for layout, padding in (("precomp", "zeros"), ("hdf5", "random")):
        stored = make_arrays(padding=padding)
        split = open_split(write(tmp_path / layout, layout, stored), "test")
        np.testing.assert_array_equal(split.region_counts, COUNTS)
        # float64: BFAN keeps a fragment when a score is > 0, so float32 rounding (another batch
        # shape in a matmul) can flip a decision whatever the padding; at float64 it does not.
        expected = np.concatenate([float64_scores(model, vocab, alone(arrays, i)) for i in range(len(COUNTS))])
        np.testing.assert_allclose(float64_scores(model, vocab, split), expected, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name}, {layout}, {padding} padding")
        if not name.startswith("bfan"):  # the scoring engine (galleries, blocks) in float32
            sims, _ = similarity_matrix(model.float(), vocab, split, batch_size=2)
            np.testing.assert_allclose(sims, unpadded_scores(model, vocab, arrays), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}, {layout}, {padding} padding")


def test_without_counts_padded_rows_are_scored_as_regions(tmp_path):
    # What the counts fix: the same zero-padded file read without them scores differently (SCAN
    # i2t averages over every region, so zero rows count; the issue measured rSum 408.8 -> 375.6).
    model, vocab = model_for("scan_f30k_i2t_avg")
    arrays = make_arrays()
    precomp.write_split(tmp_path, "test", **arrays)
    sims, _ = similarity_matrix(model, vocab, open_split(tmp_path, "test"))
    assert not np.allclose(sims, unpadded_scores(model, vocab, arrays), atol=1e-4)


def test_loaders_give_each_image_its_region_count(tmp_path):
    arrays = make_arrays()
    split = open_split(write(tmp_path, "precomp", arrays), "test")
    vocab = Vocabulary.build(WORDS, threshold=1)
    for batch in train_loader(split, vocab, batch_size=4, seed=0, epoch=0, drop_last=False):
        assert batch.image_lengths.tolist() == COUNTS[batch.image_ids.numpy()].tolist()
        # Batches are cut to their longest image: no stage needs the padding past it.
        assert batch.images.shape[1] == batch.boxes.shape[1] == int(batch.image_lengths.max())
    batches = list(image_batches(split, batch_size=2))
    assert torch.cat([b.image_lengths for b in batches]).tolist() == COUNTS.tolist()
    assert [b.images.shape[1] for b in batches] == [7, 10, 5]
    np.testing.assert_array_equal(batches[0].images.numpy(), arrays["features"][:2, :7])
    truncated = split.truncate(3)
    assert truncated.region_counts.tolist() == COUNTS[:3].tolist()
    assert split.region_lengths(np.array([3, 0])).tolist() == [10, 3]
    # Without counts every stored row is a region, as before.
    plain = Split("plain", arrays["features"], arrays["captions"])
    assert plain.region_lengths(np.arange(5)).tolist() == [STORED] * 5


def test_counts_survive_the_hdf5_round_trip_and_conversion(tmp_path):
    arrays = make_arrays()
    write(tmp_path / "pre", "precomp", arrays)
    assert (tmp_path / "pre" / "test_region_counts.npy").is_file()
    hdf5.convert_precomp_to_hdf5(tmp_path / "pre", tmp_path / "h5" / "data.h5")
    with h5py.File(tmp_path / "h5" / "data.h5", "r") as f:
        assert f["test/region_counts"][()].tolist() == COUNTS.tolist()
    assert open_split(tmp_path / "h5", "test").region_counts.tolist() == COUNTS.tolist()
    # Writing the split again without counts removes the stale file.
    precomp.write_split(tmp_path / "pre", "test", **arrays)
    assert not (tmp_path / "pre" / "test_region_counts.npy").exists()


@pytest.mark.parametrize("counts, message", [
    (np.array([3, 7, 0, 10, 5]), r"region count\(s\) outside 1\.\.10 .* image 2 has 0"),
    (np.array([3, 7, 1, 11, 5]), r"outside 1\.\.10 .* image 3 has 11"),
    (np.array([3, 7, 1, 10]), r"one region count per image, shape \(5,\), but has shape \(4,\)"),
    (np.array([[3, 7, 1, 10, 5]]), r"shape \(5,\), but has shape \(1, 5\)"),
    (np.array([3, 7, 1.5, 10, 5]), r"integer region counts \(int64\) but has dtype float64"),
    # Booleans were read as counts of 1 and whole floats accepted: any non-integer dtype is refused.
    (np.array([True, True, True, True, True]), r"integer region counts \(int64\) but has dtype bool"),
    (np.array([3.0, 7.0, 1.0, 10.0, 5.0]), r"integer region counts \(int64\) but has dtype float64"),
])
@pytest.mark.parametrize("layout", ["precomp", "hdf5"])
def test_bad_counts_are_refused_naming_the_file(tmp_path, layout, counts, message):
    arrays = make_arrays()
    write(tmp_path, layout, arrays, counts=None)
    if layout == "precomp":
        np.save(tmp_path / "test_region_counts.npy", counts)
        where = str(tmp_path / "test_region_counts.npy")
    else:
        with h5py.File(tmp_path / "data.h5", "a") as f:
            f["test"].create_dataset("region_counts", data=counts)
        where = f"{tmp_path / 'data.h5'}:/test/region_counts"
    with pytest.raises(DataError, match=message) as err:
        open_split(tmp_path, "test")
    assert where in str(err.value)
    with pytest.raises(DataError, match=message):  # and the writers refuse them before writing
        precomp.write_split(tmp_path / "out", "test", region_counts=counts, **arrays)
    assert not (tmp_path / "out").exists()


def test_data_check_flags_zero_padding_without_counts(tmp_path):
    arrays = make_arrays()
    for name in ("train", "test"):
        precomp.write_split(tmp_path, name, **arrays)
    problems = check_dataset(tmp_path)
    padding = [p for p in problems if "look like padding" in p]
    assert len(padding) == 2 and str(tmp_path / "train_ims.npy") in padding[0]
    assert "4 image(s) end in all-zero rows" in padding[0] and "image 0: rows 3..9 of 10 are zero" in padding[0]
    assert str(tmp_path / "train_region_counts.npy") in padding[0]
    for name in ("train", "test"):
        precomp.write_split(tmp_path, name, region_counts=COUNTS, **arrays)
    assert not [p for p in check_dataset(tmp_path) if "padding" in p or "region" in p]


@pytest.mark.parametrize("name", MODELS)
def test_training_on_zero_padded_images_keeps_every_gradient_finite(tmp_path, name):
    # A zero padded row once reached l2norm's square root at exactly 0: an infinite derivative
    # times the mask's 0 made every weight NaN after one step (the breaker's report, 2026-12-01).
    model, vocab = model_for(name)
    split = open_split(write(tmp_path, "precomp", make_arrays(padding="zeros")), "test")
    model.train()
    for batch in train_loader(split, vocab, batch_size=5, seed=0, epoch=0):
        loss, _ = model(Regions(batch.images, batch.image_lengths, batch.boxes, batch.image_sizes),
                        Tokens(batch.tokens, batch.lengths), batch.image_ids, epoch=0)
        model.zero_grad(set_to_none=True)
        loss.backward()
        assert torch.isfinite(loss)
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients in {bad}"
