"""Shared tensor primitives (l2norm, masked pooling, cosine), written once for every plugin."""

from __future__ import annotations

import torch

# SCAN and its descendants add 1e-8 to the norm before dividing; keep that exact form so
# imported checkpoints score the same.
EPS = 1e-8


def float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` at least in float32: the numerically sensitive steps (norms, softmax, LogSumExp, the losses) run
    in float32 under mixed precision (``itmkit.precision``), where a product left them bf16 or fp16. Any other
    tensor (float32, float64, integers) is returned as it is, no copy: full-precision runs are unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / (||x||_2 + eps) along ``dim`` (the SCAN form of l2 normalisation).

    A zero vector (a padded region or word, whose rows every stage masks) maps to zero with a zero
    gradient: the sum of squares is clamped to the smallest normal float before the square root,
    whose derivative at exactly 0 is infinite (0 x inf = NaN would poison every weight through the
    masked row). Any other vector's result is bit-identical to the unclamped form.
    """
    x = float32(x)
    return x / (x.pow(2).sum(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt() + eps)


def l1norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / (sum |x| + eps) along ``dim``."""
    x = float32(x)
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` holds; ``mask`` broadcasts to x without its last axis."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    total = (x * weights).sum(dim=dim)
    count = weights.sum(dim=dim).clamp(min=1.0)
    return total / count


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of ``x`` over the valid positions (0 where nothing is valid)."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    out = filled.max(dim=dim).values
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def masked_last(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """The last valid position of ``x`` along ``dim`` (0 where nothing is valid).

    The mask must be a prefix (valid positions first), as every itmkit mask is.
    """
    count = mask.long().sum(dim=dim)
    last = (count - 1).clamp(min=0)  # index of the last valid position
    x = x.movedim(dim, -2)
    index = last[..., None, None].expand(*last.shape, 1, x.shape[-1])
    picked = x.gather(-2, index).squeeze(-2)
    return picked * (count > 0).unsqueeze(-1).to(picked.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Cosine similarity as SCAN computes it: <a,b> / max(||a|| ||b||, eps)."""
    a, b = float32(a), float32(b)
    dot = (a * b).sum(dim=dim)
    norms = a.norm(dim=dim) * b.norm(dim=dim)
    return dot / norms.clamp(min=eps)


def xavier_linear_(layer: torch.nn.Linear) -> None:
    """SCAN's init of its projection layers: uniform(+-sqrt(6/(in+out))), zero bias."""
    bound = (6.0 / (layer.in_features + layer.out_features)) ** 0.5
    torch.nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        torch.nn.init.zeros_(layer.bias)


class _LastGram:
    """The Gram matrices of the last tensor asked for, given again while that tensor is unchanged.

    Scoring (no autograd) multiplies one image block's regions with block after block of captions,
    and the cosine head needs the block's (R x R) Gram matrices for each of them. Keeping a reference
    to the input keeps its memory from being reused by another tensor, and the key (storage, offset,
    shape, strides, dtype and the version counter, which every in-place change advances) then
    identifies exactly that content. ``clear()`` drops it (``score_all`` does when it ends, so no
    block outlives its scoring).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training: the graph needs its own product
            return x @ x.transpose(-1, -2)
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype,
               x.device, x._version, torch.is_autocast_enabled(x.device.type))
        if key != self.key:
            self.key, self.source, self.gram = key, x, x @ x.transpose(-1, -2)
        return self.gram

    def clear(self) -> None:
        self.key = self.source = self.gram = None


# x @ xᵀ over the last two axes, (..., L, D) -> (..., L, L): the fragments' Gram matrices
gram = _LastGram()
