"""Galleries: compact, spilled past their budget, only what the branches read; scores unchanged."""

from __future__ import annotations

import numpy as np
import torch

from itmkit.build import DataPorts, Encoded, build_model
from itmkit.gallery import Gallery, concat
from itmkit.recipe import parse_recipe
from itmkit.scoring import encode_images, encode_texts, score_all
from itmkit.types import Local, Regions, Tokens

POOLED = """
[recipe]
name = "pooled"
embed_dim = 16
[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }
[text]
encoder = { stage = "core.bigru", word_dim = 8 }
pool = { stage = "core.mean" }
[[match]]
similarity = { stage = "core.cosine" }
[loss]
stage = "core.triplet"
"""

CROSS = """
[recipe]
name = "cross"
embed_dim = 16
[image]
encoder = { stage = "core.precomp" }
[text]
encoder = { stage = "core.bigru", word_dim = 8 }
[[match]]
cross = { stage = "scan.t2i", lambda_softmax = 9.0 }
similarity = { stage = "core.cosine" }
aggregate = { stage = "scan.lse", lambda_lse = 6.0 }
[loss]
stage = "core.triplet"
"""


class _Batch:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def _data(n_images=11, n_captions=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 5, 12, generator=g)
    lengths = torch.randint(2, 13, (n_captions,), generator=g)
    ids = torch.randint(4, 30, (n_captions, 12), generator=g) * (torch.arange(12)[None] < lengths[:, None])
    return images, ids, lengths


def _image_batches(images, size):
    for s in range(0, images.shape[0], size):
        chunk = images[s:s + size]
        yield _Batch(indices=np.arange(s, s + len(chunk)), images=chunk,
                     image_lengths=torch.full((len(chunk),), chunk.shape[1]), boxes=None, image_sizes=None)


def _caption_batches(ids, lengths, size):
    order = torch.argsort(lengths, stable=True)  # shortest first, as evaluation feeds them
    for s in range(0, len(order), size):
        rows = order[s:s + size]
        width = int(lengths[rows].max())
        yield _Batch(indices=rows.numpy(), tokens=ids[rows][:, :width], lengths=lengths[rows])


def _galleries(model, budget, size=4):
    images, ids, lengths = _data()
    return (encode_images(model, _image_batches(images, size), "cpu", budget=budget),
            encode_texts(model, _caption_batches(ids, lengths, size), "cpu", budget=budget))


def _full_matrix(model):
    images, ids, lengths = _data()
    with torch.no_grad():
        return model.score(model.encode_images(Regions(images, torch.full((images.shape[0],), 5))),
                           model.encode_texts(Tokens(ids, lengths))).numpy()


def test_spilled_galleries_score_exactly_like_in_memory_ones():
    model = build_model(parse_recipe(CROSS), DataPorts(12, 30, 5), seed=0).eval()
    expected = _full_matrix(model)
    in_memory = _galleries(model, budget=2**40)
    spilled = _galleries(model, budget=3000)  # a few batches fit, the rest goes to disk
    with in_memory[0], in_memory[1], spilled[0], spilled[1]:
        assert in_memory[0].spilled == in_memory[1].spilled == 0
        assert spilled[1].spilled > 0 and spilled[1].in_memory <= 3000
        a, _ = score_all(model, *in_memory, budget=64 * 200)
        b, _ = score_all(model, *spilled, budget=64 * 200)
        spill_dir = spilled[1]._spill.name
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # same blocks; only float rounding may differ
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)  # captions were encoded in length order
    assert not __import__("os").path.exists(spill_dir)  # the temporary files are gone


def test_galleries_keep_only_what_the_branches_read():
    pooled = build_model(parse_recipe(POOLED), DataPorts(12, 30, 5), seed=0).eval()
    cross = build_model(parse_recipe(CROSS), DataPorts(12, 30, 5), seed=0).eval()
    assert pooled.reads("image") == pooled.reads("text") == (False, True)
    assert cross.reads("image") == cross.reads("text") == (True, False)
    images, texts = _galleries(pooled, budget=2**40)
    block = texts.block(0, len(texts))
    assert block.local is None and block.global_.shape == (37, 16)
    np.testing.assert_allclose(score_all(pooled, images, texts)[0], _full_matrix(pooled), rtol=0, atol=1e-6)
    images, texts = _galleries(cross, budget=2**40)
    assert texts.block(0, 5).global_ is None and texts.block(0, 5).local is not None


def test_caption_blocks_pad_only_to_their_own_longest():
    model = build_model(parse_recipe(CROSS), DataPorts(12, 30, 5), seed=0).eval()
    _, texts = _galleries(model, budget=2**40)
    lengths = np.array(texts.lengths)
    assert (np.diff(lengths) >= 0).all()  # stored shortest first
    for start, stop in [(0, 6), (3, 17), (20, 37)]:
        block = texts.block(start, stop)
        assert block.local.feats.shape[:2] == (stop - start, lengths[start:stop].max())
        assert block.local.mask.sum(1).tolist() == lengths[start:stop].tolist()


def test_concat_pads_per_fragment_extras_but_not_per_item_ones():
    a = Local(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), {"boxes": torch.ones(2, 3, 4), "size": torch.ones(2, 2)})
    b = Local(torch.ones(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), {"boxes": torch.ones(1, 5, 4), "size": torch.ones(1, 2)})
    joined = concat([Encoded(a), Encoded(b)]).local
    assert joined.feats.shape == (3, 5, 4) and joined.extras["boxes"].shape == (3, 5, 4)
    assert joined.extras["size"].shape == (3, 2)
    assert joined.mask.sum(1).tolist() == [3, 3, 5] and joined.feats[0, 3:].abs().sum() == 0


def test_an_encoded_side_becomes_a_length_ordered_gallery():
    lengths = torch.tensor([4, 1, 3, 1, 2])
    feats = torch.randn(5, 4, 3)
    mask = torch.arange(4)[None] < lengths[:, None]
    g = Gallery.of(Encoded(Local(feats, mask)), by_length=True, batch=2)
    assert g.ids == [1, 3, 4, 2, 0] and g.lengths == [1, 1, 2, 3, 4]
    block = g.block(3, 5).local  # parts [4, 2] and [0]: item 2 comes back padded with zeros
    torch.testing.assert_close(block.feats, feats[[2, 0]] * mask[[2, 0]].unsqueeze(-1))
    assert block.mask.tolist() == mask[[2, 0]].tolist()
