"""Any number of captions per image: k declared, or a caption -> image index; data, loaders, metrics, protocols."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from itmkit.data import hdf5, precomp
from itmkit.data.loader import train_loader
from itmkit.data.split import Split, open_split
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError, ItmkitError
from itmkit.evaluation import METRIC_KEYS, i2t_ranks, protocol_metrics, retrieval_metrics, t2i_ranks


def slow_metrics(sims: np.ndarray, image_of: np.ndarray) -> dict[str, float]:
    """The official per-query loops, written for any caption -> image map."""
    n_images, n_captions = sims.shape
    i2t = np.zeros(n_images)
    for i in range(n_images):
        inds = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(inds == j)[0][0] for j in range(n_captions) if image_of[j] == i)
    t2i = np.zeros(n_captions)
    for j in range(n_captions):
        inds = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(inds == image_of[j])[0][0]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def varying_index(n_images: int, seed: int, most: int = 6) -> np.ndarray:
    counts = np.random.default_rng(seed).integers(1, most + 1, n_images)  # 1 to `most` captions per image
    return np.repeat(np.arange(n_images), counts)


def matrix(n_images: int, image_of: np.ndarray, seed: int, ties: bool = False) -> np.ndarray:
    """Scores where a caption's own image tends to score higher, so every rank occurs."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, len(image_of))) + 1.5 * (np.arange(n_images)[:, None] == image_of)
    return np.round(sims, 1) if ties else sims.astype(np.float32)


@pytest.mark.parametrize("layout", ["k=2", "k=3", "varying"])
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_the_per_query_loops(layout, ties):
    n_images = 300  # beyond one 256-row chunk of the fast path
    per_image = {"k=2": 2, "k=3": 3}.get(layout)
    image_of = np.arange(n_images * per_image) // per_image if per_image else varying_index(n_images, 1)
    sims = matrix(n_images, image_of, seed=2, ties=ties)
    expected = slow_metrics(sims, image_of)
    for given in ((per_image, image_of) if per_image else (image_of,)):
        assert retrieval_metrics(sims, given) == pytest.approx(expected, abs=1e-9)


def test_five_per_image_gives_the_same_numbers_as_an_int_or_an_index():
    image_of = np.arange(500) // 5
    sims = matrix(100, image_of, seed=3)
    assert retrieval_metrics(sims, image_of) == retrieval_metrics(sims, 5) == retrieval_metrics(sims)
    assert i2t_ranks(sims, image_of).tolist() == i2t_ranks(sims).tolist()
    assert t2i_ranks(sims, image_of).tolist() == t2i_ranks(sims).tolist()


@pytest.mark.parametrize("layout", ["k=2", "varying"])
def test_coco_folds_keep_each_images_captions(layout):
    image_of = np.arange(10000) // 2 if layout == "k=2" else varying_index(5000, 4, most=3)
    sims = matrix(5000, image_of, seed=5)
    m = protocol_metrics(sims, "coco-1k-5fold", 2 if layout == "k=2" else image_of)
    folds = []
    for f in range(5):
        mine = (image_of >= f * 1000) & (image_of < (f + 1) * 1000)
        folds.append(retrieval_metrics(sims[f * 1000:(f + 1) * 1000][:, mine], image_of[mine] - f * 1000))
    for key in METRIC_KEYS[:-1]:
        assert m[key] == pytest.approx(np.mean([fold[key] for fold in folds]))
    small = image_of[image_of < 50]
    assert protocol_metrics(sims[:50, :len(small)], "f30k-1k", small) == retrieval_metrics(sims[:50, :len(small)], small)


def test_metrics_refuse_a_layout_that_does_not_fit_the_matrix():
    with pytest.raises(ItmkitError, match=r"must be \(images, 3 x images\)"):
        retrieval_metrics(np.zeros((4, 8)), 3)
    with pytest.raises(ItmkitError, match="8 captions but 7 caption images"):
        retrieval_metrics(np.zeros((4, 8)), np.arange(7) // 2)
    with pytest.raises(ItmkitError, match="image 2 has no caption"):
        retrieval_metrics(np.zeros((4, 8)), np.array([0, 0, 1, 1, 3, 3, 3, 3]))


# ------------------------------------------------------------------------------------ data


def arrays(n_images: int, n_captions: int) -> dict:
    rng = np.random.default_rng(0)
    return {"features": rng.standard_normal((n_images, 3, 4)).astype(np.float32),
            "captions": [f"caption {j} of the split" for j in range(n_captions)]}


@pytest.mark.parametrize("layout", ["precomp", "hdf5"])
@pytest.mark.parametrize("k", [2, 3, 5, 1])
def test_a_declared_k_is_read_back(tmp_path, layout, k):
    data = arrays(4, 4 * k)
    if layout == "precomp":
        precomp.write_split(tmp_path, "test", captions_per_image=k, **data)
        assert (tmp_path / "test_caps_per_image.txt").read_text() == f"{k}\n"
    else:
        hdf5.write_split(tmp_path / "data.h5", "test", captions_per_image=k, **data)
    split = open_split(tmp_path, "test")
    assert split.captions_per_image == k and split.caption_index is None
    assert split.caption_images.tolist() == (np.arange(4 * k) // k).tolist()
    assert [split.image_of_caption(j) for j in range(4 * k)] == (np.arange(4 * k) // k).tolist()
    truncated = split.truncate(3)
    assert truncated.num_captions == 3 * k and truncated.captions == data["captions"][:3 * k]


@pytest.mark.parametrize("layout", ["precomp", "hdf5"])
def test_a_varying_count_is_read_from_a_caption_image_index(tmp_path, layout):
    index = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    data = arrays(4, len(index))
    if layout == "precomp":
        precomp.write_split(tmp_path, "test", caption_images=index, **data)
        assert (tmp_path / "test_cap_images.txt").read_text().split() == [str(i) for i in index]
    else:
        hdf5.write_split(tmp_path / "data.h5", "test", caption_images=index, **data)
        with h5py.File(tmp_path / "data.h5", "r") as f:
            assert "captions_per_image" not in f["test"].attrs
    split = open_split(tmp_path, "test")
    assert split.captions_per_image is None and split.caption_images.tolist() == index.tolist()
    assert split.truncate(2).captions == data["captions"][:4]
    assert split.truncate(2).caption_images.tolist() == [0, 0, 0, 1]
    # An index that gives every image the same count is that k.
    precomp.write_split(tmp_path / "even", "test", caption_images=np.arange(8) // 2, **arrays(4, 8))
    assert open_split(tmp_path / "even", "test").captions_per_image == 2


def test_conversion_to_hdf5_keeps_the_caption_layout(tmp_path):
    precomp.write_split(tmp_path / "pre", "train", caption_images=[0, 1, 1, 2, 2, 2], **arrays(3, 6))
    precomp.write_split(tmp_path / "pre", "test", captions_per_image=3, **arrays(3, 9))
    hdf5.convert_precomp_to_hdf5(tmp_path / "pre", tmp_path / "h5" / "data.h5")
    assert open_split(tmp_path / "h5", "train").caption_images.tolist() == [0, 1, 1, 2, 2, 2]
    assert open_split(tmp_path / "h5", "test").captions_per_image == 3


def test_training_pairs_each_caption_with_its_image(tmp_path):
    index = np.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
    data = arrays(4, len(index))
    # Image i's features are all i, so each pair shows which image it was given.
    data["features"] = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 3, 4)).copy()
    precomp.write_split(tmp_path, "train", caption_images=index, **data)
    split = open_split(tmp_path, "train")
    vocab = Vocabulary.build(data["captions"], threshold=1)
    seen = set()
    for batch in train_loader(split, vocab, batch_size=3, seed=0, epoch=0, drop_last=False):
        assert batch.image_ids.tolist() == index[batch.caption_ids.numpy()].tolist()
        assert batch.images[:, 0, 0].tolist() == batch.image_ids.float().tolist()
        seen |= set(batch.caption_ids.tolist())
    assert seen == set(range(len(index)))


def test_undeclared_counts_other_than_1_and_5_say_how_to_declare(tmp_path):
    (tmp_path / "test_caps.txt").write_text("".join(f"c{j}\n" for j in range(8)))
    np.save(tmp_path / "test_ims.npy", np.zeros((4, 3, 4), np.float32))
    with pytest.raises(DataError, match=r"has 8 captions .* 4 images; expected 20 .* or 4 .*, or declare the count"):
        open_split(tmp_path, "test")
    (tmp_path / "test_caps_per_image.txt").write_text("2\n")
    assert open_split(tmp_path, "test").captions_per_image == 2


@pytest.mark.parametrize("content, message", [
    ("two\n", r"test_caps_per_image.txt, line 1: expected an integer in ASCII digits, nothing around it; found 'two'"),
    ("0\n", r"test_caps_per_image.txt should hold one positive integer"),
    ("2\n3\n", r"test_caps_per_image.txt should hold one positive integer"),
    ("3\n", r"test_caps.txt has 8 captions but .*test_ims.npy has 4 images at 3 per image \(expected 12\)"),
])
def test_bad_declared_counts_name_the_file(tmp_path, content, message):
    precomp.write_split(tmp_path, "test", captions_per_image=2, **arrays(4, 8))
    (tmp_path / "test_caps_per_image.txt").write_text(content)
    with pytest.raises(DataError, match=message):
        open_split(tmp_path, "test")


@pytest.mark.parametrize("index, message", [
    ([0, 0, 1, 1, 2, 2, 3], r"test_cap_images.txt should give the image of each of the 8 captions"),
    ([0, 0, 1, 1, 2, 2, 3, 4], r"caption 7 is given image 4, outside 0\.\.3"),
    ([0, 1, 0, 1, 2, 2, 3, 3], r"caption 2 is given image 0 after caption 1 was given image 1; captions must be"
                               r" grouped by image"),
    ([0, 0, 0, 1, 1, 3, 3, 3], r"1 image\(s\) have no caption \(the first is image 2\)"),
])
def test_bad_caption_indexes_name_the_file(tmp_path, index, message):
    precomp.write_split(tmp_path, "test", captions_per_image=2, **arrays(4, 8))
    (tmp_path / "test_caps_per_image.txt").unlink()
    (tmp_path / "test_cap_images.txt").write_text("".join(f"{i}\n" for i in index))
    with pytest.raises(DataError, match=message):
        open_split(tmp_path, "test")
    with pytest.raises(DataError, match=message.replace("test_cap_images.txt", "test_cap_images.txt .to be written.")):
        precomp.write_split(tmp_path / "out", "test", caption_images=index, **arrays(4, 8))


def test_split_in_memory_takes_k_or_an_index():
    features = np.zeros((3, 2, 4), np.float32)
    assert Split("s", features, ["c"] * 6, captions_per_image=2).caption_images.tolist() == [0, 0, 1, 1, 2, 2]
    split = Split("s", features, ["c"] * 4, captions_per_image=None, caption_index=np.array([0, 1, 1, 2]))
    assert split.image_of_caption(2) == 1
    with pytest.raises(DataError, match="no caption"):
        Split("s", features, ["c"] * 3, captions_per_image=None, caption_index=np.array([0, 0, 2]))
