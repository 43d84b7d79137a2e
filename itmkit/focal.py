"""BFAN's focal attention (Liu et al., ACM MM 2019): which context fragments each query keeps.

Shared by every stage that refines attention weights this way (``bfan.t2i`` / ``bfan.i2t``, and
``imram.t2i`` / ``imram.i2t`` with ``focal`` set, IMRAM's memory over focal attention).

Focal attention runs in three steps for every query fragment q over the context fragments j:

1. pre-assign: alpha_qj, SCAN's attention (clipped_l2norm of the raw affinities over the
   query axis, then softmax(lambda *) over the context), from ``itmkit.attention``;
2. identify: keep fragment j when its focal score F_qj > 0, with
     equal:  F_qj = Lc * alpha_qj - sum_k alpha_qk                     (above the mean weight)
     prob:   F_qj = sum_k (alpha_qj - alpha_qk) * sqrt(alpha_qk)
                  = alpha_qj * sum_k sqrt(alpha_qk) - sum_k alpha_qk^(3/2)
   (the second line is the same sum without the (Lc x Lc) matrix per query); Lc and the sums
   over k cover the valid context fragments only;
3. re-assign: alpha'_qj = H_qj alpha_qj / sum_k H_qk alpha_qk, with H the kept indicator.

A row that keeps nothing. Over the valid context, sum_j F_qj = 0 (equal) and
sum_j sqrt(alpha_qj) F_qj = 0 (prob, by antisymmetry of (alpha_j - alpha_k)); every alpha is
positive (a softmax), so "no F_qj > 0" forces every F_qj = 0, i.e. alpha uniform over the
context. The official code then divides 0 by 0 (NaN); a context of one fragment (a one-word
caption, a one-region image) always hits it, since its weight 1 equals its mean. Here such a
row keeps every valid fragment, so alpha' = alpha: no fragment is more relevant than another,
so none is dropped (and an empty context keeps zero weights).
It also takes rounding out of exactly equal weights: every F_qj is then the same number, so
the official code keeps all of them (alpha' = alpha) or none (NaN) depending on the last bit
of the sum, and here both give alpha. Weights equal only up to rounding are decided by the
literal "> 0" test in the input's precision, as in the official code.
"""

from __future__ import annotations

import torch

FOCAL_TYPES = ("equal", "prob")


def focal_scores(weights: torch.Tensor, context_mask: torch.Tensor, focal_type: str) -> torch.Tensor:
    """F (…, Lq, Lc): BFAN's focal score of each context fragment j for each query q.

    ``weights`` are the pre-assigned attention alpha, 0 on padded context (as a masked
    softmax leaves them); ``context_mask`` broadcasts to them. Padded fragments therefore add
    nothing to the sums over k, are left out of Lc, and score -sum_k (< 0): never kept.
    """
    if focal_type == "equal":  # Lc alpha_qj - sum_k alpha_qk
        count = context_mask.sum(dim=-1, keepdim=True).to(weights.dtype)  # Lc, before broadcasting
        return weights * count - weights.sum(dim=-1, keepdim=True)
    if focal_type == "prob":  # sum_k (alpha_qj - alpha_qk) sqrt(alpha_qk), without the (Lc x Lc) matrix
        root_sum = weights.sqrt().sum(dim=-1, keepdim=True)
        return weights * root_sum - weights.pow(1.5).sum(dim=-1, keepdim=True)
    raise ValueError(f"focal_type must be one of {FOCAL_TYPES}, got {focal_type!r}")


def focal_keep(weights: torch.Tensor, context_mask: torch.Tensor, focal_type: str) -> torch.Tensor:
    """H (…, Lq, Lc) bool: the context fragments whose focal score is > 0.

    H is a step function of the weights, so it carries no gradient (as in the official code,
    where it is a ``torch.where`` of constants); computing it without autograd also keeps
    sqrt(0) of the padding out of the backward pass.
    """
    with torch.no_grad():
        return focal_scores(weights, context_mask, focal_type) > 0


def focal_reassign(weights: torch.Tensor, context_mask: torch.Tensor, focal_type: str) -> torch.Tensor:
    """alpha' = H alpha / sum H alpha over the context axis; a row that keeps nothing keeps alpha."""
    kept = weights * focal_keep(weights, context_mask, focal_type)
    total = kept.sum(dim=-1, keepdim=True)
    some = total > 0  # False only where alpha is uniform over the context (or the context is empty)
    reassigned = kept / total.masked_fill(~some, 1.0)
    if torch.is_grad_enabled():  # out= does not record a graph
        return torch.where(some, reassigned, weights)
    # keep the weights' memory layout, which core.cosine's fast path relies on
    return torch.where(some, reassigned, weights, out=torch.empty_like(weights))
