"""A literal transcription of the parts of erobic/ramen the plugin rebuilds, for the tests' references.

Written from components/multi_modal_core.py (MultiModalCore, LinearWithDropout),
models/rnn.py (RNN), components/language_model.py (QuestionEmbedding), components/nonlinearity.py
and the classifier of models/ramen.py: one question (here: one caption vector) per row of a batch,
its vector repeated over the regions, everything flattened to (B * k) rows for the BatchNorms, the
bi-GRU unpacked. The one generalisation: ``q`` may be (B, k, Dq), a vector per region (the
cross-paper reading), where the code always repeats a (B, Dq) question.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class NormalizedSwish(nn.Module):
    def forward(self, x):
        return 1.78718727865 * (x * torch.sigmoid(x) - 0.20662096414)


ACTIVATIONS = {"swish": Swish, "normalized_swish": NormalizedSwish}


def config(**overrides) -> types.SimpleNamespace:
    """The run_network.py defaults the block reads, overridable."""
    c = dict(v_dim=2048, q_emb_dim=1024, mmc_sizes=[1024] * 4, input_dropout=0.0, mmc_dropout=0.0,
             disable_early_fusion=False, disable_late_fusion=False, disable_batch_norm_for_late_fusion=False,
             mmc_nonlinearity="swish", mmc_connection="residual", mmc_aggregator_dim=1024, mmc_aggregator_layers=1)
    c.update(overrides)
    return types.SimpleNamespace(**c)


class LinearWithDropout(nn.Module):
    def __init__(self, n_in, n_out, p):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.p = p
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        y = self.linear(x)
        return self.dropout(y) if self.p > 0 else y


class RNN(nn.Module):
    """models/rnn.py: a batch-first bi-GRU from a zero state; [forward output at the end ; backward at t = 0]."""

    def __init__(self, in_dim, hidden, layers):
        super().__init__()
        self.rnn = nn.GRU(in_dim, hidden, layers, bidirectional=True, batch_first=True)
        self.hidden, self.layers = hidden, layers

    def forward(self, x):
        h0 = x.new_zeros(2 * self.layers, x.shape[0], self.hidden)
        out, _ = self.rnn(x, h0)
        return torch.cat([out[:, -1, :self.hidden], out[:, 0, self.hidden:]], dim=1)


class MultiModalCore(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.input_dropout = nn.Dropout(c.input_dropout)
        layers = []
        for ix, out_s in enumerate(c.mmc_sizes):
            if ix == 0:
                in_s = c.v_dim if c.disable_early_fusion else c.v_dim + c.q_emb_dim
                self.batch_norm_fusion = nn.BatchNorm1d(in_s)
            else:
                in_s = c.mmc_sizes[ix - 1]
            layers += [LinearWithDropout(in_s, out_s, c.mmc_dropout), ACTIVATIONS[c.mmc_nonlinearity]()]
        self.mmc_layers = nn.ModuleList(layers)
        self.batch_norm_mmc = nn.BatchNorm1d(c.mmc_sizes[-1])
        out_s = c.mmc_sizes[-1]
        if not c.disable_late_fusion:
            out_s += c.q_emb_dim
            if not c.disable_batch_norm_for_late_fusion:
                self.batch_norm_before_aggregation = nn.BatchNorm1d(out_s)
        self.aggregator = RNN(out_s, c.mmc_aggregator_dim, c.mmc_aggregator_layers)

    def forward(self, v, q):
        k = v.shape[1]
        q = q.unsqueeze(1).repeat(1, k, 1) if q.dim() == 2 else q
        x = v if self.c.disable_early_fusion else torch.cat([v, q], dim=2)
        x = self.input_dropout(x)
        width = x.shape[2]
        x = self.batch_norm_fusion(x.reshape(-1, width)).view(-1, k, width)
        linear_ix = -1
        for layer in self.mmc_layers:
            if isinstance(layer, LinearWithDropout):
                linear_ix += 1
                y = layer(x)
                x = x + y if linear_ix > 0 and self.c.mmc_connection == "residual" else y
            else:
                x = layer(x)
        size = self.c.mmc_sizes[-1]
        x = self.batch_norm_mmc(x.reshape(-1, size)).view(-1, k, size)
        if not self.c.disable_late_fusion:
            x = torch.cat([x, q], dim=2)
            if not self.c.disable_batch_norm_for_late_fusion:
                width = x.shape[2]
                x = self.batch_norm_before_aggregation(x.reshape(-1, width)).view(-1, k, width)
        # The code returns its aggregate only inside the late-fusion branch (it fails without it);
        # the plugin's reading of that option: the bi-GRU runs over the projection alone.
        return self.aggregator(x)


class Classifier(nn.Module):
    """models/ramen.py's head with one output: [Linear, activation, dropout] per size, then Linear."""

    def __init__(self, in_dim, sizes, activation, dropout, pre_dropout):
        super().__init__()
        self.pre = nn.Dropout(pre_dropout)
        mods, prev = [], in_dim
        for s in sizes:
            mods += [nn.Linear(prev, s), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            prev = s
        self.layers = nn.Sequential(*mods)
        self.classifier = nn.Linear(prev, 1)

    def forward(self, a):
        return self.classifier(self.layers(self.pre(a))).squeeze(-1)


class QuestionEmbedding(nn.Module):
    """language_model.py: unpacked bi-GRU, hidden = width / 2; [forward at the end ; backward at t = 0]."""

    def __init__(self, in_dim, width):
        super().__init__()
        self.hidden = width // 2
        self.rnn = nn.GRU(in_dim, self.hidden, 1, bidirectional=True, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(x, x.new_zeros(2, x.shape[0], self.hidden))
        return torch.cat([out[:, -1, :self.hidden], out[:, 0, self.hidden:]], dim=1)


def load_from(core: MultiModalCore, clf: Classifier | None, ours) -> None:
    """Copy a RamenFusion's weights into the transcription (names differ only in the layer lists)."""
    with torch.no_grad():
        for i, layer in enumerate(ours.mmc_layers):
            core.mmc_layers[2 * i].linear.load_state_dict(layer.state_dict())
        for name in ("batch_norm_fusion", "batch_norm_mmc", "batch_norm_before_aggregation"):
            mine = getattr(ours, name)
            if mine is not None:
                getattr(core, name).load_state_dict(mine.state_dict())
        core.aggregator.rnn.load_state_dict(ours.aggregator.rnn.state_dict())
        if clf is not None:
            for i, layer in enumerate(ours.readout.hidden):
                clf.layers[3 * i].load_state_dict(layer.state_dict())
            clf.classifier.load_state_dict(ours.readout.out.state_dict())
