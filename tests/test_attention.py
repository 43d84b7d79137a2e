"""SCAN attention on whole blocks against the official per-caption loop, every raw norm, both directions."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F

from itmkit.attention import RAW_NORMS, scan_attention
from itmkit.core_stages import CosineHead, context_major_cosine
from itmkit.ops import l2norm
from itmkit.types import Local, lengths_to_mask


def official_func_attention(query, context, raw_norm, smooth, eps=1e-8):
    """The official func_attention, written from its definition: query (B, Lq, d), context (B, Lc, d)."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (B, Lc, Lq)
    if raw_norm == "softmax":
        attn = torch.softmax(attn, dim=2)
    elif raw_norm in ("l2norm", "clipped_l2norm"):
        if raw_norm.startswith("clipped"):
            attn = F.leaky_relu(attn, 0.1)
        attn = attn / (attn.pow(2).sum(dim=2, keepdim=True).sqrt() + eps)
    elif raw_norm in ("l1norm", "clipped_l1norm"):  # the official l1norm_d is undefined; l1 over the same axis
        if raw_norm.startswith("clipped"):
            attn = F.leaky_relu(attn, 0.1)
        attn = attn / (attn.abs().sum(dim=2, keepdim=True) + eps)
    elif raw_norm == "clipped":
        attn = F.leaky_relu(attn, 0.1)
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)  # (B, Lq, Lc)
    return torch.bmm(attn, context), attn


def official_cosine(x1, x2, eps=1e-8):
    return (x1 * x2).sum(2) / (x1.norm(dim=2) * x2.norm(dim=2)).clamp(min=eps)


def official_scores(images, captions, lengths, direction, raw_norm, smooth):
    """xattn_score_t2i / i2t: one caption at a time, sliced to its length, mean over queries."""
    columns = []
    for i in range(captions.shape[0]):
        cap = captions[i, : lengths[i]].unsqueeze(0).repeat(images.shape[0], 1, 1)
        if direction == "t2i":
            attended, _ = official_func_attention(cap, images, raw_norm, smooth)
            row = official_cosine(cap, attended)
        else:
            attended, _ = official_func_attention(images, cap, raw_norm, smooth)
            row = official_cosine(images, attended)
        columns.append(row.mean(dim=1, keepdim=True))
    return torch.cat(columns, 1)


def _block(seed: int, n_images=4, n_captions=6, regions=7, words=9, dim=16):
    g = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(n_images, regions, dim, generator=g, dtype=torch.float64))
    lengths = torch.randint(2, words + 1, (n_captions,), generator=g)
    lengths[0] = words
    captions = l2norm(torch.randn(n_captions, words, dim, generator=g, dtype=torch.float64))
    # garbage in the padding: it must change nothing
    pad = ~lengths_to_mask(lengths, words)
    captions[pad] = torch.randn(int(pad.sum()), dim, generator=g, dtype=torch.float64) * 5
    return images, captions, lengths


@pytest.mark.parametrize("raw_norm", RAW_NORMS)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "scoring"])  # scoring works in place
def test_block_attention_equals_the_per_caption_loop(raw_norm, direction, grad):
    images, captions, lengths = _block(seed=len(raw_norm) + (direction == "i2t"))
    smooth = 9.0 if direction == "t2i" else 4.0
    expected = official_scores(images, captions, lengths, direction, raw_norm, smooth)

    img = Local(images, torch.ones(images.shape[:2], dtype=torch.bool))
    cap = Local(captions, lengths_to_mask(lengths, captions.shape[1]))
    query, context = (cap, img) if direction == "t2i" else (img, cap)
    side = "text" if direction == "t2i" else "image"
    with torch.set_grad_enabled(grad):
        aligned = scan_attention(query, context, query_side=side, lambda_softmax=smooth, raw_norm=raw_norm)
        sims = CosineHead()(aligned)  # PairSims (Ni, Nt, Lq, 1), never materialising the attended vectors
    per_query = sims.sims.squeeze(-1) * sims.mask
    ours = per_query.sum(-1) / sims.mask.sum(-1)
    assert ours.shape == expected.shape == (4, 6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)
    # the materialised attended vectors agree with the official ones too
    for i in range(captions.shape[0]):
        n = int(lengths[i])
        cap_i = captions[i, :n].unsqueeze(0).repeat(images.shape[0], 1, 1)
        if direction == "t2i":
            ref, _ = official_func_attention(cap_i, images, raw_norm, smooth)
            torch.testing.assert_close(aligned.attended()[:, i, :n], ref, rtol=0, atol=1e-10)
        else:
            ref, _ = official_func_attention(images, cap_i, raw_norm, smooth)
            torch.testing.assert_close(aligned.attended()[:, i], ref, rtol=0, atol=1e-10)


def test_attention_weights_ignore_padded_context():
    images, captions, lengths = _block(seed=5)
    img = Local(images, torch.ones(images.shape[:2], dtype=torch.bool))
    cap = Local(captions, lengths_to_mask(lengths, captions.shape[1]))
    aligned = scan_attention(img, cap, query_side="image", lambda_softmax=4.0)
    pad = ~cap.mask  # (Nt, L)
    assert torch.all(aligned.weights.masked_select(pad[None, :, None, :].expand_as(aligned.weights)) == 0)
    torch.testing.assert_close(aligned.weights.sum(-1), torch.ones_like(aligned.weights[..., 0]))


def test_float32_fast_path_is_within_1e5_of_the_reference():
    images, captions, lengths = _block(seed=9, n_images=8, n_captions=10, regions=36, words=20, dim=64)
    expected = official_scores(images, captions, lengths, "t2i", "clipped_l2norm", 9.0)
    img = Local(images.float(), torch.ones(images.shape[:2], dtype=torch.bool))
    cap = Local(captions.float(), lengths_to_mask(lengths, captions.shape[1]))
    sims = CosineHead()(scan_attention(cap, img, query_side="text", lambda_softmax=9.0))
    ours = (sims.sims.squeeze(-1) * sims.mask).sum(-1) / sims.mask.sum(-1)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("smooth", [4.0, 100.0])  # 100: past the unshifted-exp bound, the max is subtracted
def test_the_context_major_cosine_equals_the_general_one(direction, smooth):
    """core.cosine's batched Gram path (context-major layout) against its general path on copies."""
    images, captions, lengths = _block(seed=11)
    img = Local(images, torch.ones(images.shape[:2], dtype=torch.bool))
    cap = Local(captions, lengths_to_mask(lengths, captions.shape[1]))
    query, context = (cap, img) if direction == "t2i" else (img, cap)
    side = "text" if direction == "t2i" else "image"
    with torch.no_grad():
        aligned = scan_attention(query, context, query_side=side, lambda_softmax=smooth)
        assert context_major_cosine(aligned, 1e-8) is not None
        fast = CosineHead().aligned_cosine(aligned)
        copied = attrs.evolve(aligned, weights=aligned.weights.contiguous(), dots=aligned.dots.contiguous())
        assert context_major_cosine(copied, 1e-8) is None  # another layout: the general path
        torch.testing.assert_close(fast, CosineHead().aligned_cosine(copied), rtol=0, atol=1e-12)
        expected = official_scores(images, captions, lengths, direction, "clipped_l2norm", smooth)
    mask = aligned.query_mask.expand(fast.shape)
    torch.testing.assert_close((fast * mask).sum(-1) / mask.sum(-1), expected, rtol=0, atol=1e-10)
