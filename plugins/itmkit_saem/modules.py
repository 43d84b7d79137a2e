"""Plain building blocks of SAEM (Wu et al., ACM MM 2019), shared with other plugins (MMCA).

    TransformerLayer   one post-LayerNorm BERT layer: self-attention, residual + LN, FFN, residual + LN
    NgramCNN           SAEM's text head: 1-, 2-, 3-gram convolutions over the token states, ReLU,
                       max over time, concat, dropout, Linear (optionally LayerNorm, l2norm)

Both are ordinary ``nn.Module``s with keyword-only constructors and no recipe machinery; the
stages in ``itmkit_saem.stages`` wrap them. Parameter names are chosen so that the official
checkpoints map one to one (``LAYER_KEYS`` for the BERT layer; the convolutions keep their
official (C, 1, K, D) shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from itmkit.attention import masked_softmax
from itmkit.ops import float32, l2norm

# Our TransformerLayer names -> the names of the same tensors in a BERT layer of the
# pytorch-pretrained-BERT code SAEM ships (bert.py, BERTLayer: old-style LayerNorm gamma/beta).
# Hugging Face BERT layers use the same paths with LayerNorm.weight / LayerNorm.bias.
LAYER_KEYS: dict[str, str] = {
    "query.weight": "attention.self.query.weight",
    "query.bias": "attention.self.query.bias",
    "key.weight": "attention.self.key.weight",
    "key.bias": "attention.self.key.bias",
    "value.weight": "attention.self.value.weight",
    "value.bias": "attention.self.value.bias",
    "attn_out.weight": "attention.output.dense.weight",
    "attn_out.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.gamma",
    "attn_norm.bias": "attention.output.LayerNorm.beta",
    "ffn_in.weight": "intermediate.dense.weight",
    "ffn_in.bias": "intermediate.dense.bias",
    "ffn_out.weight": "output.dense.weight",
    "ffn_out.bias": "output.dense.bias",
    "ffn_norm.weight": "output.LayerNorm.gamma",
    "ffn_norm.bias": "output.LayerNorm.beta",
}


class TransformerLayer(nn.Module):
    """One BERT encoder layer (Vaswani et al. 2017; Devlin et al. 2019), post-LayerNorm:

        A = softmax(Q K^T / sqrt(d_h) over the valid keys) V,  Q, K, V = x W_q, x W_k, x W_v  (per head)
        h = LN(x + Dropout(A W_o))
        y = LN(h + Dropout(act(h W_1) W_2))

    ``forward(feats (B, N, D), mask (B, N) bool) -> (B, N, D)``. Padded positions (mask False)
    are left out as keys, so they change no valid output; their own rows are computed like any
    other (attending over the valid keys) and stay finite, also for an item with no valid
    position (zero attention). The official code adds -10000 to masked logits instead; in
    float32 exp(-10000) is exactly 0, so both give the same numbers whenever an item has a valid
    position. ``activation``: "gelu" is BERT's exact erf GELU, "relu" the original Transformer's.
    ``dropout`` is applied to the attention probabilities (``attention_dropout``, default the
    same) and after both output projections, as in BERT.
    """

    def __init__(self, *, dim: int, heads: int, intermediate: int, activation: str = "gelu", dropout: float = 0.1,
                 ln_eps: float = 1e-12, attention_dropout: float | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.heads = heads
        self.activation = activation
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout if attention_dropout is None else attention_dropout)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.ffn_in = nn.Linear(dim, intermediate)
        self.ffn_out = nn.Linear(intermediate, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, d_h)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = feats.shape
        q, k, v = self._split(self.query(feats)), self._split(self.key(feats)), self._split(self.value(feats))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, N, N)
        if mask is None:
            weights = torch.softmax(float32(logits), dim=-1)  # float32 under mixed precision, as masked_softmax
        else:
            weights = masked_softmax(logits, mask[:, None, None, :].expand_as(logits))
        context = (self.attn_drop(weights) @ v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.after_attention(context, feats)

    def after_attention(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The layer past the attention: output projection, residual + LN, FFN, residual + LN, on (..., D) rows.

        ``context`` holds the attended values (heads merged), ``residual`` the layer's input rows
        (broadcastable to it). Without autograd (scoring) the sums and the ReLU run in place, which
        gives the same numbers with fewer temporaries: MMCA's cross unit runs this on every pair's rows.
        """
        if torch.is_grad_enabled():
            hidden = self.attn_norm(residual + self.drop(self.attn_out(context)))
            inner = self.ffn_in(hidden)
            inner = F.gelu(inner) if self.activation == "gelu" else F.relu(inner)
            return self.ffn_norm(hidden + self.drop(self.ffn_out(inner)))
        hidden = self.attn_norm(self.drop(self.attn_out(context)).add_(residual))
        inner = self.ffn_in(hidden)
        inner = F.gelu(inner) if self.activation == "gelu" else inner.relu_()
        return self.ffn_norm(self.drop(self.ffn_out(inner)).add_(hidden))


class NgramCNN(nn.Module):
    """SAEM's text head (Wu et al. 2019): n-gram convolutions over token states, max over time.

        c_K[t] = ReLU(W_K * x[t : t+K] + b_K)     one Conv2d(1, C, (K, in_dim)) per width K
        f = Dropout([max_t c_1; max_t c_2; max_t c_3]),   y = W f + b   (then LayerNorm, l2norm if asked)

    ``forward(feats (B, N, in_dim), mask (B, N) bool | None) -> (B, out_dim)``.

    mask None (the official behaviour): every position counts, so every window t = 0 .. N-K is
    pooled, padding included; the official code pads each caption to a fixed 32 tokens and
    pools over the [PAD] tokens' states. N must be at least the widest K.
    With a mask (a prefix of valid positions, length n): features past n are replaced by zeros and
    only windows wholly inside the caption (t + K <= n) are pooled; a caption shorter than K
    has the one window at t = 0, zero-padded. The result depends only on the valid positions,
    never on N. With an all-True mask it equals the unmasked result.
    """

    def __init__(self, *, in_dim: int, channels: int, widths: Sequence[int] = (1, 2, 3), out_dim: int,
                 dropout: float = 0.1, layer_norm: bool = False, ln_eps: float = 1e-12, normalize: bool = False):
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive n-gram sizes, got {tuple(widths)}")
        self.widths = tuple(int(k) for k in widths)
        self.convs = nn.ModuleList(nn.Conv2d(1, channels, (k, in_dim)) for k in self.widths)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(len(self.widths) * channels, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=ln_eps) if layer_norm else None
        self.normalize = normalize

    def _pooled(self, conv: nn.Conv2d, feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k = conv.kernel_size[0]
        if mask is None:
            if feats.shape[1] < k:
                raise ValueError(f"NgramCNN: {feats.shape[1]} positions are fewer than the width {k}; pad the"
                                 " captions (the official code pads to 32 tokens) or pass a mask")
            out = F.relu(conv(feats.unsqueeze(1))).squeeze(3)  # (B, C, N-K+1)
            return out.max(dim=2).values
        x = torch.where(mask.unsqueeze(-1), feats, 0.0)
        x = F.pad(x, (0, 0, 0, k - 1))  # (B, N+K-1, D): every start position has a whole window
        out = F.relu(conv(x.unsqueeze(1))).squeeze(3)  # (B, C, N): window t covers positions t .. t+K-1
        start = torch.arange(out.shape[2], device=feats.device)
        n = mask.sum(dim=1, keepdim=True)  # (B, 1)
        valid = (start[None, :] + k <= n) | (start[None, :] == 0)  # (B, N)
        # ReLU outputs are >= 0, so filling invalid windows with 0 leaves the max of the valid ones.
        return out.masked_fill(~valid.unsqueeze(1), 0.0).max(dim=2).values

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = torch.cat([self._pooled(conv, feats, mask) for conv in self.convs], dim=1)  # (B, len(K) C)
        out = self.fc(self.drop(pooled))
        if self.norm is not None:
            out = self.norm(out)
        return l2norm(out) if self.normalize else out
