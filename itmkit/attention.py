"""SCAN's stacked cross attention, vectorised over a whole block of Ni images x Nt captions.

One implementation for every paper that uses it (SCAN, BFAN, PFAN, IMRAM, SGRAF, DIME):

1. raw affinities A = <query_q, context_c> for every pair of fragments;
2. a "raw feature norm" of A over the *query* axis (SCAN's default: LeakyReLU(0.1) then l2,
   the norm plus 1e-8);
3. softmax(lambda * A) over the *context* axis.

The official code loops over captions and slices each to its length; here padding is masked
instead: padded queries never enter the query-axis norm, padded context fragments get no
attention weight, so results equal the per-caption loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itmkit.ops import EPS
from itmkit.types import Aligned, Local

RAW_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
SIDES = ("text", "image")


def pair_layout(query: Local, context: Local, query_side: str) -> tuple[torch.Tensor, ...]:
    """Place both sides on the (Ni, Nt, L, D) block axes: returns q, q_mask, c, c_mask."""
    if query_side == "text":  # queries are captions (Nt, L, D), context images (Ni, R, D)
        q, qm = query.feats[None], query.mask[None]
        c, cm = context.feats[:, None], context.mask[:, None]
    elif query_side == "image":  # queries are images (Ni, R, D), context captions (Nt, L, D)
        q, qm = query.feats[:, None], query.mask[:, None]
        c, cm = context.feats[None], context.mask[None]
    else:
        raise ValueError(f"query_side must be one of {SIDES}, got {query_side!r}")
    return q, qm, c, cm


def block_dots(query: torch.Tensor, context: torch.Tensor, query_side: str) -> torch.Tensor:
    """<q, c> for every fragment pair of every item pair, as ONE matrix product: (Ni, Nt, Lq, Lc).

    Flattening both sides to (items * fragments, D) turns Ni * Nt tiny products into one large
    GEMM, which runs near the machine's peak; the result is a permuted view, no copy.
    """
    (nq, lq, d), (nc, lc, _) = query.shape, context.shape
    flat = query.reshape(nq * lq, d) @ context.reshape(nc * lc, d).T  # (nq*lq, nc*lc)
    dots = flat.view(nq, lq, nc, lc)
    # text queries: (Nt, L, Ni, R) -> (Ni, Nt, L, R); image queries: (Ni, R, Nt, L) -> (Ni, Nt, R, L)
    return dots.permute(2, 0, 1, 3) if query_side == "text" else dots.permute(0, 2, 1, 3)


def raw_feature_norm(attn: torch.Tensor, query_mask: torch.Tensor, how: str, eps: float = EPS, scale: float = 1.0) -> torch.Tensor:
    """SCAN's normalisation of raw affinities (…, Lq, Lc) along the query axis (dim -2), times ``scale``.

    Rows of padded queries must already be zero (``scan_attention`` zeroes padded query
    vectors before the product), so they add nothing to the l1/l2 norms, exactly as slicing
    each caption to its length does. Folding ``scale`` (lambda) into the per-column factor
    saves a pass over the block.
    """
    if how == "softmax":
        valid = query_mask.unsqueeze(-1)
        normed = torch.softmax(attn.masked_fill(~valid, float("-inf")), dim=-2).masked_fill(~valid, 0.0)
        return normed * scale
    if how.startswith("clipped"):
        attn = F.leaky_relu(attn, 0.1)
    if how.endswith("l2norm"):
        return attn * (scale / (torch.linalg.vector_norm(attn, ord=2, dim=-2, keepdim=True) + eps))
    if how.endswith("l1norm"):
        return attn * (scale / (torch.linalg.vector_norm(attn, ord=1, dim=-2, keepdim=True) + eps))
    if how in ("clipped", "no_norm"):
        return attn * scale
    raise ValueError(f"raw_feature_norm must be one of {RAW_NORMS}, got {how!r}")


def masked_softmax(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` holds; 0 everywhere on rows with nothing valid."""
    out = torch.softmax(x.masked_fill(~mask, float("-inf")), dim=dim)
    return torch.nan_to_num(out, nan=0.0)


def scan_attention(
    query: Local,
    context: Local,
    *,
    query_side: str,
    lambda_softmax: float,
    raw_norm: str = "clipped_l2norm",
    eps: float = EPS,
) -> Aligned:
    """Every query fragment attending over the other side's fragments, for all Ni x Nt pairs (SCAN eq. 7-8)."""
    query = Local(query.feats * query.mask.unsqueeze(-1), query.mask, query.extras)  # padded queries -> 0
    q, q_mask, c, c_mask = pair_layout(query, context, query_side)
    dots = block_dots(query.feats, context.feats, query_side)
    q_mask_b = q_mask.expand(dots.shape[:-1])  # (Ni, Nt, Lq)
    logits = raw_feature_norm(dots, q_mask_b, raw_norm, eps, scale=lambda_softmax)
    if bool(context.mask.all()):  # every context fragment valid (36 regions, say): plain softmax
        weights = torch.softmax(logits, dim=-1)
    else:
        weights = masked_softmax(logits, c_mask.unsqueeze(-2).expand_as(dots))
    return Aligned(query=q, weights=weights, context=c, query_mask=q_mask_b, query_side=query_side,
                   dots=dots, context_mask=c_mask)
