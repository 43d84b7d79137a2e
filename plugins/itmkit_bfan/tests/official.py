"""A slow, literal reference of the official BFAN algorithm, written from its definition.

One caption at a time, the caption (and each image) sliced to its valid fragments, the focal
scores as the explicit double sums of the paper, in Python floats. The one deliberate
difference from the official code is documented in itmkit_bfan.stages: a row that keeps no
fragment keeps them all (``on_empty="keep_all"``); ``on_empty="nan"`` reproduces the official
0 / 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def focal_score_literal(row: list[float], j: int, focal_type: str) -> float:
    """F_j for one query's pre-assigned weights ``row`` over its valid context (explicit loops over k)."""
    if focal_type == "equal":
        return len(row) * row[j] - sum(row[k] for k in range(len(row)))
    if focal_type == "prob":
        return sum((row[j] - row[k]) * math.sqrt(row[k]) for k in range(len(row)))
    raise ValueError(focal_type)


def preassign(query: torch.Tensor, context: torch.Tensor, smooth: float, eps: float = 1e-8) -> torch.Tensor:
    """(Lq, Lc) SCAN attention: LeakyReLU(0.1) of <c, q>, l2 over the queries (+eps), softmax(smooth *) over context."""
    attn = context @ query.T  # (Lc, Lq)
    attn = F.leaky_relu(attn, 0.1)
    attn = attn / (attn.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    return torch.softmax(attn.T * smooth, dim=1)  # (Lq, Lc)


def focal_attention(query: torch.Tensor, context: torch.Tensor, smooth: float, focal_type: str,
                    on_empty: str = "keep_all") -> torch.Tensor:
    """Re-assigned weights (Lq, Lc) of one (query, context) pair, both sliced to their valid fragments."""
    alpha = preassign(query, context, smooth)
    out = torch.zeros_like(alpha)
    for q, row in enumerate(alpha.tolist()):
        keep = [focal_score_literal(row, j, focal_type) > 0 for j in range(len(row))]
        if not any(keep):
            if on_empty == "nan":
                out[q] = float("nan")
                continue
            keep = [True] * len(row)
        total = sum(a for a, k in zip(row, keep) if k)
        for j, (a, k) in enumerate(zip(row, keep)):
            out[q, j] = a / total if k else 0.0
    return out


def cosine(x1: torch.Tensor, x2: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (x1 * x2).sum(-1) / (x1.norm(dim=-1) * x2.norm(dim=-1)).clamp(min=eps)


def direction_weights(images, image_lens, captions, caption_lens, smooth, focal_type, direction, on_empty="keep_all"):
    """weights[i][t]: the (Lq, Lc) re-assigned weights of image i and caption t in one direction."""
    out = []
    for i in range(images.shape[0]):
        img = images[i, : int(image_lens[i])]
        row = []
        for t in range(captions.shape[0]):
            cap = captions[t, : int(caption_lens[t])]
            query, context = (cap, img) if direction == "t2i" else (img, cap)
            row.append(focal_attention(query, context, smooth, focal_type, on_empty))
        out.append(row)
    return out


def direction_scores(images, image_lens, captions, caption_lens, smooth, focal_type, direction):
    """(Ni, Nt) mean over the queries of cos(query, attended context), one direction."""
    weights = direction_weights(images, image_lens, captions, caption_lens, smooth, focal_type, direction)
    scores = torch.zeros(images.shape[0], captions.shape[0], dtype=images.dtype)
    for i in range(images.shape[0]):
        img = images[i, : int(image_lens[i])]
        for t in range(captions.shape[0]):
            cap = captions[t, : int(caption_lens[t])]
            query, context = (cap, img) if direction == "t2i" else (img, cap)
            scores[i, t] = cosine(query, weights[i][t] @ context).mean()
    return scores


def bfan_scores(images, image_lens, captions, caption_lens, smooth, focal_type):
    """BFAN's xattn_score: t2i plus i2t, one lambda."""
    args = (images, image_lens, captions, caption_lens, smooth, focal_type)
    return direction_scores(*args, "t2i") + direction_scores(*args, "i2t")


# ------------------------------------------------------------ the official encoders, rebuilt


def l2norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + eps)


class OfficialImageEncoder(nn.Module):
    """EncoderImagePrecomp: fc, then l2norm (+1e-8); optionally the weight_norm variant."""

    def __init__(self, img_dim: int, embed: int, weight_norm: bool = False, normalize: bool = True):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed)
        if weight_norm:
            self.fc = nn.utils.weight_norm(self.fc, dim=None)
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.fc(images)
        return l2norm(out) if self.normalize else out


class OfficialTextEncoder(nn.Module):
    """EncoderText: embed, packed bi-GRU, the two halves averaged, l2norm (+1e-8)."""

    def __init__(self, vocab: int, word_dim: int, embed: int, num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab, word_dim)
        self.rnn = nn.GRU(word_dim, embed, num_layers, batch_first=True, bidirectional=True)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        half = out.shape[-1] // 2
        return l2norm((out[..., :half] + out[..., half:]) / 2)
