"""RAMEN's early-fusion block (Shrestha, Kafle & Kanan, CVPR 2019, Sec. 3) scoring every image x caption pair.

    x_k = BN([v_k ; q])                                  early fusion, one row per (pair, region)
    x_k = Swish(W_1 x_k + b_1)
    x_k = Swish(x_k + W_l x_k + b_l)        l = 2..4     residual added before the activation
    x_k = BN(x_k)
    c_k = BN([x_k ; q])                                  late fusion
    a   = [GRU->(c_1..c_K) at the last region ; GRU<-(c_1..c_K) at the first]   bi-GRU over the regions
    s   = w . Swish(W a + b)  (readout; the VQA head's shape, ASSUMPTION)

as the official code (components/multi_modal_core.py, models/rnn.py) computes it for a question,
here for every pair of an Ni x Nt block at once. Two identities keep the block cheap:

* BatchNorm is a per-feature affine map, with running statistics at evaluation and with the
  batch's statistics in training. Its features split into the region part and the caption part
  of the concatenation, so BN followed by a linear layer splits into an image term (Ni, R, H) and
  a caption term (Nt, H) added per pair: the (Ni, Nt, R, F + Dq) concatenation never exists.
  In training the batch's statistics of the concatenation are those of the parts, each row of a
  part weighted by how often it appears: an image's region once per caption of the block, a
  caption once per valid region of the block. The same holds for the late fusion in front of
  the GRU's input projection.
* The GRU's input gates are projected one region step at a time inside the recurrence, so the
  (pair, region, 3 x hidden) gate tensors of both directions never exist either.

Images may have fewer regions than the array's width (adaptive detectors): padded regions are left
out of every BatchNorm statistic and the bi-GRU runs over each image's valid regions only (packed,
ASSUMPTION: the VQA code always has 36), so a pair's score never depends on the padding, nor, at
evaluation, on the block it is scored in.

With a cross-attention stage before it (``scan.i2t``), q becomes per region: region k is fused with
the caption vector attended for it (``Aligned``), the natural generalisation of q broadcast over the
regions. Generally the sequence runs over the Aligned queries, each fused with its attended context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itmkit.ops import float32
from itmkit.types import Aligned, Local


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) (components/nonlinearity.py, Swish)."""
    return x * torch.sigmoid(x)


def normalized_swish(x: torch.Tensor) -> torch.Tensor:
    """The code's NormalizedSwish: Swish shifted and scaled to about zero mean and unit variance on N(0, 1)."""
    return 1.78718727865 * (x * torch.sigmoid(x) - 0.20662096414)


NONLINEARITIES = {"swish": swish, "normalized_swish": normalized_swish}


def activate_(x: torch.Tensor, name: str) -> torch.Tensor:
    """The nonlinearity ``name`` in place on ``x`` (scoring: no graph needs x; one temporary instead of two)."""
    x.mul_(torch.sigmoid(x))
    return x.sub_(0.20662096414).mul_(1.78718727865) if name == "normalized_swish" else x


# ============================================================================ BatchNorm over parts


def _row_weights(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How many valid rows of the block each row of ``part`` stands for.

    part (a, b, n, D) broadcasts to the block (Ni, Nt, N, D); mask (Ni, Nt, N) float. A part that is
    the same for every caption (a = Ni, b = 1) counts once per valid (caption, region) of its image.
    """
    dims = tuple(d for d in range(3) if part.shape[d] == 1 and mask.shape[d] != 1)
    return mask.sum(dim=dims, keepdim=True) if dims else mask


def batch_norm_parts(bn: nn.BatchNorm1d, parts: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """``bn`` over the valid rows of the block's concatenation [parts[0] ; parts[1] ; ...], part by part.

    Each part is (a, b, n, D_j), broadcastable to (Ni, Nt, N, D_j), and returned normalised in its own
    shape. Training: the batch's mean and biased variance over the valid rows, and the running
    statistics updated as BatchNorm1d does (unbiased variance, momentum); evaluation: the running ones.
    """
    # the counts, means and variances in float32 under mixed precision (bf16 counts rows exactly only to 256)
    weight_mask = float32(mask.to(parts[0].dtype))
    if bn.training:
        rows = weight_mask.sum()
        if float(rows) < 2:
            raise ValueError("BatchNorm in training needs at least 2 valid (pair, fragment) rows in a block")
        means, variances = [], []
        for part in parts:
            w = _row_weights(part, weight_mask)[..., None]
            mean = (w * part).sum(dim=(0, 1, 2)) / rows
            means.append(mean)
            variances.append((w * (part - mean).square()).sum(dim=(0, 1, 2)) / rows)
        mean, var = torch.cat(means), torch.cat(variances)
        with torch.no_grad():
            m = bn.momentum
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * rows / (rows - 1))
            bn.num_batches_tracked.add_(1)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = bn.weight / torch.sqrt(var + bn.eps)
    shift = bn.bias - mean * scale
    out, start = [], 0
    for part in parts:
        width = part.shape[-1]
        out.append(torch.addcmul(shift[start:start + width], part, scale[start:start + width]))
        start += width
    return out


# ============================================================================ the block


class RegionGRU(nn.Module):
    """The aggregator A: a bi-GRU over each pair's fused regions, [forward at the last ; backward at the first].

    The weights live in ``rnn`` (an ``nn.GRU``, gate order r, z, n), so checkpoints name them as
    PyTorch does; the recurrence runs here with a validity mask per pair (a padded region keeps the
    state: the forward pass ends on the last valid region, the backward one starts there).
    """

    def __init__(self, *, in_dim: int, hidden: int, layers: int = 1):
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.rnn = nn.GRU(in_dim, hidden, layers, batch_first=True, bidirectional=True)

    def _weights(self, layer: int, reverse: bool) -> tuple[torch.Tensor, ...]:
        s = f"_l{layer}" + ("_reverse" if reverse else "")
        return tuple(getattr(self.rnn, f"{w}{s}") for w in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))

    def _direction(self, parts: list[torch.Tensor], mask: torch.Tensor, layer: int, reverse: bool,
                   keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One direction over input ``parts`` (each (a, b, N, D_j), broadcastable to the block), mask (Ni, Nt, N).

        Returns the final state (Ni * Nt, hidden) and, with ``keep``, every step's state (Ni * Nt, N, hidden).
        """
        w_ih, b_ih, w_hh, b_hh = self._weights(layer, reverse)
        ni, nt, n = mask.shape
        pairs, hidden = ni * nt, self.hidden
        # Split W_ih by the parts' columns; a part shared by all captions or all images is projected
        # once here, a per-pair part one region step at a time below.
        pieces, start, shared, stepwise = [], 0, b_ih, []
        for part in parts:
            width = part.shape[-1]
            w = w_ih[:, start:start + width]
            start += width
            if part.shape[0] == 1 or part.shape[1] == 1:
                pieces.append(F.linear(part, w))  # (a, b, N or 1, 3H)
            else:
                stepwise.append((part, w))
        h = mask.new_zeros(pairs, hidden, dtype=w_hh.dtype)
        states = [h] * n if keep else None
        for k in (range(n - 1, -1, -1) if reverse else range(n)):
            gi = shared
            for piece in pieces:
                gi = gi + piece[:, :, k if piece.shape[2] > 1 else 0]
            for part, w in stepwise:
                gi = gi + F.linear(part[:, :, k], w)
            gi = gi.expand(ni, nt, 3 * hidden).reshape(pairs, 3 * hidden)
            gh = torch.addmm(b_hh, h, w_hh.T)
            r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
            z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
            cand = torch.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
            h = torch.where(mask[:, :, k].reshape(pairs, 1), cand + z * (h - cand), h)
            if keep:
                states[k] = h
        return h, (torch.stack(states, dim=1) if keep else None)

    def forward(self, parts: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """parts: the input's column blocks, each broadcastable to (Ni, Nt, N, D_j); mask (Ni, Nt, N) -> (Ni * Nt, 2H)."""
        ni, nt, n = mask.shape
        for layer in range(self.layers):
            keep = layer < self.layers - 1
            forward, f_states = self._direction(parts, mask, layer, reverse=False, keep=keep)
            backward, b_states = self._direction(parts, mask, layer, reverse=True, keep=keep)
            if keep:  # the next layer reads both directions' states at every region
                parts = [torch.cat([f_states, b_states], dim=-1).view(ni, nt, n, 2 * self.hidden)]
        return torch.cat([forward, backward], dim=-1)


class Readout(nn.Module):
    """The matching score of a pair's aggregate a (P, 2H) -> (P,).

    "mlp": the VQA classifier's shape, Linear -> nonlinearity -> dropout per hidden size, then a linear
    map to one logit (the answer logits become one match score); "linear_sigmoid": sigmoid(w . a + b).
    """

    def __init__(self, *, in_dim: int, kind: str, sizes: tuple[int, ...], nonlinearity: str, dropout: float,
                 pre_dropout: float):
        super().__init__()
        self.kind = kind
        self.act = NONLINEARITIES[nonlinearity]
        self.pre_dropout = nn.Dropout(pre_dropout)
        dims = [in_dim, *(sizes if kind == "mlp" else ())]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = self.pre_dropout(a)
        for layer in self.hidden:
            a = self.dropout(self.act(layer(a)))
        out = self.out(a).squeeze(-1)
        return torch.sigmoid(float32(out)) if self.kind == "linear_sigmoid" else out


class RamenFusion(nn.Module):
    """RAMEN's block and a readout: Local regions (Ni, R, F) and a Global caption vector (Nt, Dq) -> (Ni, Nt).

    Or ``x``: an Aligned block, each query fragment fused with the context attended for it.
    Parameter names follow the code: ``batch_norm_fusion``, ``mmc_layers``, ``batch_norm_mmc``,
    ``batch_norm_before_aggregation``, ``aggregator`` (the bi-GRU), then ``readout``.
    """

    def __init__(self, *, v_dim: int, q_dim: int, mmc_sizes: tuple[int, ...], nonlinearity: str = "swish",
                 connection: str = "residual", early_fusion: bool = True, late_fusion: bool = True,
                 late_batch_norm: bool = True, input_dropout: float = 0.0, mmc_dropout: float = 0.0,
                 aggregator_dim: int = 1024, aggregator_layers: int = 1, readout: str = "mlp",
                 readout_sizes: tuple[int, ...] = (2048,), readout_nonlinearity: str = "swish",
                 readout_dropout: float = 0.5, pre_readout_dropout: float = 0.0):
        super().__init__()
        self.early_fusion, self.late_fusion = early_fusion, late_fusion
        self.residual = connection == "residual"
        self.nonlinearity = nonlinearity
        self.act = NONLINEARITIES[nonlinearity]
        first = v_dim + q_dim if early_fusion else v_dim
        self.batch_norm_fusion = nn.BatchNorm1d(first)
        self.input_dropout = nn.Dropout(input_dropout)
        sizes = [first, *mmc_sizes]
        self.mmc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.mmc_dropout = nn.Dropout(mmc_dropout)
        self.batch_norm_mmc = nn.BatchNorm1d(mmc_sizes[-1])
        width = mmc_sizes[-1] + (q_dim if late_fusion else 0)
        self.batch_norm_before_aggregation = nn.BatchNorm1d(width) if late_fusion and late_batch_norm else None
        self.aggregator = RegionGRU(in_dim=width, hidden=aggregator_dim, layers=aggregator_layers)
        self.readout = Readout(in_dim=2 * aggregator_dim, kind=readout, sizes=readout_sizes,
                               nonlinearity=readout_nonlinearity, dropout=readout_dropout,
                               pre_dropout=pre_readout_dropout)

    def forward(self, x: Aligned | None = None, image: Local | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        if x is not None:
            own, own_mask = _four(x.query), _four(x.query_mask)
            other = x.attended()  # (Ni, Nt, N, Dq): the context attended for each query fragment
            ni, nt = other.shape[:2]
        else:
            own, own_mask = image.feats[:, None], image.mask[:, None]  # (Ni, 1, R, F)
            other = text[None, :, None]  # (1, Nt, 1, Dq): the caption vector, the same for every region
            ni, nt = image.feats.shape[0], text.shape[0]
        # Padded fragments hold anything: zero them so that no inf or NaN can reach a statistic or a
        # gradient through the masked rows (they are left out of both anyway).
        own = torch.where(own_mask[..., None], own, own.new_zeros(()))
        mask = own_mask.expand(ni, nt, own.shape[2])
        scores = self.block(own, other, mask)
        return scores.view(ni, nt)

    def block(self, own: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores (Ni * Nt,) from own (a, b, N, F), other (c, d, N or 1, Dq), both broadcastable to the block, mask (Ni, Nt, N)."""
        x = self.early(own, other, mask)
        for layer in self.mmc_layers[1:]:
            out = self.mmc_dropout(layer(x))
            if torch.is_grad_enabled():
                x = self.act(x + out if self.residual else out)
            else:  # scoring: in place, at most three (pair, region, H) arrays alive (x, out, a sigmoid)
                x = activate_(out.add_(x) if self.residual else out, self.nonlinearity)
        x = batch_norm_parts(self.batch_norm_mmc, [x], mask)[0]
        parts = [x, other] if self.late_fusion else [x]
        if self.batch_norm_before_aggregation is not None:
            parts = batch_norm_parts(self.batch_norm_before_aggregation, parts, mask)
        return self.readout(self.aggregator(parts, mask))

    def early(self, own: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Swish(W_1 BN([v ; q]) + b_1), the concatenation split into its parts (see the module docstring)."""
        first = self.mmc_layers[0]
        if not self.early_fusion:
            parts = [own]
        elif self.training and self.input_dropout.p > 0:
            # Dropout draws a mask per (pair, region, feature): the concatenation must exist per pair.
            ni, nt, n = mask.shape
            joint = torch.cat([own.expand(ni, nt, n, own.shape[-1]), other.expand(ni, nt, n, other.shape[-1])], -1)
            parts = [self.input_dropout(joint)]
        else:
            parts = [own, other]
        parts = batch_norm_parts(self.batch_norm_fusion, parts, mask)
        out, start = first.bias, 0
        for part in parts:
            width = part.shape[-1]
            out = out + F.linear(part, first.weight[:, start:start + width])
            start += width
        out = self.mmc_dropout(out)
        return self.act(out) if torch.is_grad_enabled() else activate_(out, self.nonlinearity)


def _four(t: torch.Tensor) -> torch.Tensor:
    """A broadcastable block tensor with its leading pair axes made explicit (4-d for features, 3-d for masks)."""
    while t.dim() < 4 and t.dtype != torch.bool:
        t = t.unsqueeze(0)
    while t.dim() < 3 and t.dtype == torch.bool:
        t = t.unsqueeze(0)
    return t
