"""bfan.t2i / bfan.i2t against a literal per-caption reference of the official BFAN algorithm."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.core_stages import CosineHead, Pool
from itmkit.ops import l2norm
from itmkit.plugins import get_registry
from itmkit.recipe import parse_recipe
from itmkit.testing import CHECKS, check_stage
from itmkit.types import Local, LocalPort, Regions, Tokens, lengths_to_mask
from itmkit_bfan.stages import ImageToText, TextToImage, focal_keep, focal_reassign, focal_scores
from itmkit_bfan.tests import official

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
STAGES = {"t2i": TextToImage, "i2t": ImageToText}
FOCAL = ("equal", "prob")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", [TextToImage, ImageToText], ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", [TextToImage, ImageToText], ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    registry = get_registry()
    check_stage(cls, registry=registry)
    assert registry.owners[cls.name] == "bfan"


# ------------------------------------------------------------------------------- helpers


def block(seed: int, n_images=3, n_captions=5, regions=7, words=9, dim=16, dtype=torch.float64):
    """l2-normalised fragments with varied valid lengths on both sides and garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(n_images, regions, dim, generator=g, dtype=dtype))
    captions = l2norm(torch.randn(n_captions, words, dim, generator=g, dtype=dtype))
    image_lens = torch.randint(2, regions + 1, (n_images,), generator=g)
    image_lens[0] = regions
    caption_lens = torch.randint(1, words + 1, (n_captions,), generator=g)
    caption_lens[0] = words
    for feats, lens in ((images, image_lens), (captions, caption_lens)):
        pad = ~lengths_to_mask(lens, feats.shape[1])
        feats[pad] = torch.randn(int(pad.sum()), dim, generator=g, dtype=dtype) * 5
    image = Local(images, lengths_to_mask(image_lens, regions))
    text = Local(captions, lengths_to_mask(caption_lens, words))
    return image, text, image_lens, caption_lens


def ours(image: Local, text: Local, direction: str, focal_type: str, smooth: float = 20.0):
    """(Aligned, (Ni, Nt) score) of one direction: focal cross -> core.cosine -> core.mean."""
    module = STAGES[direction](lambda_softmax=smooth, focal_type=focal_type).build(
        image=LocalPort(image.feats.shape[-1]), text=LocalPort(text.feats.shape[-1]))
    aligned = module(image=image, text=text)
    return aligned, Pool(how="mean")(CosineHead()(aligned))


# -------------------------------------------------------------------------- focal scores


@pytest.mark.parametrize("focal_type", FOCAL)
def test_vectorised_focal_scores_equal_the_literal_double_sums(focal_type):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 3, 1, 5])
    mask = lengths_to_mask(lengths, 6)  # (4, 6): one context per row
    alpha = torch.softmax(torch.randn(4, 2, 6, generator=g, dtype=torch.float64) * 3, -1)
    alpha = alpha.masked_fill(~mask[:, None], 0.0)
    alpha = alpha / alpha.sum(-1, keepdim=True)
    scores = focal_scores(alpha, mask[:, None, :], focal_type)
    for b in range(4):
        n = int(lengths[b])
        for q in range(2):
            row = alpha[b, q, :n].tolist()
            expected = [official.focal_score_literal(row, j, focal_type) for j in range(n)]
            expected = torch.tensor(expected, dtype=torch.float64)
            torch.testing.assert_close(scores[b, q, :n], expected, rtol=0, atol=1e-14)
    keep = focal_keep(alpha, mask[:, None, :], focal_type)
    assert not keep[~mask[:, None, :].expand_as(keep)].any()  # padding is never kept
    assert keep[lengths > 1].any(-1).all()  # random weights over 2+ fragments keep something
    assert not keep[lengths == 1].any()  # one fragment is never above its own mean: the 0 / 0 case


# ------------------------------------------------------------- against the reference loop


@pytest.mark.parametrize("focal_type", FOCAL)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_weights_and_scores_equal_the_per_caption_loop(direction, focal_type):
    image, text, image_lens, caption_lens = block(seed=3 + len(focal_type) + (direction == "i2t"))
    aligned, score = ours(image, text, direction, focal_type)
    args = (image.feats, image_lens, text.feats, caption_lens, 20.0, focal_type, direction)
    expected = official.direction_weights(*args)
    for i in range(image.feats.shape[0]):
        for t in range(text.feats.shape[0]):
            ni, nt = int(image_lens[i]), int(caption_lens[t])
            lq, lc = (nt, ni) if direction == "t2i" else (ni, nt)
            w = aligned.weights[i, t]
            torch.testing.assert_close(w[:lq, :lc], expected[i][t], rtol=0, atol=1e-10)
            assert (w[:, lc:] == 0).all()  # no weight on padded context
    torch.testing.assert_close(score, official.direction_scores(*args), rtol=0, atol=1e-10)


@pytest.mark.parametrize("focal_type", FOCAL)
def test_float32_block_is_within_1e5_of_the_float64_reference(focal_type):
    image, text, image_lens, caption_lens = block(seed=11, n_images=4, n_captions=6, regions=36, words=20, dim=64)
    total = sum(ours(Local(image.feats.float(), image.mask), Local(text.feats.float(), text.mask), d, focal_type)[1]
                for d in ("t2i", "i2t"))
    reference = official.bfan_scores(image.feats, image_lens, text.feats, caption_lens, 20.0, focal_type)
    torch.testing.assert_close(total.double(), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("focal_type", FOCAL)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padding_changes_nothing(direction, focal_type):
    image, text, _, _ = block(seed=21)
    # the same items padded wider, with different garbage in every padded position
    g = torch.Generator().manual_seed(99)
    wide_img = torch.randn(image.feats.shape[0], 10, image.feats.shape[2], generator=g, dtype=image.feats.dtype) * 7
    wide_img[:, :7] = torch.where(image.mask[..., None], image.feats, wide_img[:, :7])
    wide_cap = torch.randn(text.feats.shape[0], 12, text.feats.shape[2], generator=g, dtype=text.feats.dtype) * 7
    wide_cap[:, :9] = torch.where(text.mask[..., None], text.feats, wide_cap[:, :9])
    wide = (Local(wide_img, lengths_to_mask(image.lengths, 10)), Local(wide_cap, lengths_to_mask(text.lengths, 12)))
    aligned, score = ours(image, text, direction, focal_type)
    aligned_wide, score_wide = ours(*wide, direction, focal_type)
    torch.testing.assert_close(score_wide, score, rtol=0, atol=1e-12)
    lq, lc = aligned.weights.shape[-2:]
    valid_queries = aligned.query_mask.expand(aligned.weights.shape[:-1])[..., None]
    torch.testing.assert_close(aligned_wide.weights[..., :lq, :lc] * valid_queries, aligned.weights * valid_queries,
                               rtol=0, atol=1e-12)
    assert (aligned_wide.weights[..., lc:] == 0).all()


# ------------------------------------------------------------- a row that keeps nothing


@pytest.mark.parametrize("focal_type", FOCAL)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_a_row_with_no_relevant_fragment_keeps_its_preassigned_weights(direction, focal_type):
    """Identical context vectors: every pre-assigned weight is exactly 1/4, every focal score 0.

    The official code keeps nothing there and divides 0 by 0; BFAN here keeps the whole
    (uniform) row, so the attended context is the shared vector itself.
    """
    image, text, image_lens, caption_lens = block(seed=5, dtype=torch.float32)
    image_feats, text_feats = image.feats.clone(), text.feats.clone()
    if direction == "t2i":  # image 1: four valid regions, all the same vector
        image_feats[1, :4] = image_feats[1, 0]
        image_lens[1] = 4
        image = Local(image_feats, lengths_to_mask(image_lens, image_feats.shape[1]))
    else:  # caption 2: four valid words, all the same vector
        text_feats[2, :4] = text_feats[2, 0]
        caption_lens[2] = 4
        text = Local(text_feats, lengths_to_mask(caption_lens, text_feats.shape[1]))
    i, t = (1, 2)
    # the official computation really is 0 / 0 here, in every query row of the pair
    nan = official.direction_weights(image.feats, image_lens, text.feats, caption_lens, 20.0, focal_type, direction,
                                     on_empty="nan")
    assert torch.isnan(nan[i][t]).all()
    feats = [f.clone().requires_grad_(True) for f in (image.feats, text.feats)]
    aligned, score = ours(Local(feats[0], image.mask), Local(feats[1], text.mask), direction, focal_type)
    assert torch.isfinite(score).all()
    lq = int(caption_lens[t] if direction == "t2i" else image_lens[i])
    torch.testing.assert_close(aligned.weights[i, t, :lq, :4], torch.full((lq, 4), 0.25))
    reference = official.direction_scores(image.feats.double(), image_lens, text.feats.double(), caption_lens, 20.0,
                                          focal_type, direction)
    torch.testing.assert_close(score.double(), reference, rtol=0, atol=1e-5)
    score.sum().backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)


@pytest.mark.parametrize("focal_type", FOCAL)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_one_fragment_items_match_the_reference(direction, focal_type):
    """A one-word caption / one-region image: as context, its single weight 1 is never above the
    mean (the official 0 / 0), so it keeps its weight 1; as the only query, the query-axis l2
    norm leaves each affinity at +-(1 - 1e-8 / |a|), so the weights differ only at the 1e-8
    level and float64 is needed to resolve them (float32 rounding decides, here as officially)."""
    image, text, image_lens, caption_lens = block(seed=8)
    caption_lens[3], image_lens[2] = 1, 1
    image = Local(image.feats, lengths_to_mask(image_lens, image.feats.shape[1]))
    text = Local(text.feats, lengths_to_mask(caption_lens, text.feats.shape[1]))
    aligned, score = ours(image, text, direction, focal_type)
    args = (image.feats, image_lens, text.feats, caption_lens, 20.0, focal_type, direction)
    torch.testing.assert_close(score, official.direction_scores(*args), rtol=0, atol=1e-10)
    if direction == "i2t":
        assert (aligned.weights[:, 3, :, 0] == 1).all()  # every region keeps the one word whole


def test_an_empty_context_gets_zero_weights_not_nan():
    weights = torch.zeros(2, 3, 4)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])[:, None, :]
    weights[0, :, :2] = torch.tensor([0.7, 0.3])
    for focal_type in FOCAL:
        out = focal_reassign(weights, mask, focal_type)
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        torch.testing.assert_close(out[0, :, :2], torch.tensor([[1.0, 0.0]] * 3))


def test_gradient_flows_through_the_reassigned_weights_only():
    """H is a constant: the gradient is that of alpha_j / (alpha_0 + alpha_1) over the kept j."""
    alpha = torch.tensor([[0.45, 0.4, 0.15]], requires_grad=True)  # mean 1/3: keeps 0 and 1 (equal)
    out = focal_reassign(alpha, torch.ones(1, 3, dtype=torch.bool), "equal")
    (out * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    a0, a1 = 0.45, 0.4
    s = a0 + a1
    torch.testing.assert_close(out.detach(), torch.tensor([[a0 / s, a1 / s, 0.0]]))
    torch.testing.assert_close(alpha.grad, torch.tensor([[-a1 / s**2, a0 / s**2, 0.0]]))


# --------------------------------------------------------------------- the whole BFAN model


def small_model(recipe: str, focal_type: str | None = None):
    overrides = ["recipe.embed_dim=16", "text.encoder.word_dim=8"]
    if focal_type:
        overrides += [f"match[0].cross.focal_type={focal_type}", f"match[1].cross.focal_type={focal_type}"]
    parsed = parse_recipe((RECIPES / recipe).read_text(), recipe, overrides=overrides)
    return build_model(parsed, DataPorts(feature_dim=12, vocab_size=30), seed=0).eval()


@pytest.mark.parametrize("recipe", ["bfan_f30k_equal.toml", "bfan_f30k_prob.toml", "bfan_coco_equal.toml",
                                    "bfan_coco_prob.toml"])
def test_model_score_is_bfans_bidirectional_score(recipe):
    model = small_model(recipe)
    focal_type = model.recipe.match[0].cross.spec.focal_type
    assert focal_type == recipe.removesuffix(".toml").split("_")[-1]
    assert [m.cross.spec.name for m in model.recipe.match] == ["bfan.t2i", "bfan.i2t"]
    g = torch.Generator().manual_seed(7)
    regions = Regions(torch.rand(3, 6, 12, generator=g), torch.tensor([6, 4, 5]))
    lengths = torch.tensor([7, 3, 5, 2, 6])  # SCAN-tokenised captions hold <start> w... <end>: never one token
    ids = torch.randint(4, 30, (5, 7), generator=g).masked_fill(~lengths_to_mask(lengths, 7), 0)
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(Tokens(ids, lengths))
        score = model.score(image, text)
    reference = official.bfan_scores(image.local.feats.double(), image.local.lengths, text.local.feats.double(),
                                     text.local.lengths, 20.0, focal_type)
    torch.testing.assert_close(score.double(), reference, rtol=0, atol=1e-5)


def test_pair_bytes_covers_the_attention_matrices():
    spec = TextToImage()
    assert spec.pair_bytes(text_len=12, image_len=36) >= 4 * 12 * 36 * 5.2  # the measured peak
    assert spec.pair_bytes(text_len=24, image_len=36) == 2 * spec.pair_bytes(text_len=12, image_len=36)
    assert math.isclose(ImageToText().pair_bytes(text_len=12, image_len=36), spec.pair_bytes(text_len=12, image_len=36))
