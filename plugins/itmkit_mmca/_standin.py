"""TEMPORARY stand-ins for itmkit_saem.modules (TransformerLayer, NgramCNN) until that plugin lands."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TransformerLayer(nn.Module):
    def __init__(self, *, dim: int, heads: int, intermediate: int, activation: str = "gelu", dropout: float = 0.1,
                 ln_eps: float = 1e-12):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.ffn_in = nn.Linear(dim, intermediate)
        self.ffn_out = nn.Linear(intermediate, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = feats.shape
        h = self.heads

        def split(t):
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(feats)), split(self.key(feats)), split(self.value(feats))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = self.dropout(logits.softmax(-1))
        ctx = (probs @ v).transpose(1, 2).reshape(b, n, d)
        x = self.attn_norm(feats + self.dropout(self.attn_out(ctx)))
        act = F.relu if self.activation == "relu" else F.gelu
        return self.ffn_norm(x + self.dropout(self.ffn_out(act(self.ffn_in(x)))))


class NgramCNN(nn.Module):
    def __init__(self, *, in_dim: int, out_dim: int, channels: int = 256, ngrams=(1, 2, 3), dropout: float = 0.0,
                 layer_norm: bool = False, ln_eps: float = 1e-5):
        super().__init__()
        self.ngrams = tuple(ngrams)
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, channels, k) for k in self.ngrams)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * len(self.ngrams), out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=ln_eps) if layer_norm else None

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = feats.masked_fill(~mask[..., None], 0).transpose(1, 2)
        lengths = mask.sum(1)
        pooled = []
        for k, conv in zip(self.ngrams, self.convs):
            pad = max(k - x.shape[-1], 0)
            y = F.relu(conv(F.pad(x, (0, pad))))  # (B, C, W)
            starts = torch.arange(y.shape[-1], device=y.device)
            valid = starts[None] <= (lengths[:, None] - k).clamp(min=0)
            pooled.append(y.masked_fill(~valid[:, None], float("-inf")).amax(-1))
        out = self.fc(self.dropout(torch.cat(pooled, -1)))
        return self.norm(out) if self.norm is not None else out
