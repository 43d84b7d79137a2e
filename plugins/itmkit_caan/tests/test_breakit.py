"""CAAN under a demanding user: one-word captions, one-region images, blocks of one, zero and huge fragments."""

from __future__ import annotations

import itertools

import pytest
import torch

from itmkit.types import Local, LocalPort, lengths_to_mask
from itmkit_caan.stages import Attention

D = 6
IMAGE_LENS, CAPTION_LENS = [1, 4, 2], [1, 3, 1, 5]
SETTINGS = [dict(width=4), dict(width=1, intra_modal="feature"), dict(width=3, intra_modal="none"),
            dict(width=4, inter_modal=False), dict(width=4, normalize=False, normalize_h_inputs=True)]


def _sides(scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_mask = lengths_to_mask(torch.tensor(IMAGE_LENS), max(IMAGE_LENS))
    text_mask = lengths_to_mask(torch.tensor(CAPTION_LENS), max(CAPTION_LENS))
    images = torch.randn(len(IMAGE_LENS), max(IMAGE_LENS), D, generator=g, dtype=dtype) * scale
    words = torch.randn(len(CAPTION_LENS), max(CAPTION_LENS), D, generator=g, dtype=dtype) * scale
    return Local(images * image_mask[..., None], image_mask), Local(words * text_mask[..., None], text_mask)


def _module(kw, dtype):
    torch.manual_seed(3)
    return Attention(**kw).build(image=LocalPort(D), text=LocalPort(D)).to(dtype)


@pytest.mark.parametrize("kw", SETTINGS, ids=str)
def test_every_pair_of_a_ragged_block_scores_as_alone(kw):
    image, text = _sides()
    module = _module(kw, torch.float64)
    with torch.no_grad():
        block = module(image=image, text=text)
        for (i, r), (t, w) in itertools.product(enumerate(IMAGE_LENS), enumerate(CAPTION_LENS)):
            alone = module(image=Local(image.feats[i:i + 1, :r], image.mask[i:i + 1, :r]),
                           text=Local(text.feats[t:t + 1, :w], text.mask[t:t + 1, :w]))
            assert abs(float(alone[0, 0]) - float(block[i, t])) < 1e-12, (i, t)


@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("kw", SETTINGS, ids=str)
def test_zero_and_huge_fragments_keep_scores_and_gradients_finite(kw, scale):
    """A valid all-zero region and word, a caption whose only word is zero, unnormalised towers of magnitude 1e4, float32."""
    image, text = _sides(scale, torch.float32)
    image.feats[1, 0] = 0.0
    text.feats[3, 2] = 0.0
    text.feats[2, 0] = 0.0
    leaves = [image.feats.requires_grad_(), text.feats.requires_grad_()]
    module = _module(kw, torch.float32)
    out = module(image=image, text=text)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for t in [*leaves, *module.parameters()]:
        assert t.grad is None or torch.isfinite(t.grad).all()
