"""Gated mean pooling: each fragment is weighted by a learned sigmoid gate before averaging."""

from __future__ import annotations

import attrs
import torch
from torch import nn

import itmkit
from itmkit.ops import l2norm
from itmkit.types import GlobalPort, Local, LocalPort


class GatedMeanPool(nn.Module):
    """g_i = sigmoid(w . v_i + b);  v = sum_i g_i v_i / sum_i g_i over the valid fragments."""

    def __init__(self, *, dim: int, normalize: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, 1)
        self.normalize = normalize

    def forward(self, x: Local) -> torch.Tensor:
        gates = torch.sigmoid(self.gate(x.feats)) * x.mask.unsqueeze(-1)  # (B, N, 1), 0 on padding
        # A sigmoid gate is > 0, so any item with one valid fragment has a positive total.
        pooled = (gates * x.feats).sum(dim=1) / gates.sum(dim=1).clamp(min=1e-8)  # (B, D)
        return l2norm(pooled) if self.normalize else pooled


@attrs.frozen(kw_only=True)
class GatedMean(itmkit.Stage):
    """Weighted mean of the valid fragments, each weighted by a learned sigmoid gate."""

    name = "hello.gated_mean"
    kind = "aggregator"
    paper = "example stage; no paper"

    normalize: bool = itmkit.param(True, "l2-normalise the pooled vector")

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return GatedMeanPool(dim=x.dim, normalize=self.normalize)
