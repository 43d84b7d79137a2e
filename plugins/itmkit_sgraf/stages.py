"""SGRAF (Diao et al., AAAI 2021): similarity vectors, graph reasoning (SGR) and attention filtration (SAF).

An SGRAF model in a recipe:

    [image] pool = sgraf.visual_sa     v̄ = self-attention over the regions, guided by their mean (BN inside)
    [text]  pool = sgraf.text_sa       ē = the same over the words (no BN)
    cross      = sgraf.t2i             each word attends over the regions (SCAN t-i attention, λ = 9)
    similarity = sgraf.vector          N = [s_g; s_1 .. s_L]: s = l2norm(W (x − y)²), global node first
    aggregate  = sgraf.sgr | sgraf.saf one score per pair: sigmoid(w · reasoned node 0 | filtered sum + b)

Formulas follow the paper (its similarity representation, SGR and SAF modules) and, where it
leaves details open, the official model.py (Paranioar/SGRAF): BatchNorm placement, epsilons, the
l2norm of the attended context and the per-caption SAF statistics are the code's. The paper's
equation numbers could not be checked here, so the stages cite modules and formulas instead.

Every module here works on a whole block of Ni images x Nt captions: the official
per-caption loop (``EncoderSimilarity.forward``) slices each caption to its length, here padded
words are masked instead, with equal results (tests/official.py is the loop).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from itmkit.attention import masked_softmax, scan_attention
from itmkit.errors import DataError
from itmkit.ops import EPS, float32, l2norm, masked_mean, xavier_linear_
from itmkit.stage import DataNeeds, PortError, Stage, param
from itmkit.types import Aligned, AlignedPort, GlobalPort, Local, LocalPort, PairSims, PairSimsPort, ScorePort

# ====================================================================== self-attention pools


def _init(module: nn.Module) -> None:
    """The official init: xavier-uniform linear layers with zero bias, BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            xavier_linear_(m)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SelfAttentionPool(nn.Module):
    """v̄ = l2norm(Σ_k w_k x_k),  w = softmax_k( W_c [tanh(BN(W_l x_k)) ⊙ tanh(BN(W_g mean_k x_k))] ).

    (B, N, D) fragments -> (B, D). ``num_regions`` set: the local branch has BatchNorm1d over the
    fragment axis (the official VisualSA, whose BN channels are the 36 region slots), so the
    fragments are laid out in exactly that many slots; None: no BatchNorm on either branch (the
    official TextSA).

    The official code knows only full 36-region images. Images with fewer regions (zero-padded
    adaptive features, Regions.lengths < R) are masked: their padded slots enter every layer as
    zero rows and get no attention weight, and images stored wider than ``num_regions`` are cut
    to it when the slots past it are all padding (more real regions than slots is an error).
    Images of exactly ``num_regions`` rows go through unchanged, bit for bit.
    """

    def __init__(self, *, dim: int, dropout: float, num_regions: int | None = None):
        super().__init__()
        norm = num_regions is not None
        self.num_regions = num_regions
        # Sequential layouts as in the official VisualSA / TextSA, so checkpoints map one to one.
        self.embedding_local = nn.Sequential(nn.Linear(dim, dim), *([nn.BatchNorm1d(num_regions)] if norm else []),
                                             nn.Tanh(), nn.Dropout(dropout))
        self.embedding_global = nn.Sequential(nn.Linear(dim, dim), *([nn.BatchNorm1d(dim)] if norm else []),
                                              nn.Tanh(), nn.Dropout(dropout))
        self.embedding_common = nn.Sequential(nn.Linear(dim, 1))
        _init(self)

    def forward(self, x: Local) -> torch.Tensor:
        if self.num_regions is not None and x.feats.shape[1] != self.num_regions:
            x = self._to_slots(x)
        valid = x.mask.unsqueeze(-1)
        # Padded fragments -> 0 before any layer: garbage there never reaches BN's batch statistics.
        feats = torch.where(valid, x.feats, 0.0)  # (B, N, D)
        local = self.embedding_local(feats)  # (B, N, D)
        guide = self.embedding_global(masked_mean(feats, x.mask, dim=1))  # (B, D)
        logits = self.embedding_common(local * guide.unsqueeze(1)).squeeze(-1)  # (B, N)
        weights = masked_softmax(logits, x.mask)
        return l2norm((weights.unsqueeze(-1) * feats).sum(dim=1))

    def _to_slots(self, x: Local) -> Local:
        """``x`` laid out in ``num_regions`` slots: padded with masked zero rows, or cut where only padding lies."""
        slots, width = self.num_regions, x.feats.shape[1]
        if width < slots:
            pad = slots - width
            feats = torch.cat([x.feats, x.feats.new_zeros(x.feats.shape[0], pad, x.feats.shape[2])], dim=1)
            return Local(feats, torch.cat([x.mask, x.mask.new_zeros(x.mask.shape[0], pad)], dim=1))
        found = int(x.mask.sum(dim=1).max()) if x.mask.numel() else 0
        if x.mask[:, slots:].any():
            raise DataError(
                f"sgraf.visual_sa was built for {slots} regions per image (its BatchNorm1d runs over the region"
                f" axis, one channel per region slot), but some images have {found}: to train on this data,"
                f" set num_regions = {width} on the [image] pool of the recipe; a trained or imported model"
                f" needs data with at most {slots} regions per image")
        return Local(x.feats[:, :slots], x.mask[:, :slots])


@attrs.frozen(kw_only=True)
class VisualSelfAttention(Stage):
    """SGRAF visual self-attention pool (Diao et al. 2021): v̄ = l2norm(Σ_k α_k v_k), α guided by the mean region."""

    name = "sgraf.visual_sa"
    kind = "aggregator"
    paper = ("Diao et al. 2021 (SGRAF), global image representation by self-attention guided by the mean region;"
             " layers and BatchNorm placement as in the official VisualSA")
    example: ClassVar[dict] = {"num_regions": 6}

    num_regions: int = param(36, "region slots: the local branch's BatchNorm1d has one channel per slot, so no"
                             " image may have more regions (BUTD: 36; fewer are masked)", ge=1)
    dropout: float = param(0.4, "dropout after each tanh branch (SGRAF: 0.4)", ge=0.0, le=1.0)

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def data_needs(self) -> DataNeeds:
        return DataNeeds(max_regions=self.num_regions)  # one BatchNorm channel per region slot

    def build(self, x: LocalPort) -> nn.Module:
        return SelfAttentionPool(dim=x.dim, dropout=self.dropout, num_regions=self.num_regions)


@attrs.frozen(kw_only=True)
class TextSelfAttention(Stage):
    """SGRAF textual self-attention pool (Diao et al. 2021): ē = l2norm(Σ_t α_t e_t), α guided by the mean word."""

    name = "sgraf.text_sa"
    kind = "aggregator"
    paper = ("Diao et al. 2021 (SGRAF), global text representation by self-attention guided by the mean word"
             " (official TextSA)")

    dropout: float = param(0.4, "dropout after each tanh branch (SGRAF: 0.4)", ge=0.0, le=1.0)

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return SelfAttentionPool(dim=x.dim, dropout=self.dropout)


# ========================================================================== cross attention


class WordRegionAttention(nn.Module):
    """Each word attends over the regions (SCAN t-i: clipped l2norm over the words, softmax λ over the regions)."""

    def __init__(self, *, lambda_softmax: float):
        super().__init__()
        self.lambda_softmax = lambda_softmax

    def forward(self, image: Local, text: Local) -> Aligned:
        return scan_attention(text, image, query_side="text", lambda_softmax=self.lambda_softmax,
                              raw_norm="clipped_l2norm")


@attrs.frozen(kw_only=True)
class TextToImage(Stage):
    """SGRAF word-to-region attention (SCAN t-i): α_ti = softmax_i(λ l2norm_t(LeakyReLU(<v_i, e_t>)))."""

    name = "sgraf.t2i"
    kind = "cross"
    paper = ("Diao et al. 2021 (SGRAF), local alignments: the SCAN t-i attention of the official SCAN_attention"
             " (Lee et al. 2018); its l2norm of the attended vector is applied by sgraf.vector")

    lambda_softmax: float = param(9.0, "inverse softmax temperature over the regions (the official code fixes 9)",
                                  gt=0.0)

    def ports(self, image: LocalPort, text: LocalPort) -> AlignedPort:
        if image.dim != text.dim:
            raise PortError(f"words attend over regions by dot product, so both sides need one dim: image"
                            f" fragments are {image.dim}-d, text fragments {text.dim}-d (set one [recipe].embed_dim)")
        return AlignedPort(image.dim)

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return WordRegionAttention(lambda_softmax=self.lambda_softmax)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # float32 (words x regions) arrays at the peak of the attention: the raw dots (kept in
        # Aligned), the clipped and normalised affinities, the logits and the softmax weights;
        # sgraf.vector permutes the weights once more when the context is the caption side.
        return 6 * 4 * text_len * image_len


# ======================================================================== similarity vectors


def attend(weights: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """weights (ni, nt, Lq, Lc) @ context (ni|1, nt|1, Lc, D) -> (ni, nt, Lq, D).

    One batched product per context item: a broadcasting matmul would first copy the context
    to every pair, (ni, nt, Lc, D). The size-1 axis goes by ``squeeze``, whose backward is a view:
    indexing it away would back-propagate a zero-filled copy of the whole side for every block.
    """
    ni, nt = weights.shape[:2]
    if context.shape[:2] == (ni, 1):  # images are the context (t-i)
        return torch.einsum("itqc,icd->itqd", weights, context.squeeze(1))
    if context.shape[:2] == (1, nt):  # captions are the context (i-t)
        return torch.einsum("itqc,tcd->itqd", weights, context.squeeze(0))
    return weights @ context


def _part(t: torch.Tensor, images: slice, captions: slice) -> torch.Tensor:
    """The sub-block of a (ni|1, nt|1, ...) tensor; broadcast axes of size 1 stay as they are."""
    return t[images if t.shape[0] != 1 else slice(None), captions if t.shape[1] != 1 else slice(None)]


class SimilarityVectors(nn.Module):
    """N = [l2norm(W_g (v̄ − ē)²); l2norm(W_l (a_t − e_t)²) for each query t]: (Ni, Nt, 1 + Lq, S).

    a_t is the attended context of query t, l2-normalised first (``normalize_attended``, as the
    official SCAN_attention ends). Padded queries give zero nodes, masked.

    Without autograd (scoring) the (Lq x D) difference vectors are built a part of the block at a
    time, in place, each part at most the size of the output: the working memory then grows
    with the similarity size S, not the embedding size D.
    """

    def __init__(self, *, dim: int, sim_dim: int, normalize_attended: bool = True):
        super().__init__()
        self.sim_dim = sim_dim
        self.normalize_attended = normalize_attended
        self.local_w = nn.Linear(dim, sim_dim)
        self.global_w = nn.Linear(dim, sim_dim)
        _init(self)

    def forward(self, x: Aligned, image: torch.Tensor, text: torch.Tensor) -> PairSims:
        ni, nt, lq = x.weights.shape[:3]
        query_mask = x.query_mask.expand(ni, nt, lq)
        mask = torch.cat([query_mask.new_ones(ni, nt, 1), query_mask], dim=2)  # the global node is always valid
        if torch.is_grad_enabled():  # training: one pass, autograd keeps what it needs anyway
            glob = self.global_node(image, text)  # (Ni, Nt, S)
            local = self.local_nodes(x.weights, x.context, x.query, inplace=False)  # (Ni, Nt, Lq, S)
            nodes = torch.cat([glob.unsqueeze(2), local], dim=2)
            return PairSims(torch.where(mask.unsqueeze(-1), nodes, 0.0), mask)
        nodes = x.weights.new_empty(ni, nt, 1 + lq, self.sim_dim)
        for rows, cols in self._parts(ni, nt, lq, x.context.shape[-1]):
            nodes[rows, cols, 0] = self.global_node(image[rows], text[cols])
            nodes[rows, cols, 1:] = self.local_nodes(_part(x.weights, rows, cols), _part(x.context, rows, cols),
                                                     _part(x.query, rows, cols), inplace=True)
        return PairSims(nodes.masked_fill_(~mask.unsqueeze(-1), 0.0), mask)

    def global_node(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """s_g = l2norm(W_g (v̄_i − ē_t)²) for every pair: (ni, D) x (nt, D) -> (ni, nt, S)."""
        return l2norm(self.global_w((image.unsqueeze(1) - text.unsqueeze(0)).pow(2)))

    def local_nodes(self, weights: torch.Tensor, context: torch.Tensor, query: torch.Tensor, *,
                    inplace: bool) -> torch.Tensor:
        """s_t = l2norm(W_l (l2norm(a_t) − q_t)²), a_t = Σ_c w_tc c: (ni, nt, Lq, S)."""
        diff = float32(attend(weights, context))  # a fresh (ni, nt, Lq, D) tensor: safe to overwrite
        if self.normalize_attended:  # the norm in float32 under mixed precision (itmkit.precision)
            norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True) + EPS
            diff = diff.div_(norm) if inplace else diff / norm
        diff = diff.sub_(query).square_() if inplace else (diff - query).square()
        return l2norm(self.local_w(diff))

    def _parts(self, ni: int, nt: int, lq: int, dim: int) -> Iterator[tuple[slice, slice]]:
        """Sub-blocks whose (rows, cols, Lq, D) difference tensor holds at most as many numbers as the output."""
        budget = max(ni * nt * (lq + 1) * self.sim_dim, 1 << 18)
        per_image = nt * lq * dim
        if per_image <= budget:
            step = max(budget // per_image, 1)
            for i in range(0, ni, step):
                yield slice(i, i + step), slice(None)
            return
        step = max(budget // max(lq * dim, 1), 1)
        for i in range(ni):
            for t in range(0, nt, step):
                yield slice(i, i + 1), slice(t, t + step)


@attrs.frozen(kw_only=True)
class Vector(Stage):
    """SGRAF similarity representation (Diao et al. 2021): s = l2norm(W (x − y)²) per word, global node first."""

    name = "sgraf.vector"
    kind = "similarity"
    paper = ("Diao et al. 2021 (SGRAF), vector-based similarity representation s = W|x − y|² / ||W|x − y|²||:"
             " local (each word vs its attended regions) and global (v̄ vs ē)")

    sim_dim: int = param(256, "size S of each similarity vector (SGRAF: 256)", ge=1)
    normalize_attended: bool = param(True, "l2-normalise each attended context vector before the difference"
                                     " (the official SCAN_attention ends with it)")

    def ports(
        self,
        x: AlignedPort,
        image: GlobalPort | None = None,
        text: GlobalPort | None = None,
    ) -> PairSimsPort:
        if image is None or text is None:
            raise PortError("the global similarity node needs a global vector on both sides: add a pool to"
                            " [image] and [text] (SGRAF: sgraf.visual_sa and sgraf.text_sa)")
        if not x.dim == image.dim == text.dim:
            raise PortError(f"the attended fragments ({x.dim}-d) and the image ({image.dim}-d) and text"
                            f" ({text.dim}-d) global vectors must share one dim")
        return PairSimsPort(self.sim_dim)

    def build(self, x: AlignedPort, image: GlobalPort, text: GlobalPort) -> nn.Module:
        return SimilarityVectors(dim=x.dim, sim_dim=self.sim_dim, normalize_attended=self.normalize_attended)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # float32 (nodes x S) arrays per pair. Here: the output, the difference part (at most as
        # large, see SimilarityVectors), its projection and l2norm: 4. The aggregator after it
        # keeps the output alive and adds a masked copy, a 2S-wide projection and the updated
        # nodes (sgraf.sgr): 5 at its peak; 6 are counted.
        # Only this stage knows S, so it counts the larger of the two for the branch; plus a copy
        # of the attention weights when the captions are the context. The spec cannot tell which
        # side queries (SGRAF's words, or regions after an i-t cross stage), so it counts nodes
        # for the longer side.
        nodes = max(text_len, image_len) + 1
        return 4 * (6 * nodes * self.sim_dim + text_len * image_len)


# ================================================================================ reasoning


class GraphStep(nn.Module):
    """One SGR step on a fully connected graph: N' = ReLU(W_r softmax_k((W_q N)(W_k N)ᵀ) N)."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.query_w = nn.Linear(dim, dim)
        self.key_w = nn.Linear(dim, dim)
        self.update_w = nn.Linear(dim, dim)
        # b_k adds b_k·q_i to every logit of query i alike, which the softmax over the keys
        # cancels: it never changes an output, so it is kept (checkpoints have it) but not trained.
        self.key_w.bias.requires_grad_(False)

    def forward(self, nodes: torch.Tensor, key_bias: torch.Tensor, *, first_only: bool = False) -> torch.Tensor:
        """nodes (B, M, S), key_bias (B, 1, M) -> updated nodes (B, M, S), or node 0 alone (B, S)."""
        dim = nodes.shape[-1]
        # (W_q n_i + b_q)·(W_k n_j + b_k) = (W_kᵀ(W_q n_i + b_q))·n_j + b_k·(W_q n_i + b_q): the last
        # term is the same for every key j (see __init__), so one (S x S) product per node serves
        # both projections. W_r is applied before the edges mix the nodes
        # (edges · (W_r N) = W_r (edges · N), each edge row sums to 1), which lets one GEMM of
        # width 2S give both that and the query-key product.
        wq, bq, wk = self.query_w.weight, self.query_w.bias, self.key_w.weight
        if first_only:
            queries = F.linear(nodes[:, 0], wk.T @ wq, wk.T @ bq).unsqueeze(1)  # (B, 1, S)
            edges = torch.softmax(float32(torch.baddbmm(key_bias, queries, nodes.transpose(1, 2))), dim=-1)
            return F.relu(self.update_w((edges @ nodes).squeeze(1)), inplace=True)
        both = F.linear(nodes, torch.cat([wk.T @ wq, self.update_w.weight]),
                        torch.cat([wk.T @ bq, torch.zeros_like(bq)]))  # (B, M, 2S)
        queries, updates = both[..., :dim], both[..., dim:]
        edges = torch.softmax(float32(torch.baddbmm(key_bias, queries, nodes.transpose(1, 2))), dim=-1)  # (B, M, M)
        return F.relu(torch.baddbmm(self.update_w.bias, edges, updates), inplace=True)


class GraphReasoning(nn.Module):
    """SGR: ``steps`` graph steps over [global; words] nodes, then score = sigmoid(w · node_0 + b): (Ni, Nt)."""

    def __init__(self, *, dim: int, steps: int):
        super().__init__()
        self.steps = nn.ModuleList(GraphStep(dim=dim) for _ in range(steps))
        self.readout = nn.Linear(dim, 1)
        _init(self)

    def forward(self, x: PairSims) -> torch.Tensor:
        ni, nt, m, dim = x.sims.shape
        nodes = torch.where(x.mask.unsqueeze(-1), x.sims, 0.0).reshape(ni * nt, m, dim)
        # Padded nodes are never keys: a large finite negative logit gives them weight 0 exactly.
        key_bias = torch.zeros(ni * nt, 1, m, dtype=nodes.dtype, device=nodes.device)
        key_bias.masked_fill_(~x.mask.reshape(ni * nt, 1, m), torch.finfo(nodes.dtype).min / 4)
        for step in self.steps[:-1]:
            nodes = step(nodes, key_bias)
        # Only node 0 is read after the last step, so that step updates node 0 alone.
        node0 = self.steps[-1](nodes, key_bias, first_only=True)  # (B, S)
        return torch.sigmoid(float32(self.readout(node0))).view(ni, nt)  # float32 scores under mixed precision


def _vector_sims(x: PairSimsPort) -> ScorePort:
    if x.dim < 2:
        raise PortError(f"reads similarity vectors (dim > 1) with the global node first, got dim {x.dim};"
                        " put sgraf.vector before it")
    return ScorePort()


@attrs.frozen(kw_only=True)
class SGR(Stage):
    """SGRAF graph reasoning (Diao et al. 2021): N ← ReLU(W_r softmax((W_q N)(W_k N)ᵀ) N); sigmoid(w·n_0 + b)."""

    name = "sgraf.sgr"
    kind = "aggregator"
    paper = "Diao et al. 2021 (SGRAF), Similarity Graph Reasoning (SGR) module and the sigmoid score layer"

    steps: int = param(3, "graph reasoning steps (SGRAF --sgr_step: 3)", ge=1)

    def ports(self, x: PairSimsPort) -> ScorePort:
        return _vector_sims(x)

    def build(self, x: PairSimsPort) -> nn.Module:
        return GraphReasoning(dim=x.dim, steps=self.steps)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # The (nodes x S) arrays of a step are counted by sgraf.vector, which knows S (see there);
        # here the float32 (nodes x nodes) edge logits, their masked copy and the softmax.
        nodes = max(text_len, image_len) + 1
        return 4 * 4 * nodes * nodes


class CaptionBatchNorm(nn.BatchNorm1d):
    """SAF's BatchNorm1d(1) of the node logits, with the official statistics.

    The official code runs SAF once per caption, on (n_image, 1, L + 1) logits, so in training
    each caption gets its own mean and variance over every image of the batch and that
    caption's valid nodes, and the running statistics are updated once per caption, in caption
    order. In evaluation it is one affine map with the running statistics.
    """

    def __init__(self):
        super().__init__(1)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """logits, mask (Ni, Nt, M) -> normalised logits (Ni, Nt, M)."""
        if not self.training:
            mean, var = self.running_mean, self.running_var  # (1,)
        else:
            valid = mask.to(logits.dtype)
            count = valid.sum(dim=(0, 2))  # (Nt,) values per caption
            mean = (logits * valid).sum(dim=(0, 2)) / count.clamp(min=1)
            var = ((logits - mean[:, None]).square() * valid).sum(dim=(0, 2)) / count.clamp(min=1)
            self._track(mean.detach(), var.detach(), count)
            mean, var = mean[:, None], var[:, None]  # (Nt, 1): broadcast over (Ni, Nt, M)
        return (logits - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """One momentum update per caption, t = 0 .. Nt-1, as a single weighted sum."""
        n = mean.shape[0]
        keep = 1.0 - self.momentum
        decay = keep ** torch.arange(n - 1, -1, -1, dtype=mean.dtype, device=mean.device)  # (1-m)^(Nt-1-t)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(keep**n).add_(self.momentum * (decay * mean).sum())
        self.running_var.mul_(keep**n).add_(self.momentum * (decay * unbiased).sum())
        self.num_batches_tracked.add_(n)


class AttentionFiltration(nn.Module):
    """SAF: gate each node by sigmoid(BN(w_a · n)), l1-normalise the gates, pool, l2norm, score = sigmoid(w · s + b)."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.attn_w = nn.Linear(dim, 1)
        self.bn = CaptionBatchNorm()
        self.readout = nn.Linear(dim, 1)
        _init(self)

    def forward(self, x: PairSims) -> torch.Tensor:
        nodes = torch.where(x.mask.unsqueeze(-1), x.sims, 0.0)  # (Ni, Nt, M, S)
        # the caption statistics (a mean and a variance) and the gates' l1 norm in float32 under mixed precision
        logits = self.bn(float32(self.attn_w(nodes).squeeze(-1)), x.mask)  # (Ni, Nt, M)
        gates = torch.sigmoid(logits) * x.mask  # padded nodes gate 0
        gates = gates / (gates.sum(dim=-1, keepdim=True) + EPS)  # the official l1norm (gates are positive)
        pooled = l2norm((gates.unsqueeze(-2) @ nodes).squeeze(-2))  # (Ni, Nt, S)
        return torch.sigmoid(float32(self.readout(pooled))).squeeze(-1)


@attrs.frozen(kw_only=True)
class SAF(Stage):
    """SGRAF attention filtration (Diao et al. 2021): s = l2norm(Σ_k l1norm_k(σ(BN(w_a·n_k))) n_k); sigmoid(w·s + b)."""

    name = "sgraf.saf"
    kind = "aggregator"
    paper = "Diao et al. 2021 (SGRAF), Similarity Attention Filtration (SAF) module and the sigmoid score layer"

    def ports(self, x: PairSimsPort) -> ScorePort:
        return _vector_sims(x)

    def build(self, x: PairSimsPort) -> nn.Module:
        return AttentionFiltration(dim=x.dim)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # The (nodes x S) arrays are counted by sgraf.vector, which knows S; here the float32
        # logits, normalised logits, gates and mask per node.
        return 4 * 4 * (max(text_len, image_len) + 1)
