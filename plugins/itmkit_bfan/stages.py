"""BFAN's focal attention (Liu et al., ACM MM 2019), vectorised over a block of Ni images x Nt captions.

Focal attention (pre-assign, identify, re-assign) is ``itmkit.focal``, shared with IMRAM's memory.

BFAN's score runs focal attention both ways with one lambda and adds the two directions:
S = mean_t cos(e_t, a_t) [words attend to regions] + mean_i cos(v_i, a_i) [regions attend to
words]. Here each direction is a cross stage producing ``Aligned`` (the re-assigned weights),
so ``core.cosine`` + ``core.mean`` finish it without materialising the attended vectors, and
a recipe with two [[match]] branches (bfan.t2i, bfan.i2t; weight 1 each) sums to S exactly.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs
from torch import nn

from itmkit.attention import RAW_NORMS, scan_attention
from itmkit.focal import FOCAL_TYPES, focal_keep, focal_reassign, focal_scores

__all__ = ["FOCAL_TYPES", "focal_keep", "focal_reassign", "focal_scores", "TextToImage", "ImageToText"]
from itmkit.stage import PortError, Stage, param
from itmkit.types import Aligned, AlignedPort, Local, LocalPort


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
