"""The torch side: items, collate, deterministic shuffling, in-order evaluation batches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from itmkit.data import hdf5, precomp
from itmkit.data.loader import (
    Batch,
    PairDataset,
    caption_batches,
    collate,
    image_batches,
    train_loader,
)
from itmkit.data.split import Split, open_split
from itmkit.data.vocab import Vocabulary

WORDS = ["dog", "cat", "runs", "on", "the", "grass", "a", "big", "small", "red"]


def make_split(num_images: int = 8, regions: int = 3, dim: int = 4, seed: int = 0, boxes: bool = True) -> Split:
    rng = np.random.default_rng(seed)
    captions = [
        " ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(5 * num_images)
    ]
    return Split(
        name="train",
        features=rng.standard_normal((num_images, regions, dim)).astype(np.float32),
        captions=captions,
        boxes=np.sort(rng.uniform(0, 100, (num_images, regions, 2, 2)), axis=2).reshape(num_images, regions, 4)
        .astype(np.float32) if boxes else None,  # x1 <= x2, y1 <= y2
        image_sizes=rng.integers(100, 500, (num_images, 2)) if boxes else None,
    )


@pytest.fixture
def split() -> Split:
    return make_split()


@pytest.fixture
def vocab(split) -> Vocabulary:
    return Vocabulary.build(split.captions, threshold=1)


def test_item_pairs_a_caption_with_its_image(split, vocab):
    dataset = PairDataset(split, vocab)
    assert len(dataset) == 40
    item = dataset[17]
    assert item["image_id"] == 3 and item["caption_id"] == 17
    np.testing.assert_array_equal(item["image"], split.features[3])
    assert item["tokens"].tolist() == vocab.encode(split.captions[17])
    np.testing.assert_array_equal(item["boxes"], split.boxes[3])
    np.testing.assert_array_equal(item["image_size"], split.image_sizes[3].astype(np.float32))


def test_collate_pads_and_keeps_the_order(split, vocab):
    dataset = PairDataset(split, vocab)
    order = [5, 0, 33, 12]
    batch = collate([dataset[i] for i in order])
    encoded = [vocab.encode(split.captions[i]) for i in order]
    longest = max(len(e) for e in encoded)
    assert batch.tokens.shape == (4, longest) and batch.tokens.dtype == torch.long
    assert batch.lengths.tolist() == [len(e) for e in encoded]
    for row, ids in enumerate(encoded):
        assert batch.tokens[row, : len(ids)].tolist() == ids
        assert batch.tokens[row, len(ids) :].eq(0).all()
    assert batch.caption_ids.tolist() == order
    assert batch.image_ids.tolist() == [1, 0, 6, 2]
    assert batch.images.shape == (4, 3, 4) and batch.images.dtype == torch.float32
    torch.testing.assert_close(batch.images[2], torch.from_numpy(split.features[6]))
    assert batch.image_lengths.tolist() == [3, 3, 3, 3]
    assert batch.boxes.shape == (4, 3, 4) and batch.image_sizes.dtype == torch.float32
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tokens, batch.tokens)


def test_collate_without_boxes():
    split = make_split(boxes=False)
    vocab = Vocabulary.build(split.captions, threshold=1)
    batch = collate([PairDataset(split, vocab)[i] for i in range(3)])
    assert batch.boxes is None and batch.image_sizes is None
    assert batch.to("cpu").boxes is None


def order_of(split, vocab, *, seed, epoch, num_workers=0):
    loader = train_loader(split, vocab, batch_size=8, seed=seed, epoch=epoch, num_workers=num_workers)
    return [batch.caption_ids.tolist() for batch in loader]


def test_train_order_depends_only_on_seed_and_epoch(split, vocab):
    first = order_of(split, vocab, seed=3, epoch=2)
    assert len(first) == 5 and sorted(sum(first, [])) == list(range(40))
    assert order_of(split, vocab, seed=3, epoch=2) == first
    assert order_of(split, vocab, seed=3, epoch=3) != first
    assert order_of(split, vocab, seed=4, epoch=2) != first


def test_drop_last(split, vocab):
    loader = train_loader(split, vocab, batch_size=16, seed=0, epoch=0)
    assert [len(b.caption_ids) for b in loader] == [16, 16]
    loader = train_loader(split, vocab, batch_size=16, seed=0, epoch=0, drop_last=False)
    assert [len(b.caption_ids) for b in loader] == [16, 16, 8]


def test_captions_are_tokenised_once_per_split(split, vocab):
    assert PairDataset(split, vocab).tokens is PairDataset(split, vocab).tokens


def test_hdf5_workers_give_the_same_batches(split, vocab, tmp_path):
    hdf5.write_split(tmp_path / "data.h5", "train", features=split.features, captions=split.captions)
    on_disk = open_split(tmp_path, "train")
    in_process = order_of(on_disk, vocab, seed=1, epoch=0)
    with_workers = order_of(on_disk, vocab, seed=1, epoch=0, num_workers=2)
    assert with_workers == in_process


def test_pickled_dataset_reopens_the_files_instead_of_copying_them(split, vocab, tmp_path):
    precomp.write_split(tmp_path, "train", features=split.features, captions=split.captions, boxes=split.boxes)
    hdf5.write_split(tmp_path / "data.h5", "dev", features=split.features, captions=split.captions)
    for on_disk in (open_split(tmp_path, "train").truncate(6), open_split(tmp_path, "dev")):
        dataset = PairDataset(on_disk, vocab)
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset)
        for index in (0, 29):
            np.testing.assert_array_equal(copy[index]["image"], dataset[index]["image"])
            assert copy[index]["tokens"].tolist() == dataset[index]["tokens"].tolist()
    big = Split("train", np.zeros((200, 36, 64), np.float32), ["x"] * 1000, source="")
    assert len(pickle.dumps(PairDataset(big, vocab))) > big.features.nbytes  # in memory: copied
    precomp.write_split(tmp_path / "big", "train", features=big.features, captions=big.captions)
    small = pickle.dumps(PairDataset(open_split(tmp_path / "big", "train"), vocab))
    assert len(small) < big.features.nbytes / 10  # on disk: only where to find it


def test_image_batches_in_index_order(split):
    batches = list(image_batches(split, batch_size=3))
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    images = torch.cat([b.images for b in batches])
    torch.testing.assert_close(images, torch.from_numpy(split.features))
    torch.testing.assert_close(torch.cat([b.boxes for b in batches]), torch.from_numpy(split.boxes))
    assert batches[-1].image_lengths.tolist() == [3, 3]
    assert batches[-1].image_sizes.shape == (2, 2)
    assert batches[0].to("cpu").indices is batches[0].indices


def test_caption_batches_pad_to_each_batch(split, vocab):
    batches = list(caption_batches(split, vocab, batch_size=16))
    assert [len(b.indices) for b in batches] == [16, 16, 8]
    for batch in batches:
        encoded = [vocab.encode(split.captions[i]) for i in batch.indices]
        assert batch.tokens.shape[1] == max(len(e) for e in encoded)
        assert batch.lengths.tolist() == [len(e) for e in encoded]
        assert batch.tokens[0, : len(encoded[0])].tolist() == encoded[0]
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(40))
    assert batches[0].to("cpu").tokens.dtype == torch.long
