"""A literal plain-torch reference of the official MTFN model (Wangt-CN/MTFN-RR-PyTorch-Code), written from
its model.py (FusionNoAtt, Core_Fusion, _classif), data.py (the tokenisation and the zero padding) and the
skip-thoughts BayesianUniSkip / BayesianGRUCell / SequentialDropout it imports, for tests only.

Loops over r and over time steps as the official code runs them; nothing here is vectorised for speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from itmkit.data.vocab import tokenize

PUNCTUATION = [",", ".", ":", ";", "?", "(", ")", "[", "]", "&", "!", "*", "@", "#", "$", "%"]


class GRUCell(nn.Module):
    """BayesianGRUCell: input Linears with bias, hidden Linears without; per-gate masks given explicitly."""

    def __init__(self, word_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        for gate in "rin":
            setattr(self, f"weight_i{gate}", nn.Linear(word_dim, hidden, bias=True))
            setattr(self, f"weight_h{gate}", nn.Linear(hidden, hidden, bias=False))

    def forward(self, x, h, masks=None):
        m = masks or {}
        xr, xi, xn = (x * m.get(f"x{g}", 1) for g in "rin")
        hr, hi, hn = (h * m.get(f"h{g}", 1) for g in "rin")
        r = torch.sigmoid(self.weight_ir(xr) + self.weight_hr(hr))
        i = torch.sigmoid(self.weight_ii(xi) + self.weight_hi(hi))
        n = torch.tanh(self.weight_in(xn) + r * self.weight_hn(hn))
        return (1 - i) * n + i * h


class RNN(nn.Module):
    def __init__(self, word_dim, hidden):
        super().__init__()
        self.gru_cell = GRUCell(word_dim, hidden)


class UniSkip(nn.Module):
    """BayesianUniSkip.forward: lengths from the zero padding, max_length steps, the state at length - 1."""

    def __init__(self, vocab_rows: int, word_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(vocab_rows, word_dim, padding_idx=0)
        self.rnn = RNN(word_dim, hidden)

    def forward(self, ids: torch.Tensor, masks=None) -> torch.Tensor:
        lengths = [ids.shape[1] - int((row == 0).sum()) for row in ids]  # _process_lengths
        x = self.embedding(ids)
        h = x.new_zeros(len(ids), self.hidden)
        outputs = []
        for t in range(max(lengths)):
            h = self.rnn.gru_cell(x[:, t], h, masks)
            outputs.append(h)
        out = torch.stack(outputs, 1)
        return torch.stack([out[b, lengths[b] - 1] for b in range(len(ids))])  # _select_last


class CoreFusion(nn.Module):
    def __init__(self, o: dict):
        super().__init__()
        self.o = o
        self.linear_v = nn.Linear(o["dim_v"], o["dim_hv"])
        self.linear_t = nn.Linear(o["dim_t"], o["dim_ht"])
        self.list_linear_hv = nn.ModuleList([nn.Linear(o["dim_hv"], o["dim_mm"]) for _ in range(o["R"])])
        self.list_linear_ht = nn.ModuleList([nn.Linear(o["dim_ht"], o["dim_mm"]) for _ in range(o["R"])])

    def forward(self, v, t):
        o = self.o
        x_v = self.linear_v(F.dropout(v, o["dropout_v"], self.training))
        if "activation_v" in o:
            x_v = getattr(F, o["activation_v"])(x_v)
        x_t = self.linear_t(F.dropout(t, o["dropout_t"], self.training))
        if "activation_t" in o:
            x_t = getattr(F, o["activation_t"])(x_t)
        x_mm = []
        for i in range(o["R"]):
            hv = self.list_linear_hv[i](F.dropout(x_v, o["dropout_hv"], self.training))
            if "activation_hv" in o:
                hv = getattr(F, o["activation_hv"])(hv)
            ht = self.list_linear_ht[i](F.dropout(x_t, o["dropout_ht"], self.training))
            if "activation_ht" in o:
                ht = getattr(F, o["activation_ht"])(ht)
            x_mm.append(torch.mul(hv[:, None, :], ht[None, :, :]))
        x_mm = torch.stack(x_mm, dim=1).sum(1)
        if "activation_mm" in o:
            x_mm = getattr(F, o["activation_mm"])(x_mm)
        return x_mm


class FusionNoAtt(nn.Module):
    """model.py's FusionNoAtt: seq2vec, the region mean, Core_Fusion, _classif."""

    def __init__(self, options: dict, vocab_rows: int, word_dim: int = 620):
        super().__init__()
        self.opt = options
        self.seq2vec = UniSkip(vocab_rows, word_dim, options["fusion"]["dim_t"])
        self.linear_classif = nn.Linear(options["fusion"]["dim_mm"], 1)
        self.fusion = CoreFusion(options["fusion"])

    def classif(self, x):
        c = self.opt["classif"]
        if "activation" in c:
            x = getattr(F, c["activation"])(x)
        x = F.dropout(x, c["dropout"], self.training)
        return torch.sigmoid(self.linear_classif(x)).view(x.shape[0], x.shape[1])

    def score_vectors(self, v, t):
        return self.classif(self.fusion(v, t))

    def forward(self, regions, ids):
        return self.score_vectors(regions.mean(1), self.seq2vec(ids))


def caption_ids(caption: str, word2idx: dict[str, int]) -> list[int]:
    """data.py's __getitem__: lower case, NLTK tokens, punctuation dropped, unknown words <unk>."""
    tokens = [k for k in tokenize(caption) if k not in PUNCTUATION]
    return [word2idx.get(k, word2idx["<unk>"]) for k in tokens]


def collate(captions: list[list[int]]) -> torch.Tensor:
    """data.py's collate_fn: zero padding to the longest."""
    out = torch.zeros(len(captions), max(len(c) for c in captions), dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out


def yaml_options(dim_v: int, dim_t: int, dim_h: int, dim_mm: int, rank: int, **fusion) -> dict:
    """option/FusionNoattn_baseline.yaml's 'model' part, sized for tests (extra fusion keys override)."""
    f = {"dim_v": dim_v, "dim_t": dim_t, "dim_hv": dim_h, "dim_ht": dim_h, "dim_mm": dim_mm, "R": rank,
         "dropout_v": 0.25, "dropout_t": 0.25, "activation_v": "tanh", "activation_t": "tanh", "dropout_hv": 0,
         "dropout_ht": 0}
    f.update(fusion)
    f = {k: v for k, v in f.items() if v is not None}
    return {"dim_v": dim_v, "dim_t": dim_t,
            "seq2vec": {"arch": "skipthoughts", "dir_st": "/data/skip-thoughts", "type": "BayesianUniSkip",
                        "dropout": 0.25, "fixed_emb": False},
            "fusion": f, "classif": {"dropout": 0}}


def random_model(model_options: dict, vocab_rows: int, word_dim: int, seed: int) -> FusionNoAtt:
    torch.manual_seed(seed)
    model = FusionNoAtt(model_options, vocab_rows, word_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.3, 0.3)
        model.seq2vec.embedding.weight[0].zero_()
    model.opt["fusion"]["dim_h"] = model.opt["fusion"]["dim_mm"]  # FusionNoAtt.__init__ adds it
    return model.eval()


def save(model: FusionNoAtt, path: Path, data_name: str = "flickr30k_splits", state: dict | None = None,
         **entries) -> Path:
    """torch.save of train.py's checkpoint dict."""
    opt = argparse.Namespace(data_path="/data/f30k_precomp", path_opt="option/FusionNoattn_baseline.yaml",
                             data_name=data_name, logger_name="./log_2", vocab_path="vocab", model_name="runs",
                             num_epochs=120, batch_size=128, workers=2, resume="", lr_update=20, vocab_size=0)
    options = {"logs": {"dir_logs": "logs"}, "coco": {}, "model": model.opt, "optim": {"lr": 1e-4,
                                                                                         "batch_size": 100,
                                                                                         "epochs": 160}}
    record = {"epoch": 37, "arch": "baseline", "model": model.state_dict() if state is None else state,
              "best_rsum": 512.3, "opt": opt, "options": options, "Eiters": 4321}
    record.update(entries)
    torch.save(record, path)
    return path


def calcul_loss(scores: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """utils.calcul_loss: the hardest negative of each row (captions) and column (images), summed."""
    diagonal = scores.diag().view(len(scores), 1)
    cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(len(scores), dtype=torch.bool)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()
