"""SHAN under a demanding user: one-word captions, one-region images, blocks of one, zero and huge fragments."""

from __future__ import annotations

import itertools

import pytest
import torch

from itmkit.types import GlobalPort, Local, LocalPort, lengths_to_mask
from itmkit_shan.stages import GlobalToLocalStage, Hierarchy

D = 6
IMAGE_LENS, CAPTION_LENS = [1, 4, 2], [1, 3, 1, 5]


def _sides(scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_mask = lengths_to_mask(torch.tensor(IMAGE_LENS), max(IMAGE_LENS))
    text_mask = lengths_to_mask(torch.tensor(CAPTION_LENS), max(CAPTION_LENS))
    images = torch.randn(len(IMAGE_LENS), max(IMAGE_LENS), D, generator=g, dtype=dtype) * scale
    words = torch.randn(len(CAPTION_LENS), max(CAPTION_LENS), D, generator=g, dtype=dtype) * scale
    pools = (torch.randn(len(IMAGE_LENS), D, generator=g, dtype=dtype), torch.randn(len(CAPTION_LENS), D, generator=g, dtype=dtype))
    return Local(images * image_mask[..., None], image_mask), Local(words * text_mask[..., None], text_mask), pools


def _module(cls, kw, dtype):
    torch.manual_seed(3)
    ports = dict(image=LocalPort(D), text=LocalPort(D))
    if cls is GlobalToLocalStage:
        ports.update(image_global=GlobalPort(D), text_global=GlobalPort(D))
    module = cls(**kw).build(**ports).to(dtype)
    return lambda image, text, pools: (module(image=image, text=text, image_global=pools[0], text_global=pools[1])
                                       if cls is GlobalToLocalStage else module(image=image, text=text)), module


SETTINGS = [(Hierarchy, {}), (Hierarchy, dict(variant="t2i", gate="vector")), (Hierarchy, dict(variant="i2t", l2l_pool="mean")),
            (Hierarchy, dict(normalize_affinity=False, lambda_softmax=40.0)), (GlobalToLocalStage, {}),
            (GlobalToLocalStage, dict(variant="t2i", steps="g2l", g2l_temperature=0.05))]
IDS = [f"{cls.name}{kw}" for cls, kw in SETTINGS]


@pytest.mark.parametrize("cls, kw", SETTINGS, ids=IDS)
def test_every_pair_of_a_ragged_block_scores_as_alone(cls, kw):
    image, text, pools = _sides()
    score, _ = _module(cls, kw, torch.float64)
    with torch.no_grad():
        block = score(image, text, pools)
        for (i, r), (t, w) in itertools.product(enumerate(IMAGE_LENS), enumerate(CAPTION_LENS)):
            alone = score(Local(image.feats[i:i + 1, :r], image.mask[i:i + 1, :r]),
                          Local(text.feats[t:t + 1, :w], text.mask[t:t + 1, :w]), (pools[0][i:i + 1], pools[1][t:t + 1]))
            assert abs(float(alone[0, 0]) - float(block[i, t])) < 1e-12, (i, t)


@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("cls, kw", SETTINGS, ids=IDS)
def test_zero_and_huge_fragments_keep_scores_and_gradients_finite(cls, kw, scale):
    """A valid all-zero region and word, a one-word caption of a zero word, unnormalised towers of magnitude 1e4, float32."""
    image, text, pools = _sides(scale, torch.float32)
    image.feats[1, 0] = 0.0
    text.feats[3, 2] = 0.0
    text.feats[2, 0] = 0.0  # a caption whose only word is zero
    leaves = [image.feats.requires_grad_(), text.feats.requires_grad_(), *(p.requires_grad_() for p in pools)]
    score, module = _module(cls, kw, torch.float32)
    out = score(image, text, pools)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for t in [*leaves, *module.parameters()]:
        assert t.grad is None or torch.isfinite(t.grad).all()
