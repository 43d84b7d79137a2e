"""IMRAM (Chen et al., CVPR 2020): iterative matching with a recurrent attention memory.

One direction of IMRAM (Text-IMRAM: the words query the regions; Image-IMRAM: the regions
query the words) aligns the two sides K times. With e the query side's fragments, C the
other side's and q^0 = e, step k = 1..K is

    c^k = SCAN attention of q^(k-1) over C             (raw feature norm, softmax(lambda *))
    F_k = mean_t cos(e_t, c^k_t)                        (the ORIGINAL fragments e, not q)
    q^k = g * q^(k-1) + (1 - g) * tanh(W_l [q^(k-1); c^k] + b_l),
          g = sigmoid(W_g [q^(k-1); c^k] + b_g)        (the memory distillation unit)
    q^k = l2norm(q^k)                                   (unless --no_IMRAM_norm)

and the direction's score is sum_k F_k; "full" IMRAM adds both directions. Facts from the
official code (HuiChen24/IMRAM, model.py xattn_score_{Text,Image}_IMRAM and evaluation.py
shard_xattn_*_IMRAM): the per-step pooling is always the mean over the query fragments,
whatever --agg_func says; the last step's memory update is computed and never used (here it
is skipped); the evaluation adds the K per-step matrices.

Here a direction is one stage, ``imram.t2i`` / ``imram.i2t``, in a branch's ``similarity`` slot:
attention, memory and cosines are one computation whose result is every step's cosines, a
PairSims (Ni, Nt, Lq, K). The aggregator ``imram.steps`` pools each step over the valid query
fragments and adds the steps. The whole Ni x Nt block is computed at once:

* step 1 is SCAN's attention of the fragments themselves (``itmkit.attention.scan_attention``),
  later steps that of the pair's memory (``pair_query_attention``);
* cos(e_t, c^k_t) never builds c^k: the numerator is the step's weights times the raw dots
  <e_t, C_j> of step 1, ||c^k_t||^2 is w G w^T with the context's Gram matrix (core.cosine);
* W [q; c^k] = W_q q + w^k (C W_c^T): the context half is projected once per item, so the
  pair-dependent product is (Lq x Lc) by (Lc x 2D), not (Lq x D) by (D x 2D); at step 1 the
  query half W_q e is per item too. Only the steps after the first project a pair's memory.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs
import torch
from torch import nn

from itmkit.attention import RAW_NORMS, pair_layout, pair_query_attention, scan_attention
from itmkit.explain import note_attention
from itmkit.core_stages import CosineHead, Pool
from itmkit.focal import FOCAL_TYPES, focal_reassign
from itmkit.ops import EPS, float32, l2norm
from itmkit.stage import PortError, Stage, param
from itmkit.types import Aligned, Local, LocalPort, PairSims, PairSimsPort, Port, ScorePort
from itmkit_scan.stages import LogSumExpPool, SumPool

FOCAL_CHOICES = ("none", *FOCAL_TYPES)


class RecurrentAttentionMemory(nn.Module):
    """K alignment steps of one IMRAM direction over a block: image (Ni, R, D), text (Nt, L, D) -> PairSims.

    ``linear`` and ``gate`` are the official ``linear_{t2i,i2t}`` / ``gate_{t2i,i2t}`` layers:
    nn.Linear(2D, D) over the concatenation [query; attended context], in that order.
    Returns PairSims with sims (Ni, Nt, Lq, K): cos(e_t, c^k_t) per query fragment and step.
    """

    def __init__(self, *, dim: int, query_side: str, steps: int, lambda_softmax: float, raw_norm: str,
                 renormalize: bool, focal: str):
        super().__init__()
        self.dim = dim
        self.query_side = query_side
        self.steps = steps
        self.lambda_softmax = lambda_softmax
        self.raw_norm = raw_norm
        self.renormalize = renormalize
        self.focal = focal
        self.linear = nn.Linear(2 * dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.cosine = CosineHead(eps=EPS)

    def _refine(self, weights: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        return weights if self.focal == "none" else focal_reassign(weights, context_mask, self.focal)

    def _halves(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer over [query; attended] split into its query half and its context half, (D, D) each."""
        return layer.weight[:, :self.dim], layer.weight[:, self.dim:]

    def forward(self, image: Local, text: Local) -> PairSims:
        query, context = (text, image) if self.query_side == "text" else (image, text)
        first = scan_attention(query, context, query_side=self.query_side, lambda_softmax=self.lambda_softmax,
                               raw_norm=self.raw_norm)
        fragments, query_mask, context_feats, _ = pair_layout(query, context, self.query_side)
        fragments = fragments * query_mask.unsqueeze(-1)  # padded queries are zero, as scan_attention made them
        query_mask = first.query_mask  # (Ni, Nt, Lq)
        focal_mask = first.context_mask.unsqueeze(-2)
        # the context halves of both layers, projected once per context item: (Nc, Lc, D) each
        projected = [context.feats @ self._halves(layer)[1].T for layer in (self.linear, self.gate)]
        per_context = "itqc,icd->itqd" if self.query_side == "text" else "itqc,tcd->itqd"

        weights = self._refine(first.weights, focal_mask)
        memory = fragments
        step_sims = []
        for k in range(self.steps):
            if k > 0:
                weights = pair_query_attention(memory, query_mask, context, query_side=self.query_side,
                                               lambda_softmax=self.lambda_softmax, raw_norm=self.raw_norm)
                weights = self._refine(weights, focal_mask)
            note_attention(weights, self.query_side, f"step {k + 1}")
            aligned = Aligned(fragments, weights, context_feats, query_mask, self.query_side, first.dots,
                              first.context_mask)
            step_sims.append(self.cosine.aligned_cosine(aligned))
            if k + 1 < self.steps:  # the last step's update is never read
                memory = self._update(memory, weights, projected, per_context)
        return PairSims(torch.stack(step_sims, dim=-1), query_mask)

    def _update(self, memory: torch.Tensor, weights: torch.Tensor, projected: list[torch.Tensor],
                per_context: str) -> torch.Tensor:
        """q' = g * q + (1 - g) * tanh(W_l [q; c] + b_l), g = sigmoid(W_g [q; c] + b_g).

        W [q; c] = W_q q + weights @ (C W_c^T): at step 1 ``memory`` is the fragments, per item
        (broadcast over the other side), later each pair's own. Rows of padded queries are not
        kept at zero here: ``pair_query_attention`` ignores them and nothing else reads them.
        """
        if not torch.is_grad_enabled():
            return self._update_in_place(memory, weights, projected, per_context)
        out = []
        for layer, context_half in zip((self.linear, self.gate), projected):
            query_half = self._halves(layer)[0]
            out.append(torch.einsum(per_context, weights, context_half) + (memory @ query_half.T + layer.bias))
        candidate, gate = torch.tanh(out[0]), torch.sigmoid(out[1])
        # gate * memory + (1 - gate) * candidate; the memory is kept in float32 under mixed precision
        # (lerp also needs its three operands in one dtype: the first memory is the float32 fragments)
        memory = torch.lerp(float32(candidate), float32(memory), float32(gate))
        return l2norm(memory) if self.renormalize else memory

    def _update_in_place(self, memory: torch.Tensor, weights: torch.Tensor, projected: list[torch.Tensor],
                         per_context: str) -> torch.Tensor:
        """``_update`` when scoring: both layers as one (., 2D) product, the query half accumulated into
        the context half's result by one fused matrix product, activations in place."""
        pre = torch.einsum(per_context, weights, torch.cat(projected, dim=-1))  # (Ni, Nt, Lq, 2D), fresh
        query_half = torch.cat([self._halves(self.linear)[0], self._halves(self.gate)[0]])  # (2D, D)
        bias = torch.cat([self.linear.bias, self.gate.bias])
        if memory.shape[:2] == pre.shape[:2] and memory.is_contiguous():  # a pair's own memory
            flat = pre.view(-1, 2 * self.dim)
            # in place, so autocast does not cast: under mixed precision the product takes pre's dtype
            flat.addmm_(memory.reshape(-1, self.dim).to(flat.dtype), query_half.T.to(flat.dtype)).add_(bias)
        else:  # step 1: the fragments, once per item, broadcast over the pairs
            pre += torch.addmm(bias, memory.reshape(-1, self.dim), query_half.T).view(*memory.shape[:-1], -1)
        candidate, gate = pre[..., :self.dim].tanh_(), pre[..., self.dim:].sigmoid_()
        memory = torch.lerp(float32(candidate), float32(memory), float32(gate))  # as in _update
        return l2norm(memory) if self.renormalize else memory


@attrs.frozen(kw_only=True)
class _Memory(Stage):
    """What the two IMRAM directions share: parameters, ports, module and memory; subclasses set the side."""

    kind = "similarity"
    query_side: ClassVar[str] = "text"

    steps: int = param(3, "K, the number of alignment steps (official --iteration_step; F30K script 1, COCO 3)",
                       ge=1, le=16)
    lambda_softmax: float = param(9.0, "inverse temperature lambda of every step's attention softmax"
                                  " (official --lambda_softmax: F30K 9, COCO 11)", gt=0.0)
    raw_feature_norm: str = param("clipped_l2norm", "normalisation of the raw affinities over the query axis"
                                  " before the softmax (IMRAM: clipped_l2norm)", choices=RAW_NORMS)
    renormalize: bool = param(False, "l2-normalise the memory after each update (the official default; every"
                              " official script turns it off with --no_IMRAM_norm, hence False here)")
    focal: Literal["none", "equal", "prob"] = param(
        "none", "refine every step's attention with BFAN's focal attention ('equal' / 'prob', itmkit.focal);"
        " 'none' is IMRAM's SCAN attention", choices=FOCAL_CHOICES)

    def ports(self, image: LocalPort, text: LocalPort) -> PairSimsPort:
        if image.dim != text.dim:
            raise PortError(f"IMRAM attends and gates in one joint space: image fragments are {image.dim}-d,"
                            f" text fragments {text.dim}-d (set one [recipe].embed_dim)")
        return PairSimsPort(self.steps)

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return RecurrentAttentionMemory(dim=image.dim, query_side=self.query_side, steps=self.steps,
                                        lambda_softmax=self.lambda_softmax, raw_norm=self.raw_feature_norm,
                                        renormalize=self.renormalize, focal=self.focal)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict[str, Port] | None = None) -> int:
        dim = ports["image"].dim if ports and "image" in ports else 1024
        queries = text_len if self.query_side == "text" else image_len
        # float32 per pair at the peak of an update (no autograd): the memory, both layers'
        # context and query halves, their tanh / sigmoid, the new memory; plus the (Lq, Lc) dots of
        # step 1, the weights, the logits and the cosine's w G products. Measured (peak RSS growth
        # over 12 x 16 pairs, D 1024, 20 words, 36 regions, K 3): 0.92-0.95 of this.
        vectors = 0 if self.steps == 1 else 10 * queries * dim
        return 4 * (vectors + 6 * text_len * image_len + 2 * queries * self.steps)


@attrs.frozen(kw_only=True)
class TextToImage(_Memory):
    """Text-IMRAM (Chen et al. 2020): the words query the regions K times through the recurrent attention memory."""

    name = "imram.t2i"
    paper = ("Chen et al. 2020 (IMRAM), Sec. 3.2-3.3: cross-modal attention unit and memory distillation unit,"
             " Text-IMRAM; official model.py xattn_score_Text_IMRAM")
    query_side = "text"


@attrs.frozen(kw_only=True)
class ImageToText(_Memory):
    """Image-IMRAM (Chen et al. 2020): the regions query the words K times through the recurrent attention memory."""

    name = "imram.i2t"
    paper = ("Chen et al. 2020 (IMRAM), Sec. 3.2-3.3: cross-modal attention unit and memory distillation unit,"
             " Image-IMRAM; official model.py xattn_score_Image_IMRAM")
    query_side = "image"


# ============================================================================== aggregation

POOLS = ("mean", "max", "sum", "lse")


class StepSum(nn.Module):
    """S = sum_k pool_t(R_tk): each step's relevances pooled over the valid query fragments, then added.

    Each step is pooled by the stage that pools one channel elsewhere (core.mean / core.max, SCAN's
    Sum and LogSumExp), so a step's F_k is exactly what that aggregator gives a single alignment.
    """

    def __init__(self, *, pool: str, lambda_lse: float):
        super().__init__()
        self.pool = {"mean": lambda: Pool(how="mean"), "max": lambda: Pool(how="max"), "sum": SumPool,
                     "lse": lambda: LogSumExpPool(lambda_lse=lambda_lse)}[pool]()

    def forward(self, x: PairSims) -> torch.Tensor:
        steps = [self.pool(PairSims(x.sims[..., k:k + 1], x.mask)) for k in range(x.sims.shape[-1])]
        return torch.stack(steps, dim=-1).sum(dim=-1)  # (Ni, Nt, K) -> (Ni, Nt)


@attrs.frozen(kw_only=True)
class Steps(Stage):
    """IMRAM's score (Chen et al. 2020, Sec. 3.4): the per-step relevance pooled over the query fragments, summed over steps."""

    name = "imram.steps"
    kind = "aggregator"
    paper = ("Chen et al. 2020 (IMRAM), Sec. 3.4 S(I, T) = sum_k F_k; official evaluation.py shard_xattn_*_IMRAM"
             " adds the K per-step matrices, each the mean over the query fragments")

    pool: Literal["mean", "max", "sum", "lse"] = param(
        "mean", "how each step's per-fragment relevances become its score F_k (IMRAM: mean; the others are"
        " SCAN's alternatives, for cross-paper recipes)", choices=POOLS)
    lambda_lse: float = param(6.0, "lambda of the LogSumExp pooling (pool = 'lse' only)", gt=0.0, le=80.0)

    def ports(self, x: PairSimsPort) -> ScorePort:
        return ScorePort()

    def build(self, x: PairSimsPort) -> nn.Module:
        return StepSum(pool=self.pool, lambda_lse=self.lambda_lse)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        return 3 * 4 * 16 * max(text_len, image_len)  # relevance, exp terms, mask per fragment, up to 16 steps
