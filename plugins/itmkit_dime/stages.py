"""DIME (Qu, Liu, Wu, Gao, Nie, SIGIR 2021): Dynamic Modality Interaction Modeling for Image-Text Retrieval.

A DIME model in a recipe (recipes/dime_*.toml):

    image  regions f_r -> core.precomp (normalize = false)  fc(f_r)                         (Local)
                       -> dime.image_pool   img = l2norm([BN](mean_r fc(f_r)))  BN for t-i only (Global)
    text   caption     -> dime.bert         frozen BERT over [CLS] .. [SEP] [PAD].. (32 positions),
                                            the real token count kept in extras   (Local, hidden)
    [[match]] similarity = dime.interaction
        rgn = l2norm(fc(f_r)); words, sentence = the 1/2/3-gram CNN head over the BERT states
        3 routing layers x 4 cells (RIC, GLGC, IMRC, CMRC) refine the regions per caption (i-t)
        or the words per image (t-i); s = <l2norm(mean + max of BN(refined)), other side's global>
        training: + path_weight x the path regularisation (a BlockContext term "path")
    loss   core.triplet (margin 0.2, hardest negative)

The text head lives in the interaction stage, not in the text tower, because the official words and
sentence share one ``mapping`` Linear over the n-gram features: the words are the fragments the
interaction reads, the sentence the global vector (i-t), and a tower pool sees only fragments.
Likewise the image fragments arrive unnormalised so that the pool can average fc(f) before the
l2norm, as VisNet.EncoderImagePrecomp does; the interaction normalises them itself.

``dime.refine`` is the same computation up to the refined fragments, as a [[match]] ``pair`` stage
(PairLocal), for recipes that score them with other papers' heads.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from itmkit import explain
from itmkit.errors import ItmkitError
from itmkit.ops import float32, masked_mean
from itmkit.stage import PortError, Stage, param
from itmkit.types import BlockContext, GlobalPort, Local, LocalPort, PairLocal, PairLocalPort, ScorePort, Tokens
from itmkit_bert.stages import TINY
from itmkit_dime.modules import (RAW_NORMS, TOTAL_PATHS, Block, DynamicInteraction, ScoreHead, TextHead,
                                 path_loss, unless_all)
from itmkit_saem.stages import FixedLengthBert, SaemBert

PAPER = "Qu et al. 2021 (DIME, SIGIR)"
FLOAT = 4  # bytes of a float32

# ============================================================================== text encoder


class BertWithLengths(FixedLengthBert):
    """saem.bert's fixed-length frozen BERT, with each caption's real WordPiece count in extras['token_lengths'].

    Every one of the ``max_words`` positions is a valid fragment (DIME's text net reads the [PAD]
    states too); i-t's cross-modal refinement attends over the caption's own tokens only
    (Refinement.forward_i2t: ``wrd[i, :n_word]``), which is what the count is for.
    """

    def forward(self, x: Tokens) -> Local:
        out = super().forward(x)
        kept = x.lengths.to(out.feats.device).clamp(max=out.feats.shape[1])
        return Local(out.feats, out.mask, {"token_lengths": kept})


@attrs.frozen(kw_only=True)
class DimeBert(SaemBert):
    """Frozen BERT over captions padded to 32 WordPieces, all positions valid, the token count kept (DIME)."""

    name = "dime.bert"
    kind = "encoder"
    paper = (f"{PAPER}, text representation; official TextNet.EncoderText (frozen BERT, max_words = 32,"
             " data.convert_to_feature); the saem.bert encoder plus the caption lengths")
    example: ClassVar[dict] = {"path": str(TINY), "pretrained": False}
    module: ClassVar[type[BertWithLengths]] = BertWithLengths


# ================================================================================ image pool


class ImagePool(nn.Module):
    """img = l2norm([BN](mean of the valid fc(f_r))): Local (B, R, D) -> (B, D)."""

    def __init__(self, *, dim: int, batchnorm: bool):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim) if batchnorm else None

    def forward(self, x: Local) -> torch.Tensor:
        mean = masked_mean(x.feats, x.mask, dim=1)
        if self.bn is not None:
            mean = self.bn(mean)
        return F.normalize(float32(mean), dim=-1)  # the norm in float32 under mixed precision


@attrs.frozen(kw_only=True)
class DimeImagePool(Stage):
    """DIME image vector: l2norm of the mean projected region, batch-normalised first in direction t-i."""

    name = "dime.image_pool"
    kind = "aggregator"
    paper = (f"{PAPER}, image representation; official VisNet.EncoderImagePrecomp: img_emb = mean_r fc(f_r),"
             " BatchNorm1d if direction == 't2i', then l2norm")

    batchnorm: bool = param(False, "BatchNorm1d on the mean before the l2norm (official: only in direction t2i;"
                                   " the recipes set it per direction)")

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return ImagePool(dim=x.dim, batchnorm=self.batchnorm)


# ============================================================================= interaction


class DimeRefiner(nn.Module):
    """Text head + the 3-layer routing space: the refined fragments of every pair of a block.

    image: Local (Ni, R, D) of fc(f_r) (l2-normalised here when ``normalize_image``); text: Local
    (Nt, W, Hd) of BERT states; image_global (Ni, D) (t-i only). ``refine`` returns the refined
    query fragments in context-major layout (Nc, Nq, N, D), their mask, the other side's global
    vectors, and the block's path term when a training context asks for it.
    """

    def __init__(self, *, direction: str, dim: int, hidden: int, widths: tuple[int, ...], lambda_softmax: float,
                 raw_feature_norm: str, heads: int, hid_imrc: int, hid_router: int, path_hid: int,
                 path_weight: float, normalize_image: bool):
        super().__init__()
        self.direction = direction
        self.normalize_image = normalize_image
        self.path_weight = path_weight
        self.text_head = TextHead(hidden=hidden, dim=dim, widths=widths)
        self.interaction = DynamicInteraction(dim=dim, hid_router=hid_router, heads=heads, hid_imrc=hid_imrc,
                                              raw_feature_norm=raw_feature_norm, lambda_softmax=lambda_softmax)
        # trained only through the training term, so absent when its weight is 0
        self.path_mapping = nn.Linear(TOTAL_PATHS, path_hid) if path_weight > 0 else None

    def refine(self, image: Local, text: Local, image_global: torch.Tensor | None,
               context: BlockContext | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(refined (Nc, Nq, N, D), the query fragments' mask (Nq, N), the other side's global vectors (Nc, D))."""
        regions = F.normalize(float32(image.feats), dim=-1) if self.normalize_image else image.feats
        words, sentence = self.text_head(text.feats, text.mask)
        if self.direction == "i2t":
            word_mask = text.mask
            lengths = text.extras.get("token_lengths")
            if lengths is not None:  # official i-t attends over wrd[i, :n_word] only
                word_mask = word_mask & (torch.arange(word_mask.shape[1], device=lengths.device)[None]
                                         < lengths[:, None])
            query, query_mask, block = regions, image.mask, Block(words, unless_all(word_mask), sentence)
        else:
            if image_global is None:
                raise ItmkitError("dime: direction t2i needs the image tower's pooled vectors (image_global)")
            query, query_mask, block = words, text.mask, Block(regions, unless_all(image.mask), image_global)
        if explain.active() is not None:
            block.attention = []
        want_paths = context is not None and self.path_mapping is not None
        refined, paths = self.interaction(query, unless_all(query_mask), block, want_paths=want_paths)
        if block.attention is not None:
            self._note_attention(block.attention, text.extras.get("token_lengths"))
        if want_paths:
            context.add_term("path", self.path_weight * self._path_term(paths, text))
        return refined, query_mask, block.other_global

    def _note_attention(self, weights: list[torch.Tensor], lengths: torch.Tensor | None) -> None:
        """Report each routing layer's CMRC attention to ``itmkit explain`` (only while it records).

        i-t: each region's softmax over the caption's words (query side "image"); t-i: each word
        position's over the regions ("text"). dime.bert's 32 positions are cut to the caption's own
        tokens ([CLS] .. [SEP]), the [PAD] positions being no token of it.
        """
        side = "image" if self.direction == "i2t" else "text"
        for layer, w in enumerate(weights, start=1):
            w = self.pair_major(w)  # (Ni, Nt, N, L): i-t (regions, words), t-i (words, regions)
            if lengths is not None:
                tokens = int(lengths[0])  # caption 0's token count: only pair [0, 0] is kept
                w = w[..., :tokens] if side == "image" else w[..., :tokens, :]
            explain.note_attention(w, side, f"CMRC layer {layer}")

    def _path_term(self, paths: torch.Tensor, text: Local) -> torch.Tensor:
        # the label: l2norm of each caption's mean BERT state over all its positions (TextNet, training only)
        label = F.normalize(float32(masked_mean(text.feats.detach(), text.mask, dim=1)), dim=-1)
        nc, nq = paths.shape[:2]
        if self.direction == "i2t":
            if nq > nc:
                raise ItmkitError(f"dime i2t: the path regularisation pairs each of the {nq} image rows with the"
                                  f" caption in its column, but the block has only {nc} captions (extra images"
                                  " are a t2i setting: use [train] extra_captions with direction i2t)")
            label = label[:nq]  # model.train_emb: bert_emb[:n_img], the captions of the pairs
        return path_loss(paths, self.path_mapping, label, pairs=min(nq, nc))

    def pair_major(self, t: torch.Tensor) -> torch.Tensor:
        """A context-major (Nc, Nq, ...) tensor as (Ni, Nt, ...)."""
        return t.transpose(0, 1) if self.direction == "i2t" else t


class DimeScore(DimeRefiner):
    """DIME's matching score for every image x caption pair of a block (InteractionModule.forward)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = ScoreHead(kwargs["dim"])

    def forward(self, *, image: Local, text: Local, image_global: torch.Tensor | None = None,
                context: BlockContext | None = None) -> torch.Tensor:
        refined, mask, other = self.refine(image, text, image_global, context)
        mask = unless_all(mask)
        return self.pair_major(self.head(refined, None if mask is None else mask[None], other))


class DimeRefine(DimeRefiner):
    """The refined fragments of every pair (regions for i-t, words for t-i) as PairLocal."""

    def forward(self, *, image: Local, text: Local, image_global: torch.Tensor | None = None,
                context: BlockContext | None = None) -> PairLocal:
        refined, mask, _ = self.refine(image, text, image_global, context)
        mask = mask[None]  # (1, Nq, N)
        refined = refined.masked_fill(~mask.unsqueeze(-1), 0.0)
        side = "image" if self.direction == "i2t" else "text"
        return PairLocal(self.pair_major(refined), self.pair_major(mask), side)


@attrs.frozen(kw_only=True)
class _DimeSpec(Stage):
    """Parameters and ports shared by dime.interaction and dime.refine."""

    # The conformance kit calls forward without a BlockContext, so the path mapping (trained only
    # through the context's term) would get no gradient there: the kit builds these stages without it.
    example: ClassVar[dict] = {"path_weight": 0.0}

    direction: str = param("i2t", "which side is refined per pair: i2t refines the regions per caption (DIME i-t),"
                                  " t2i the words per image (DIME t-i)", choices=("i2t", "t2i"))
    embed_dim: int | None = param(None, "joint embedding size D; the image fragments must have it (default:"
                                        " [recipe].embed_dim; DIME: 256)", ge=1)
    lambda_softmax: float = param(4.0, "CMRC attention temperature lambda (official README: 4 for i-t, 9 for t-i)",
                                  gt=0.0)
    raw_feature_norm: str = param("clipped_l2norm", "CMRC's normalisation of the raw attention over the query"
                                                    " fragments (official default clipped_l2norm)", choices=RAW_NORMS)
    heads: int = param(16, "IMRC self-attention heads (num_head_IMRC); must divide D", ge=1)
    hid_imrc: int = param(512, "IMRC feed-forward hidden size (hid_IMRC)", ge=1)
    hid_router: int = param(512, "hidden size of every router's MLP (hid_router)", ge=1)
    path_hid: int = param(128, "output size of the path mapping Linear(36 -> path_hid) of the path loss", ge=1)
    path_weight: float = param(0.5, "weight of the path regularisation in training (trade_off); 0: no path loss"
                                    " and no path mapping", ge=0.0)
    widths: list[int] = param(attrs.Factory(lambda: [1, 2, 3]), "n-gram sizes of the text CNN (official 1, 2, 3;"
                                                                " K = 2 pads one row after, K = 3 one on each side)")
    normalize_image: bool = param(True, "l2-normalise the image fragments before the interaction (official rgn ="
                                        " l2norm(fc(f)); the tower gives fc(f) so its pool averages before the norm)")

    @property
    def width(self) -> int:
        return self.embed_dim or 1024

    def _check(self, image: LocalPort, text: LocalPort, image_global: GlobalPort | None) -> None:
        d = self.width
        if image.dim != d:
            raise PortError(f"{self.name}: the image fragments have width {image.dim}, the joint space D = {d}: size"
                            f" the image encoder to {d} or set embed_dim = {image.dim}")
        if d % self.heads:
            raise PortError(f"{self.name}: heads = {self.heads} does not divide D = {d}")
        if not self.widths or min(self.widths) < 1 or max(self.widths) > 16:
            raise PortError(f"{self.name}: widths must be n-gram sizes between 1 and 16, got {self.widths}")
        if self.direction == "t2i":
            if image_global is None:
                raise PortError(f"{self.name}: direction t2i reads the image tower's pooled vectors: add pool ="
                                " { stage = \"dime.image_pool\", batchnorm = true } to [image]")
            if image_global.dim != d:
                raise PortError(f"{self.name}: the image pool gives {image_global.dim}-d vectors, D = {d}")

    def _module_kwargs(self, text: LocalPort) -> dict:
        return dict(direction=self.direction, dim=self.width, hidden=text.dim, widths=tuple(self.widths),
                    lambda_softmax=self.lambda_softmax, raw_feature_norm=self.raw_feature_norm, heads=self.heads,
                    hid_imrc=self.hid_imrc, hid_router=self.hid_router, path_hid=self.path_hid,
                    path_weight=self.path_weight, normalize_image=self.normalize_image)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # float32 numbers per pair at the peak of a no-grad forward (layer 1 or 2 of the routing):
        # the two pair-dependent layer-0 outputs or the mixed input, the four cell outputs of a layer,
        # a cell's working copies (about 6 N D, CMRC's 2D modulation included), IMRC's FFN row and one
        # (h, N, N) array (the fused attention needs none unless fragments are masked), CMRC's three
        # (N, L) attention arrays. Measured as peak RSS growth over one block (32 x 64 pairs, D = 256,
        # 16 heads, 512 hidden, both directions; 64 x 64, D = 32; 32 x 128, D = 64): 0.8 to 0.88 of this.
        n, other = (image_len, text_len) if self.direction == "i2t" else (text_len, image_len)
        d = self.width
        floats = 14 * n * d + self.heads * n * n + n * self.hid_imrc + 3 * n * other
        return FLOAT * floats


@attrs.frozen(kw_only=True)
class DimeInteraction(_DimeSpec):
    """DIME's dynamic modality interaction and score: 3 routing layers of 4 cells, BN + mean/max head, path loss."""

    name = "dime.interaction"
    kind = "similarity"
    paper = (f"{PAPER}, Sec. 3 (cells, routers, dense routing space, path regularisation, eq. 1-12); official"
             " InteractionModule / DynamicInteraction / Cells / Router / Refinement / SelfAttention / TextNet,"
             " calSim_i2t / calSim_t2i, model.train_emb")

    def ports(self, image: LocalPort, text: LocalPort, image_global: GlobalPort | None = None) -> ScorePort:
        self._check(image, text, image_global)
        return ScorePort()

    def build(self, image: LocalPort, text: LocalPort, image_global: GlobalPort | None = None) -> nn.Module:
        return DimeScore(**self._module_kwargs(text))


@attrs.frozen(kw_only=True)
class DimeRefineStage(_DimeSpec):
    """DIME's refined fragments per pair (regions for i-t, words for t-i) after the 3 routing layers, as PairLocal."""

    name = "dime.refine"
    kind = "pair"
    paper = (f"{PAPER}, Sec. 3.2-3.4: the routing space's output fragments before the score head (official"
             " InteractionModule.forward up to dynamic_itr_l2); the path term as in dime.interaction")

    def ports(self, image: LocalPort, text: LocalPort, image_global: GlobalPort | None = None) -> PairLocalPort:
        self._check(image, text, image_global)
        return PairLocalPort(self.width, "image" if self.direction == "i2t" else "text")

    def build(self, image: LocalPort, text: LocalPort, image_global: GlobalPort | None = None) -> nn.Module:
        return DimeRefine(**self._module_kwargs(text))
