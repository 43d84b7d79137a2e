"""SCAN (Lee et al., ECCV 2018): stacked cross attention between regions and words, and its pooling.

A SCAN branch in a recipe is three stages:

    cross      = scan.t2i | scan.i2t     each query fragment attends over the other side (Aligned)
    similarity = core.cosine             R = cos(query, attended context) per query fragment (PairSims)
    aggregate  = scan.lse | core.mean    one score per image x caption pair (Score)
                 (| core.max | scan.sum)

The attention itself is ``itmkit.attention.scan_attention``, shared with BFAN, PFAN, IMRAM and
SGRAF; the stages here only choose which side queries and with which temperature. Equation
numbers follow the ECCV paper's Sec. 3.1 as cited across itmkit (attention eq. 7-8, relevance
eq. 5 / 9, LSE pooling eq. 6 / 10); the formulas are spelled out in docs/plugins/scan.md.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import nn

from itmkit.attention import RAW_NORMS, pair_query_attention, scan_attention
from itmkit.ops import float32
from itmkit.stage import PortError, Stage, param
from itmkit.types import (Aligned, AlignedPort, Local, LocalPort, PairLocal, PairLocalPort, PairSims, PairSimsPort,
                          ScorePort)

# =========================================================================== cross attention


class StackedCrossAttention(nn.Module):
    """One side's fragments attend over the other's: softmax_c(lambda * norm(<q, c>)) for every pair.

    image (Ni, R, D) and text (Nt, L, D) -> Aligned with weights (Ni, Nt, Lq, Lc), queries the
    words (query_side "text", t-i) or the regions (query_side "image", i-t).
    """

    def __init__(self, *, query_side: str, lambda_softmax: float, raw_feature_norm: str = "clipped_l2norm"):
        super().__init__()
        self.query_side = query_side
        self.lambda_softmax = lambda_softmax
        self.raw_feature_norm = raw_feature_norm

    def forward(self, image: Local, text: Local, x: PairLocal | None = None) -> Aligned:
        query, context = (text, image) if self.query_side == "text" else (image, text)
        if x is None:
            return scan_attention(query, context, query_side=self.query_side, lambda_softmax=self.lambda_softmax,
                                  raw_norm=self.raw_feature_norm)
        # The queries were rebuilt for every pair (a [[match]] pair stage): the same attention, per pair.
        weights = pair_query_attention(x.feats, x.mask, context, query_side=self.query_side,
                                       lambda_softmax=self.lambda_softmax, raw_norm=self.raw_feature_norm)
        context_feats, context_mask = ((context.feats[:, None], context.mask[:, None]) if self.query_side == "text"
                                       else (context.feats[None], context.mask[None]))
        return Aligned(query=x.feats, weights=weights, context=context_feats,
                       query_mask=x.mask.expand(weights.shape[:-1]), query_side=self.query_side,
                       context_mask=context_mask)


def _cross_ports(image: LocalPort, text: LocalPort, x: PairLocalPort | None, query_side: str, name: str) -> AlignedPort:
    if x is None:
        if image.dim != text.dim:
            raise PortError(f"SCAN attention compares regions and words by dot product, so both sides need the"
                            f" same dim: image fragments are {image.dim}-d, text fragments {text.dim}-d"
                            " (set one [recipe].embed_dim, or the same embed_dim on both encoders)")
        return AlignedPort(image.dim)
    if x.side != query_side:
        other = "scan.i2t" if x.side == "image" else "scan.t2i"
        raise PortError(f"{name} attends from the {query_side} fragments, but the pair stage before it rebuilds"
                        f" the {x.side} side's: use {other}, whose queries are the {x.side} fragments")
    context = text if query_side == "image" else image  # the tower's fragments the rebuilt queries attend over
    if x.dim != context.dim:
        context_side = "text" if query_side == "image" else "image"
        raise PortError(f"the pair stage's {x.side} fragments are {x.dim}-d, the {context_side} fragments they"
                        f" attend over {context.dim}-d: SCAN attention needs one dim")
    return AlignedPort(x.dim)


def _cross_pair_bytes(text_len: int, image_len: int) -> int:
    # float32 (queries x context) arrays per pair alive at the peak of a scoring block (no
    # autograd, so the attention works in place): the raw dots kept in Aligned, the logits that
    # become the weights, and in core.cosine weights * dots, then weights @ Gram.
    return 4 * 4 * text_len * image_len


@attrs.frozen(kw_only=True)
class _Cross(Stage):
    """What the two SCAN directions share: ports, module and memory; subclasses set the fields."""

    kind = "cross"
    query_side: ClassVar[str] = "text"

    def ports(self, image: LocalPort, text: LocalPort, x: PairLocalPort | None = None) -> AlignedPort:
        """``x``: the query side's fragments rebuilt per pair by a [[match]] pair stage (DP-RNN, DIME), if any."""
        return _cross_ports(image, text, x, self.query_side, self.name)

    def build(self, image: LocalPort, text: LocalPort, x: PairLocalPort | None = None) -> nn.Module:
        return StackedCrossAttention(query_side=self.query_side, lambda_softmax=self.lambda_softmax,
                                     raw_feature_norm=self.raw_feature_norm)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        return _cross_pair_bytes(text_len, image_len)


@attrs.frozen(kw_only=True)
class TextToImage(_Cross):
    """SCAN text-to-image attention (Lee et al. 2018, eq. 7-8): each word attends over the image regions."""

    name = "scan.t2i"
    paper = "Lee et al. 2018 (SCAN), Sec. 3.1 Text-Image Stacked Cross Attention, eq. 7-8"
    query_side: ClassVar[str] = "text"

    lambda_softmax: float = param(9.0, "inverse softmax temperature lambda_1 of the attention (SCAN t-i: 9)", gt=0.0)
    raw_feature_norm: str = param("clipped_l2norm", "normalisation of the raw word-region affinities over the"
                                  " query axis before the softmax (SCAN: clipped_l2norm)", choices=RAW_NORMS)


@attrs.frozen(kw_only=True)
class ImageToText(_Cross):
    """SCAN image-to-text attention (Lee et al. 2018, eq. 2-4): each region attends over the caption's words."""

    name = "scan.i2t"
    paper = "Lee et al. 2018 (SCAN), Sec. 3.1 Image-Text Stacked Cross Attention, eq. 2-4"
    query_side: ClassVar[str] = "image"

    lambda_softmax: float = param(4.0, "inverse softmax temperature lambda_1 of the attention (SCAN i-t: 4)", gt=0.0)
    raw_feature_norm: str = param("clipped_l2norm", "normalisation of the raw region-word affinities over the"
                                  " query axis before the softmax (SCAN: clipped_l2norm)", choices=RAW_NORMS)


# ============================================================================== aggregation


class LogSumExpPool(nn.Module):
    """S = (1/lambda) log sum_n exp(lambda R_n) over the valid query fragments: (Ni, Nt, N, 1) -> (Ni, Nt)."""

    def __init__(self, *, lambda_lse: float):
        super().__init__()
        self.lambda_lse = lambda_lse

    def forward(self, x: PairSims) -> torch.Tensor:
        relevance = torch.where(x.mask, float32(x.sims.squeeze(-1)), 0.0)  # padding replaced before exp: no inf, no NaN grad
        # The official form, exp -> sum -> log with no max subtracted. It equals the stable
        # logsumexp up to rounding, and the published numbers come from this form. R is a cosine
        # in [-1, 1], so exp(lambda R) <= exp(lambda) cannot overflow float32 for lambda < 88.
        terms = torch.where(x.mask, torch.exp(self.lambda_lse * relevance), 0.0)
        total = terms.sum(dim=-1)  # (Ni, Nt)
        valid = x.mask.any(dim=-1)
        # A row with no valid fragment (never a real caption or image) scores 0, like core.mean.
        return torch.where(valid, torch.log(total.clamp(min=torch.finfo(total.dtype).tiny)) / self.lambda_lse, 0.0)


class SumPool(nn.Module):
    """S = sum_n R_n over the valid query fragments: (Ni, Nt, N, 1) -> (Ni, Nt)."""

    def forward(self, x: PairSims) -> torch.Tensor:
        return torch.where(x.mask, x.sims.squeeze(-1), 0.0).sum(dim=-1)


def _scalar_sims(x: PairSimsPort, stage: str) -> ScorePort:
    if x.dim != 1:
        raise PortError(f"{stage} pools scalar per-fragment similarities (dim 1), got vectors of size {x.dim};"
                        " put core.cosine before it, or use an aggregator that reads vectors (e.g. sgraf.sgr)")
    return ScorePort()


@attrs.frozen(kw_only=True)
class LogSumExp(Stage):
    """SCAN LogSumExp pooling (Lee et al. 2018, eq. 6 / 10): a soft maximum of the per-fragment relevances."""

    name = "scan.lse"
    kind = "aggregator"
    paper = "Lee et al. 2018 (SCAN), Sec. 3.1 LogSumExp pooling, eq. 6 (i-t) and eq. 10 (t-i)"

    lambda_lse: float = param(6.0, "lambda_2: how strongly the most relevant fragments dominate"
                              " (SCAN: t-i 6; i-t 5 on Flickr30K, 20 on COCO)", gt=0.0, le=80.0)

    def ports(self, x: PairSimsPort) -> ScorePort:
        return _scalar_sims(x, self.name)

    def build(self, x: PairSimsPort) -> nn.Module:
        return LogSumExpPool(lambda_lse=self.lambda_lse)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        return 3 * 4 * max(text_len, image_len)  # relevance, exp terms, mask per query fragment


@attrs.frozen(kw_only=True)
class Sum(Stage):
    """SCAN's Sum pooling (agg_func=Sum): the per-fragment relevances added up over the valid fragments."""

    name = "scan.sum"
    kind = "aggregator"
    paper = "Lee et al. 2018 (SCAN), official code agg_func=Sum (a variant of AVG pooling, Sec. 3.1)"

    def ports(self, x: PairSimsPort) -> ScorePort:
        return _scalar_sims(x, self.name)

    def build(self, x: PairSimsPort) -> nn.Module:
        return SumPool()

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        return 2 * 4 * max(text_len, image_len)
