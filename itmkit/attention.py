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

from itmkit.ops import EPS, float32
from itmkit.types import Aligned, Local

RAW_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
# After these the normalised affinities lie in [-1, 1], so lambda * them cannot overflow exp()
# and the context softmax may skip subtracting its maximum.
BOUNDED_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm")
MAX_UNSHIFTED_LAMBDA = 60.0  # exp(60) * thousands of fragments stays far below float32's max
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


def context_major_dots(query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """<q, c> for every fragment pair of every item pair, as ONE matrix product: (Nc, Lc, Nq, Lq).

    Flattening both sides to (items * fragments, D) turns Ni * Nt tiny products into one large
    GEMM, which runs near the machine's peak. The layout keeps the query fragments innermost
    (the raw-feature norm reduces over them) and each context item's fragments as rows, so the
    attended-vector norms become one batched product per context item (``core.cosine``).
    """
    (nq, lq, d), (nc, lc, _) = query.shape, context.shape
    return (context.reshape(nc * lc, d) @ query.reshape(nq * lq, d).T).view(nc, lc, nq, lq)


def to_pair_axes(t: torch.Tensor, query_side: str) -> torch.Tensor:
    """A context-major (Nc, Lc, Nq, Lq) tensor as a (Ni, Nt, Lq, Lc) view (no copy)."""
    return t.permute(0, 2, 3, 1) if query_side == "text" else t.permute(2, 0, 3, 1)


def to_context_major(t: torch.Tensor, query_side: str) -> torch.Tensor:
    """The inverse of ``to_pair_axes``: (Ni, Nt, Lq, Lc) -> (Nc, Lc, Nq, Lq) view."""
    return t.permute(0, 3, 1, 2) if query_side == "text" else t.permute(1, 3, 0, 2)


def raw_feature_norm(attn: torch.Tensor, query_valid: torch.Tensor, how: str, eps: float = EPS, scale: float = 1.0,
                     dim: int = -2) -> torch.Tensor:
    """SCAN's normalisation of raw affinities along the query axis ``dim``, times ``scale``.

    Entries of padded queries must already be zero (``scan_attention`` zeroes padded query
    vectors before the product), so they add nothing to the l1/l2 norms, exactly as slicing
    each caption to its length does; ``query_valid`` (broadcastable to ``attn``) masks them out
    of the softmax variant. Folding ``scale`` (lambda) into the per-column factor saves a pass.
    """
    attn = float32(attn)
    if how == "softmax":
        normed = torch.softmax(attn.masked_fill(~query_valid, float("-inf")), dim=dim).masked_fill(~query_valid, 0.0)
        return normed * scale
    if how.startswith("clipped"):
        attn = F.leaky_relu(attn, 0.1)
    for suffix, order in (("l2norm", 2), ("l1norm", 1)):
        if how.endswith(suffix):
            factor = scale / (torch.linalg.vector_norm(attn, ord=order, dim=dim, keepdim=True) + eps)
            # leaky_relu made a fresh tensor; outside autograd scale it in place
            return attn.mul_(factor) if how.startswith("clipped") and not torch.is_grad_enabled() else attn * factor
    if how in ("clipped", "no_norm"):
        return attn * scale
    raise ValueError(f"raw_feature_norm must be one of {RAW_NORMS}, got {how!r}")


def masked_softmax(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` holds; 0 everywhere on rows with nothing valid."""
    out = torch.softmax(float32(x).masked_fill(~mask, float("-inf")), dim=dim)
    return torch.nan_to_num(out, nan=0.0)


def context_softmax(logits: torch.Tensor, context_valid: torch.Tensor, *, bounded: bool) -> torch.Tensor:
    """Softmax of context-major logits (Nc, Lc, Nq, Lq) over the context fragments (dim 1).

    With ``bounded`` logits (|logit| <= 60) exp() cannot overflow, so the maximum is not
    subtracted; outside autograd the passes then run in place on ``logits``. Padded context
    fragments get weight 0; a query whose context has nothing valid gets all zeros.
    """
    logits = float32(logits)
    all_valid = bool(context_valid.all())
    if not bounded:
        return torch.softmax(logits, dim=1) if all_valid else masked_softmax(logits, context_valid.expand_as(logits), dim=1)
    in_place = not torch.is_grad_enabled()  # no graph would need the overwritten values
    e = logits.exp_() if in_place else logits.exp()
    if not all_valid:
        e = e.mul_(context_valid) if in_place else e * context_valid
    total = e.sum(dim=1, keepdim=True).clamp_(min=torch.finfo(e.dtype).tiny)
    return e.div_(total) if in_place else e / total


def scan_attention(
    query: Local,
    context: Local,
    *,
    query_side: str,
    lambda_softmax: float,
    raw_norm: str = "clipped_l2norm",
    eps: float = EPS,
) -> Aligned:
    """Every query fragment attending over the other side's fragments, for all Ni x Nt pairs (SCAN eq. 7-8).

    Weights and dots are (Ni, Nt, Lq, Lc) views of context-major tensors (``context_major_dots``).
    """
    query = Local(query.feats * query.mask.unsqueeze(-1), query.mask, query.extras)  # padded queries -> 0
    dots = context_major_dots(query.feats, context.feats)
    logits = raw_feature_norm(dots, query.mask[None, None], raw_norm, eps, scale=lambda_softmax, dim=-1)
    bounded = raw_norm in BOUNDED_NORMS and abs(lambda_softmax) <= MAX_UNSHIFTED_LAMBDA
    weights = context_softmax(logits, context.mask[:, :, None, None], bounded=bounded)
    q, q_mask, c, c_mask = pair_layout(query, context, query_side)
    weights, dots = to_pair_axes(weights, query_side), to_pair_axes(dots, query_side)
    return Aligned(query=q, weights=weights, context=c, query_mask=q_mask.expand(dots.shape[:-1]),
                   query_side=query_side, dots=dots, context_mask=c_mask)


def pair_query_attention(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    context: Local,
    *,
    query_side: str,
    lambda_softmax: float,
    raw_norm: str = "clipped_l2norm",
    eps: float = EPS,
) -> torch.Tensor:
    """SCAN's attention weights (Ni, Nt, Lq, Lc) for queries that differ per pair (IMRAM's memory).

    ``query`` (Ni, Nt, Lq, D) holds each pair's own query fragments; rows of padded ones
    (``query_mask`` (Ni, Nt, Lq) or broadcastable, False) may hold anything: their affinities
    are zeroed before the query-axis norm, so they count as slicing them off would. ``context`` is the other side's fragments: the
    Ni images when the queries are words (``query_side`` "text"), the Nt captions when they are
    regions. The same two steps as ``scan_attention``: the raw feature norm over the query axis,
    softmax(lambda *) over the valid context fragments.
    """
    if query_side == "text":  # each image's regions: one batched product per image
        dots = torch.einsum("itqd,icd->itqc", query, context.feats)
        context_valid = context.mask[:, None, None, :]
    elif query_side == "image":  # each caption's words: one batched product per caption
        dots = torch.einsum("itqd,tcd->itqc", query, context.feats)
        context_valid = context.mask[None, :, None, :]
    else:
        raise ValueError(f"query_side must be one of {SIDES}, got {query_side!r}")
    query_valid = query_mask[..., None].bool()
    if not bool(query_valid.all()):
        dots = dots.masked_fill(~query_valid, 0.0)
    logits = raw_feature_norm(dots, query_valid, raw_norm, eps, scale=lambda_softmax, dim=-2)
    if bool(context.mask.all()):
        return torch.softmax(logits, dim=-1)
    return masked_softmax(logits, context_valid.expand_as(logits), dim=-1)
