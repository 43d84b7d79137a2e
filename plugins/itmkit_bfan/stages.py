"""BFAN's focal attention (Liu et al., ACM MM 2019), vectorised over a block of Ni images x Nt captions.

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

BFAN's score runs focal attention both ways with one lambda and adds the two directions:
S = mean_t cos(e_t, a_t) [words attend to regions] + mean_i cos(v_i, a_i) [regions attend to
words]. Here each direction is a cross stage producing ``Aligned`` (the re-assigned weights),
so ``core.cosine`` + ``core.mean`` finish it without materialising the attended vectors, and
a recipe with two [[match]] branches (bfan.t2i, bfan.i2t; weight 1 each) sums to S exactly.

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

from typing import ClassVar, Literal

import attrs
import torch
from torch import nn

from itmkit.attention import RAW_NORMS, scan_attention
from itmkit.stage import PortError, Stage, param
from itmkit.types import Aligned, AlignedPort, Local, LocalPort

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


class FocalAttention(nn.Module):
    """Each query fragment of ``query_side`` attends over the other side's with BFAN's focal attention."""

    def __init__(self, *, query_side: str, lambda_softmax: float, focal_type: str, raw_norm: str = "clipped_l2norm"):
        super().__init__()
        self.query_side = query_side
        self.lambda_softmax = lambda_softmax
        self.focal_type = focal_type
        self.raw_norm = raw_norm

    def forward(self, image: Local, text: Local) -> Aligned:
        query, context = (text, image) if self.query_side == "text" else (image, text)
        aligned = scan_attention(query, context, query_side=self.query_side,
                                 lambda_softmax=self.lambda_softmax, raw_norm=self.raw_norm)
        # pre-assigned weights (Ni, Nt, Lq, Lc); context mask (Ni|1, Nt|1, Lc) -> (…, 1, Lc)
        weights = focal_reassign(aligned.weights, aligned.context_mask.unsqueeze(-2), self.focal_type)
        return attrs.evolve(aligned, weights=weights)


@attrs.frozen(kw_only=True)
class _Focal(Stage):
    """Shared spec of the two focal directions; subclasses set name, query side and docstring."""

    kind = "cross"
    paper = ("Liu et al. 2019 (BFAN, ACM MM), Sec. 3 focal attention: pre-assign, identify (equal / prob),"
             " re-assign; formulas as in the official model.py func_attention")
    query_side: ClassVar[str] = "text"

    lambda_softmax: float = param(
        20.0, "inverse temperature lambda of the pre-assigned softmax (BFAN: 20, both directions)", gt=0.0)
    focal_type: Literal["equal", "prob"] = param(
        "equal", "relevance test: 'equal' keeps weights above the row mean,"
        " 'prob' weighs each comparison by sqrt(alpha)", choices=FOCAL_TYPES)
    raw_norm: str = param(
        "clipped_l2norm", "normalisation of the raw affinities over the query axis (BFAN: clipped_l2norm)",
        choices=RAW_NORMS)

    def ports(self, image: LocalPort, text: LocalPort) -> AlignedPort:
        if image.dim != text.dim:
            raise PortError(f"image fragments have dim {image.dim} but text fragments {text.dim}:"
                            " focal attention needs one joint embedding size")
        return AlignedPort(image.dim)

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return FocalAttention(query_side=self.query_side, lambda_softmax=self.lambda_softmax,
                              focal_type=self.focal_type, raw_norm=self.raw_norm)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # float32 (Lq x Lc) arrays per pair at the peak of a no-grad forward of this stage with
        # core.cosine + core.mean after it: the raw dots (kept in Aligned for the cosine), the
        # normalised affinities, logits and softmax, then the focal scores, kept and re-assigned
        # weights, then weights * dots and weights @ Gram. Measured (peak RSS over 256 x 256
        # pairs of 20 words x 36 regions, both directions, both focal types): 5.2 arrays; 6 here.
        return 6 * 4 * text_len * image_len


@attrs.frozen(kw_only=True)
class TextToImage(_Focal):
    """BFAN text-to-image focal attention: each word attends only to the regions it finds relevant."""

    name = "bfan.t2i"
    query_side = "text"


@attrs.frozen(kw_only=True)
class ImageToText(_Focal):
    """BFAN image-to-text focal attention: each region attends only to the words it finds relevant."""

    name = "bfan.i2t"
    query_side = "image"
