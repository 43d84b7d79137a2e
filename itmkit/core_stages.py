"""The built-in stages (``core.*``), registered through the same hook as any plugin.

Enough for the VSE++ baseline (Faghri et al., BMVC 2018) on precomputed region features, and
the shared pieces (aggregators, cosine head, losses) that the paper plugins combine.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.attention import to_context_major
from itmkit.hookspecs import hookimpl
from itmkit.ops import EPS, float32, gram, l2norm, masked_last, masked_max, masked_mean, xavier_linear_
from itmkit.stage import PortError, Stage, param
from itmkit.types import (
    Aligned,
    AlignedPort,
    GlobalPort,
    Local,
    LocalPort,
    LossPort,
    PairSims,
    PairSimsPort,
    Regions,
    RegionsPort,
    ScorePort,
    Tokens,
    TokensPort,
)

# =============================================================================== encoders


class PrecompEncoder(nn.Module):
    """v_i = l2norm(W f_i + b) for each precomputed region feature f_i (|v_i| with ``absolute``)."""

    def __init__(self, *, in_dim: int, embed_dim: int, normalize: bool = True, absolute: bool = False):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.normalize = normalize
        self.absolute = absolute
        xavier_linear_(self.fc)

    def forward(self, x: Regions) -> Local:
        feats = self.fc(x.feats)  # (B, R, D)
        if self.normalize:
            feats = l2norm(feats)
        if self.absolute:  # after the norm, as VSE++ does: the vector stays unit length
            feats = feats.abs()
        extras = {"boxes": x.boxes} if x.boxes is not None else {}
        return Local(feats, x.mask, extras)


@attrs.frozen(kw_only=True)
class Precomp(Stage):
    """SCAN eq. (1) / VSE++ precomp encoder: a linear projection of each region, l2-normalised."""

    name = "core.precomp"
    kind = "encoder"
    paper = "Lee et al. 2018 (SCAN), Sec. 3.4 eq. 1; Faghri et al. 2018 (VSE++)"

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim)", ge=1)
    normalize: bool = param(True, "l2-normalise each region vector (SCAN's default; no_imgnorm=False)")
    absolute: bool = param(False, "take the absolute value of each vector after normalising (VSE++ --use_abs,"
                                  " for order embeddings)")

    def ports(self, x: RegionsPort) -> LocalPort:
        return LocalPort(self.embed_dim or 1024)

    def build(self, x: RegionsPort) -> nn.Module:
        return PrecompEncoder(in_dim=x.dim, embed_dim=self.embed_dim or 1024, normalize=self.normalize,
                              absolute=self.absolute)


class RawRegions(nn.Module):
    """The precomputed region features as they are (optionally l2-normalised): no learned projection."""

    def __init__(self, *, normalize: bool = False):
        super().__init__()
        self.normalize = normalize

    def forward(self, x: Regions) -> Local:
        feats = l2norm(x.feats) if self.normalize else x.feats
        extras = {"boxes": x.boxes} if x.boxes is not None else {}
        return Local(feats, x.mask, extras)


@attrs.frozen(kw_only=True)
class Raw(Stage):
    """The raw region features as the image fragments, width F: MTFN fuses their plain mean
    (Wang et al. 2019, Sec. 3.1) and RAMEN concatenates each raw region with the question
    (Shrestha et al. 2019, Sec. 3.1), neither through a projection of its own."""

    name = "core.raw"
    kind = "encoder"
    paper = "Wang et al. 2019 (MTFN), Sec. 3.1; Shrestha et al. 2019 (RAMEN), Sec. 3.1"

    normalize: bool = param(False, "l2-normalise each region vector (RAMEN does so only with spatial codes)")

    def ports(self, x: RegionsPort) -> LocalPort:
        return LocalPort(x.dim)

    def build(self, x: RegionsPort) -> nn.Module:
        return RawRegions(normalize=self.normalize)


class GRUTextEncoder(nn.Module):
    """Word embedding -> (bi)GRU; the two directions averaged; each word vector l2-normalised."""

    def __init__(
        self,
        *,
        vocab_size: int,
        word_dim: int,
        embed_dim: int,
        num_layers: int = 1,
        bidirectional: bool = True,
        normalize: bool = True,
        embed_dropout: float = 0.0,
        absolute: bool = False,
    ):
        super().__init__()
        self.absolute = absolute
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(embed_dropout)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=bidirectional)
        self.bidirectional = bidirectional
        self.normalize = normalize
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # SCAN's init of the word embedding

    def forward(self, x: Tokens) -> Local:
        words = self.dropout(self.embed(x.ids))
        lengths = x.lengths.clamp(min=1).cpu()
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        feats, _ = pad_packed_sequence(out, batch_first=True, total_length=x.ids.shape[1])
        if self.bidirectional:
            forward, backward = feats.chunk(2, dim=-1)  # one autograd node: slicing each half
            feats = (forward + backward) / 2  # would back-propagate two zero-filled copies of both
        if self.normalize:
            feats = l2norm(feats)
        if self.absolute:  # VSE++ --use_abs: after the norm
            feats = feats.abs()
        return Local(feats, x.mask)


@attrs.frozen(kw_only=True)
class BiGRU(Stage):
    """SCAN Sec. 3.4 text encoder: embedding -> bi-GRU, directions averaged (eq. 2), l2-normalised."""

    name = "core.bigru"
    kind = "encoder"
    paper = "Lee et al. 2018 (SCAN), Sec. 3.4 eq. 2"

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim)", ge=1)
    word_dim: int = param(300, "word embedding size", ge=1)
    num_layers: int = param(1, "stacked GRU layers", ge=1)
    bidirectional: bool = param(True, "run a bi-GRU and average the two directions (SCAN --bi_gru)")
    normalize: bool = param(True, "l2-normalise each word vector (SCAN's default; no_txtnorm=False)")
    embed_dropout: float = param(0.0, "dropout on the word embeddings (SGRAF uses 0.4)", ge=0.0, le=1.0)
    absolute: bool = param(False, "take the absolute value of each word vector after normalising (VSE++ --use_abs,"
                                  " for order embeddings)")

    def ports(self, x: TokensPort) -> LocalPort:
        return LocalPort(self.embed_dim or 1024)

    def build(self, x: TokensPort) -> nn.Module:
        return GRUTextEncoder(
            vocab_size=x.dim,
            word_dim=self.word_dim,
            embed_dim=self.embed_dim or 1024,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            normalize=self.normalize,
            embed_dropout=self.embed_dropout,
            absolute=self.absolute,
        )


# =========================================================================== aggregators


class Pool(nn.Module):
    """Pools over the fragment axis: Local (B, N, D) -> (B, D), or PairSims (Ni, Nt, N, S) -> Score."""

    def __init__(self, *, how: str, normalize: bool = False):
        super().__init__()
        self.reduce = {"mean": masked_mean, "max": masked_max, "last": masked_last}[how]
        self.normalize = normalize

    def forward(self, x: Local | PairSims) -> torch.Tensor:
        if isinstance(x, Local):
            pooled = self.reduce(x.feats, x.mask, dim=1)  # (B, D)
            return l2norm(pooled) if self.normalize else pooled
        pooled = self.reduce(x.sims, x.mask, dim=2)  # (Ni, Nt, S)
        return pooled.squeeze(-1)


def _pool_ports(x: LocalPort | PairSimsPort, stage: str) -> GlobalPort | ScorePort:
    if isinstance(x, LocalPort):
        return GlobalPort(x.dim)
    if x.dim != 1:
        raise PortError(
            f"{stage} pools per-fragment similarities of size {x.dim} into one score only when"
            " they are scalars (dim 1); use an aggregator that reads vectors (e.g. sgraf.sgr)"
        )
    return ScorePort()


@attrs.frozen(kw_only=True)
class _Pooling(Stage):
    """Shared spec of the masked pools; subclasses set ``how``, name, paper and docstring."""

    kind = "aggregator"
    how: ClassVar[str] = "mean"

    normalize: bool = param(False, "l2-normalise the pooled global vector")

    def ports(self, x: LocalPort | PairSimsPort) -> GlobalPort | ScorePort:
        return _pool_ports(x, self.name)

    def build(self, x: LocalPort | PairSimsPort) -> nn.Module:
        return Pool(how=self.how, normalize=self.normalize)


@attrs.frozen(kw_only=True)
class Mean(_Pooling):
    """Average over the valid fragments: region/word vectors -> global vector, or pair sims -> score (SCAN AVG)."""

    name = "core.mean"
    paper = "Lee et al. 2018 (SCAN), Sec. 3.1 (AVG pooling)"
    how = "mean"


@attrs.frozen(kw_only=True)
class Max(_Pooling):
    """Element-wise max over the valid fragments (max pooling of VSE-style set encoders)."""

    name = "core.max"
    paper = "Faghri et al. 2018 (VSE++) / Chen et al. 2021 (GPO) max-pool baseline"
    how = "max"


@attrs.frozen(kw_only=True)
class Last(_Pooling):
    """The last valid fragment: a uni-GRU's final state as the caption vector (VSE++ eq. 1)."""

    name = "core.last"
    paper = "Faghri et al. 2018 (VSE++), Sec. 3 (GRU final hidden state)"
    how = "last"


# ======================================================================= similarity heads


class CosineHead(nn.Module):
    """Cosine of global vectors (Ni, D) x (Nt, D) -> (Ni, Nt), or of queries and their attended context."""

    def __init__(self, *, eps: float = EPS):
        super().__init__()
        self.eps = eps

    def forward(
        self,
        x: Aligned | None = None,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
    ) -> torch.Tensor | PairSims:
        if x is None:
            return l2norm(image, eps=self.eps) @ l2norm(text, eps=self.eps).T
        return PairSims(self.aligned_cosine(x).unsqueeze(-1), x.query_mask.expand(x.weights.shape[:-1]))

    def aligned_cosine(self, x: Aligned) -> torch.Tensor:
        """cos(q, sum_c w_qc c) without materialising the attended vectors.

        numerator = sum_c w_qc <q, c>;  ||attended||^2 = w G w^T with G the context Gram matrix.
        """
        fast = context_major_cosine(x, self.eps)
        if fast is not None:
            return fast
        dots = x.dots if x.dots is not None else x.query @ x.context.transpose(-1, -2)  # (Ni, Nt, Lq, Lc)
        numerator = (x.weights * dots).sum(-1)
        grams = gram(x.context)  # (Ni, 1, Lc, Lc) or (1, Nt, Lc, Lc): per item
        # w G w^T per query; einsum folds the pair axes into one batched product per context item
        ni, nt = x.weights.shape[:2]
        if grams.shape[0] == ni and grams.shape[1] == 1:  # context = images
            wg = torch.einsum("itqc,icd->itqd", x.weights, grams[:, 0])
        elif grams.shape[0] == 1 and grams.shape[1] == nt:  # context = captions
            wg = torch.einsum("itqc,tcd->itqd", x.weights, grams[0])
        else:
            wg = x.weights @ grams
        # floored at the smallest normal float, not 0: sqrt'(0) is infinite, and an attended vector of
        # exactly 0 (a context item whose one valid fragment is 0) would make every gradient NaN
        attended_sq = (wg * x.weights).sum(-1).clamp(min=torch.finfo(wg.dtype).tiny)
        norms = x.query.norm(dim=-1) * attended_sq.sqrt()
        return numerator / norms.clamp(min=self.eps)


def context_major_cosine(x: Aligned, eps: float) -> torch.Tensor | None:
    """``aligned_cosine`` on context-major weights and dots (as ``scan_attention`` lays them out).

    Each context item's weights are then a (Lc, Nq * Lq) matrix, so w G w^T is one batched
    product with its (Lc, Lc) Gram matrix and the sums run over rows. None if the layout differs.
    """
    if x.dots is None:
        return None
    w, d = to_context_major(x.weights, x.query_side), to_context_major(x.dots, x.query_side)
    text_queries = x.query_side == "text"
    context = x.context.squeeze(1) if text_queries else x.context.squeeze(0)  # (Nc, Lc, D)
    query = x.query.squeeze(0) if text_queries else x.query.squeeze(1)  # (Nq, Lq, D)
    nc, lc, nq, lq = w.shape
    if not (w.is_contiguous() and d.is_contiguous() and context.shape[:2] == (nc, lc) and query.shape[:2] == (nq, lq)):
        return None
    w, d = w.view(nc, lc, nq * lq), d.view(nc, lc, nq * lq)
    numerator = (w * d).sum(dim=1)
    wg = float32(torch.bmm(gram(context), w))  # (Nc, Lc, Nq * Lq); in place below, so float32 first
    wg = wg.mul_(w) if not torch.is_grad_enabled() else wg * w
    attended_sq = wg.sum(dim=1).clamp(min=torch.finfo(wg.dtype).tiny)  # as in aligned_cosine: finite gradients
    norms = query.norm(dim=-1).reshape(1, nq * lq) * attended_sq.sqrt()
    cos = (numerator / norms.clamp(min=eps)).view(nc, nq, lq)
    return cos if text_queries else cos.transpose(0, 1)


@attrs.frozen(kw_only=True)
class Cosine(Stage):
    """Cosine similarity: of two global vectors (VSE++ eq. 2), or of each query with its attended context (SCAN eq. 5/9)."""

    name = "core.cosine"
    kind = "similarity"
    paper = "Faghri et al. 2018 (VSE++) eq. 2; Lee et al. 2018 (SCAN) eq. 5 and 9"

    eps: float = param(EPS, "floor of the norm product (SCAN: 1e-8)", gt=0.0)

    def ports(
        self,
        x: AlignedPort | None = None,
        image: GlobalPort | None = None,
        text: GlobalPort | None = None,
    ) -> PairSimsPort | ScorePort:
        if x is not None:
            return PairSimsPort(1)
        if image is None or text is None:
            raise PortError(
                "needs either a cross-attention stage before it (Aligned) or global vectors of"
                " both sides: add a `pool` to [image] and [text]"
            )
        if image.dim != text.dim:
            raise PortError(f"image global dim {image.dim} differs from text global dim {text.dim}")
        return ScorePort()

    def build(self, **inputs) -> nn.Module:
        return CosineHead(eps=self.eps)


class DotHead(nn.Module):
    """Inner product of global vectors (Ni, D) x (Nt, D) -> (Ni, Nt), with no normalisation of its own."""

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return image @ text.T


def _global_pair_ports(stage: str, image: GlobalPort, text: GlobalPort) -> ScorePort:
    if image.dim != text.dim:
        raise PortError(f"{stage}: image global dim {image.dim} differs from text global dim {text.dim}")
    return ScorePort()


@attrs.frozen(kw_only=True)
class Dot(Stage):
    """Inner product of two global vectors: VSE++'s cosine_sim when an embedding is not normalised (--no_imgnorm)."""

    name = "core.dot"
    kind = "similarity"
    paper = "Faghri et al. 2018 (VSE++) eq. 2 with --no_imgnorm (the VSE0 row)"

    def ports(self, image: GlobalPort, text: GlobalPort) -> ScorePort:
        return _global_pair_ports(self.name, image, text)

    def build(self, image: GlobalPort, text: GlobalPort) -> nn.Module:
        return DotHead()


ORDER_CHUNK_BYTES = 32 * 2**20


class OrderHead(nn.Module):
    """Order-embedding score -||max(0, t - v)||_2 of every image v (Ni, D) and caption t (Nt, D) -> (Ni, Nt).

    The violation t - v has a D-vector per pair, so images are taken in chunks whose (chunk, Nt, D)
    difference stays under ``ORDER_CHUNK_BYTES`` whatever the block size. vector_norm gives the
    official sqrt(sum of squares) with a zero gradient, not NaN, where a pair violates nothing.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        per_image = max(1, text.shape[0] * text.shape[1] * text.element_size())
        chunk = max(1, ORDER_CHUNK_BYTES // per_image)
        rows = [torch.linalg.vector_norm((text[None] - part[:, None]).clamp(min=0), dim=-1)
                for part in image.split(chunk)]
        return -torch.cat(rows) if rows else image.new_zeros(0, text.shape[0])


@attrs.frozen(kw_only=True)
class Order(Stage):
    """Order-embedding score -||max(0, t - v)||: zero, the best, when no caption coordinate exceeds the image's."""

    name = "core.order"
    kind = "similarity"
    paper = "Vendrov et al. 2016 (order embeddings) eq. 2; Faghri et al. 2018 (VSE++) --measure order"

    def ports(self, image: GlobalPort, text: GlobalPort) -> ScorePort:
        return _global_pair_ports(self.name, image, text)

    def build(self, image: GlobalPort, text: GlobalPort) -> nn.Module:
        return OrderHead()


# ================================================================================= losses


class TripletLoss(nn.Module):
    """VSE++ hinge triplet loss on an image x caption score matrix whose diagonal holds the positives."""

    def __init__(self, *, margin: float, max_violation: bool, warmup_epochs: int, mask_same_image: bool):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.mask_same_image = mask_same_image

    def forward(self, x: torch.Tensor, *, positives: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        # The block's first B rows and columns are its pairs (B = the shorter side): extra captions (columns)
        # or extra images (rows) past them are only negatives, as in DIME's extra-negative losses.
        b = min(x.shape)
        diagonal = x.diagonal()
        cost_caption = (self.margin + x[:b] - diagonal[:, None]).clamp(min=0)  # captions as negatives (b, Nt)
        cost_image = (self.margin + x[:, :b] - diagonal[None, :]).clamp(min=0)  # images as negatives (Ni, b)
        eye = torch.eye(*x.shape, dtype=torch.bool, device=x.device)
        not_negative = eye | positives if self.mask_same_image else eye
        cost_caption = cost_caption.masked_fill(not_negative[:b], 0)
        cost_image = cost_image.masked_fill(not_negative[:, :b], 0)
        if self.max_violation and epoch >= self.warmup_epochs:
            return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
        return cost_caption.sum() + cost_image.sum()


@attrs.frozen(kw_only=True)
class Triplet(Stage):
    """VSE++ eq. 5 hinge triplet loss, summed over the batch; hardest negatives after an optional sum warm-up."""

    name = "core.triplet"
    kind = "loss"
    paper = "Faghri et al. 2018 (VSE++) eq. 3 (sum) and eq. 5 (max of hinges)"

    margin: float = param(0.2, "hinge margin alpha", ge=0.0)
    max_violation: bool = param(True, "use the hardest negative (VSE++ MH) instead of the sum (VSE0)")
    warmup_epochs: int = param(0, "epochs of the summed loss before switching to hardest negatives (GPO: 1)", ge=0)
    mask_same_image: bool = param(False, "never treat another caption of the same image as a negative (the official code does not)")

    def ports(self, x: ScorePort) -> LossPort:
        return LossPort()

    def build(self, x: ScorePort) -> nn.Module:
        return TripletLoss(
            margin=self.margin,
            max_violation=self.max_violation,
            warmup_epochs=self.warmup_epochs,
            mask_same_image=self.mask_same_image,
        )


class InfoNCELoss(nn.Module):
    """Symmetric cross-entropy of scores/temperature with the diagonal as targets."""

    def __init__(self, *, temperature: float, mask_same_image: bool):
        super().__init__()
        self.temperature = temperature
        self.mask_same_image = mask_same_image

    def forward(self, x: torch.Tensor, *, positives: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        logits = x / self.temperature
        if self.mask_same_image:
            eye = torch.eye(*x.shape, dtype=torch.bool, device=x.device)
            logits = logits.masked_fill(positives & ~eye, float("-inf"))
        b = min(x.shape)  # the pairs lead; extra captions or images past them are only negatives
        targets = torch.arange(b, device=x.device)
        return (F.cross_entropy(logits[:b], targets) + F.cross_entropy(logits[:, :b].T, targets)) / 2


@attrs.frozen(kw_only=True)
class InfoNCE(Stage):
    """InfoNCE (van den Oord et al. 2018; CLIP's symmetric form): cross-entropy over scores / temperature."""

    name = "core.infonce"
    kind = "loss"
    paper = "van den Oord et al. 2018 (CPC) eq. 4; Radford et al. 2021 (CLIP) symmetric form"

    temperature: float = param(0.05, "softmax temperature tau", gt=0.0)
    mask_same_image: bool = param(True, "drop other captions of the same image from the negatives")

    def ports(self, x: ScorePort) -> LossPort:
        return LossPort()

    def build(self, x: ScorePort) -> nn.Module:
        return InfoNCELoss(temperature=self.temperature, mask_same_image=self.mask_same_image)


@hookimpl
def register_importers() -> dict:
    from itmkit.vsepp import convert  # VSE++ is built from core stages only, so its importer is the core's

    return {"vsepp": convert}


@hookimpl
def register_stages() -> list[type[Stage]]:
    return [Precomp, Raw, BiGRU, Mean, Max, Last, Cosine, Dot, Order, Triplet, InfoNCE]
