"""pfan.position and pfan.cosine_max against slow references written from the equations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.core_stages import CosineHead
from itmkit.errors import DataError
from itmkit.testing import check_stage
from itmkit.types import Aligned, Local, Regions, RegionsPort, lengths_to_mask

from itmkit_pfan.blocks import boxes_to_blocks
from itmkit_pfan.tests import official
from itmkit_pfan.stages import CosineMax, CosineMaxHead, Position, PositionEncoder

SAMPLE = Path("/work/shared/reference/pfan_sample/train_boxes.npy")
TOL = dict(rtol=1e-5, atol=1e-6)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_layout(b: int, r: int, g: torch.Generator, top: int = 15, grid: int = 16) -> torch.Tensor:
    """(b, r, 2*top) PFAN-layout rows: distinct blocks, trailing padding, weights summing to 1."""
    rows = []
    for _ in range(b * r):
        n = int(torch.randint(1, top + 1, (1,), generator=g))
        idx = torch.randperm(grid * grid, generator=g)[:n].double()
        w = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
        w = w / w.sum()
        rows.append(torch.cat([idx, torch.full((top - n,), float(grid * grid), dtype=torch.float64),
                               w, torch.zeros(top - n, dtype=torch.float64)]))
    return torch.stack(rows).reshape(b, r, 2 * top)


def reference_region(enc: PositionEncoder, f: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return official.encode_region(enc.state_dict(), f, row, enc.top_blocks)


def encoder(in_dim=12, embed_dim=10, **kw) -> PositionEncoder:
    torch.manual_seed(0)
    return Position(embed_dim=embed_dim, **kw).build(RegionsPort(in_dim))


# ========================================================================== pfan.position


def test_the_spec_passes_the_conformance_kit():
    check_stage(Position)
    check_stage(CosineMax)


def test_module_names_and_shapes_are_the_official_ones():
    enc = Position(embed_dim=1024).build(RegionsPort(2048))
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == {
        "fc.weight": (1024, 2248), "fc.bias": (1024,), "fc_att.weight": (200, 2048), "fc_att.bias": (200,),
        "position_embedding.weight": (257, 200)}
    # the official init: fc Xavier uniform with zero bias, the rest PyTorch defaults
    bound = math.sqrt(6 / (2248 + 1024))
    with torch.no_grad():
        assert float(enc.fc.weight.abs().max()) <= bound * (1 + 1e-6) and float(enc.fc.bias.abs().max()) == 0
        assert float(enc.position_embedding.weight.std()) == pytest.approx(1.0, abs=0.02)  # N(0, 1)
        assert float(enc.fc_att.bias.abs().max()) > 0


def test_encoder_matches_the_per_region_reference_on_the_pfan_layout():
    g = gen(1)
    enc = encoder()
    feats = torch.randn(3, 5, 12, generator=g)
    layout = random_layout(3, 5, g)
    out = enc(Regions(feats, torch.full((3,), 5), layout.float()))
    assert isinstance(out, Local) and out.feats.shape == (3, 5, 10) and out.mask.all()
    for b in range(3):
        for r in range(5):
            torch.testing.assert_close(out.feats[b, r].double(), reference_region(enc, feats[b, r].double(), layout[b, r]), **TOL)


def test_raw_boxes_are_converted_to_the_block_layout():
    g = gen(2)
    enc = encoder()
    feats = torch.randn(2, 4, 12, generator=g)
    corner = torch.rand(2, 4, 2, generator=g) * 300
    boxes = torch.cat([corner, corner + torch.rand(2, 4, 2, generator=g) * 200 + 1], dim=-1)
    sizes = torch.tensor([[400.0, 300.0], [640.0, 480.0]])
    raw = enc(Regions(feats, torch.full((2,), 4), boxes, sizes))
    blocked = enc(Regions(feats, torch.full((2,), 4), boxes_to_blocks(boxes, sizes).float()))
    torch.testing.assert_close(raw.feats, blocked.feats)
    assert raw.extras["boxes"] is boxes  # the boxes travel on, as core.precomp's do


def test_missing_boxes_sizes_or_a_wrong_layout_are_clear_errors():
    # DataError, not ValueError: a notebook user gets the one-line message, the CLI exit 1
    enc = encoder()
    feats = torch.randn(2, 3, 12)
    lengths = torch.full((2,), 3)
    with pytest.raises(DataError, match=r"needs region boxes.*\(B, R, 4\).*\(B, R, 30\)"):
        enc(Regions(feats, lengths))
    with pytest.raises(DataError, match="image_sizes"):
        enc(Regions(feats, lengths, torch.rand(2, 3, 4)))
    with pytest.raises(DataError, match=r"7 columns: expected 4 .* or 30"):
        enc(Regions(feats, lengths, torch.rand(2, 3, 7)))
    with pytest.raises(DataError, match="shape"):
        enc(Regions(feats, lengths, torch.rand(2, 4, 30)))
    bad = random_layout(2, 3, gen(3))
    bad[1, 2, 0] = 300
    with pytest.raises(DataError, match=r"outside \[0, 256\]"):
        enc(Regions(feats, lengths, bad.float()))


def test_padded_regions_change_nothing_even_with_garbage_boxes():
    g = gen(4)
    enc = encoder()
    feats = torch.randn(3, 6, 12, generator=g)
    layout = random_layout(3, 6, g).float()
    lengths = torch.tensor([6, 2, 4])
    mask = lengths_to_mask(lengths, 6)
    first = enc(Regions(feats, lengths, layout))
    noisy_feats = torch.where(mask[..., None], feats, torch.randn(3, 6, 12, generator=g) * 10)
    garbage = torch.where(mask[..., None], layout, torch.full_like(layout, -7.0))  # invalid indices on padding
    second = enc(Regions(noisy_feats, lengths, garbage))
    torch.testing.assert_close(first.feats[mask], second.feats[mask])
    assert torch.equal(second.mask, mask)
    # each valid region also equals encoding it alone
    alone = enc(Regions(feats[1:2, :2], torch.tensor([2]), layout[1:2, :2]))
    torch.testing.assert_close(alone.feats[0], first.feats[1, :2])


def test_other_grid_sizes_and_top_blocks():
    enc = encoder(grid=4, top_blocks=3, position_dim=6)
    assert enc.position_embedding.weight.shape == (17, 6) and enc.fc.in_features == 18
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 50.0], [10.0, 60.0, 90.0, 99.0]]])
    out = enc(Regions(torch.randn(1, 2, 12), torch.tensor([2]), boxes, torch.tensor([[100.0, 100.0]])))
    assert out.feats.shape == (1, 2, 10)
    with pytest.raises(DataError, match="6"):  # a 30-column file does not fit top_blocks=3
        enc(Regions(torch.randn(1, 2, 12), torch.tensor([2]), torch.zeros(1, 2, 30)))


@pytest.mark.skipif(not SAMPLE.is_file(), reason="the PFAN sample boxes file is not here")
def test_the_official_sample_boxes_go_through_the_encoder():
    sample = np.load(SAMPLE)  # (50, 36, 30) float64, as shipped by the PFAN authors
    enc = encoder(in_dim=16, embed_dim=8)
    feats = torch.randn(50, 36, 16, generator=gen(5))
    boxes = torch.from_numpy(sample).float()  # the loader hands boxes over as float32
    out = enc(Regions(feats, torch.full((50,), 36), boxes))
    assert out.feats.shape == (50, 36, 8) and torch.isfinite(out.feats).all()
    torch.testing.assert_close(out.feats.norm(dim=-1), torch.ones(50, 36))
    for b, r in [(0, 0), (0, 4), (17, 20), (49, 35)]:
        torch.testing.assert_close(out.feats[b, r].double(), reference_region(enc, feats[b, r].double(),
                                   torch.from_numpy(sample[b, r])), **TOL)


def test_the_conformance_kits_raw_boxes_work():
    # the kit gives (B, R, 4) boxes in 100 x 100 images
    from itmkit.testing import random_input

    regions = random_input(RegionsPort(12), batch=4)
    out = encoder()(regions)
    assert out.feats.shape == (4, regions.feats.shape[1], 10) and torch.isfinite(out.feats).all()


# ======================================================================== pfan.cosine_max


def test_cosine_max_against_the_official_per_caption_reference():
    """mean_t cos(e_t, a_t) + 0.5 * mean_t max_r alpha_tr, one image and caption at a time."""
    g = gen(6)
    ni, nt, lr, lw, d = 2, 3, 4, 5, 6
    regions = torch.randn(ni, lr, d, generator=g, dtype=torch.float64)
    words = torch.randn(nt, lw, d, generator=g, dtype=torch.float64)
    word_len = torch.tensor([5, 2, 3])
    wmask = lengths_to_mask(word_len, lw)
    logits = torch.randn(ni, nt, lw, lr, generator=g, dtype=torch.float64)
    weights = logits.softmax(-1)
    aligned = Aligned(query=words[None], weights=weights, context=regions[:, None], query_mask=wmask[None],
                      query_side="text")
    out = CosineMaxHead(max_weight=0.5)(aligned)
    assert out.sims.shape == (ni, nt, lw, 1) and out.mask.shape == (ni, nt, lw)
    for i in range(ni):
        for t in range(nt):
            n = int(word_len[t])
            rel, peaks = [], []
            for w in range(n):
                attended = weights[i, t, w] @ regions[i]
                e = words[t, w]
                rel.append(float(e @ attended) / max(float(e.norm() * attended.norm()), 1e-8))
                peaks.append(float(weights[i, t, w].max()))
            score = sum(rel) / n + 0.5 * sum(peaks) / n
            pooled = out.sims[i, t, :n, 0].mean()
            assert float(pooled) == pytest.approx(score, rel=1e-10)
            assert out.mask[i, t].tolist() == wmask[t].tolist()


def test_cosine_max_with_weight_zero_is_core_cosine():
    g = gen(7)
    aligned = Aligned(query=torch.randn(1, 3, 4, 5, generator=g), weights=torch.rand(2, 3, 4, 6, generator=g).softmax(-1),
                      context=torch.randn(2, 1, 6, 5, generator=g), query_mask=torch.ones(1, 3, 4, dtype=torch.bool),
                      query_side="text")
    torch.testing.assert_close(CosineMaxHead(max_weight=0.0)(aligned).sims, CosineHead()(aligned).sims)
