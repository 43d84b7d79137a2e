"""Slow references of the official PFAN computations, one region / one pair at a time, in float64.

Written from the equations (and the official code's behaviour), with explicit loops; the
state dicts use the official key names (``fc``, ``fc_att``, ``position_embedding``).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def encode_region(sd: dict[str, torch.Tensor], f: torch.Tensor, row: torch.Tensor, top: int = 15) -> torch.Tensor:
    """beta = softmax(tanh(<W_att f, P_k>)), w = softmax(omega * beta), v = l2norm(W [f ; sum_k w_k P_k] + b)."""
    f = f.double()
    idx = [int(v) for v in row[:top]]
    omega = [float(v) for v in row[top:]]
    table = sd["position_embedding.weight"].double()
    q = sd["fc_att.weight"].double() @ f + sd["fc_att.bias"].double()
    scores = [math.tanh(float(q @ table[i])) for i in idx]
    beta = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    mixed = [o * b for o, b in zip(omega, beta)]
    w = [math.exp(m) / sum(math.exp(t) for t in mixed) for m in mixed]
    p = sum(wk * table[i] for wk, i in zip(w, idx))
    v = sd["fc.weight"].double() @ torch.cat([f, p]) + sd["fc.bias"].double()
    return v / (v.norm() + 1e-8)


def encode_images(sd: dict[str, torch.Tensor], feats: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """(B, R, F) features and (B, R, 30) PFAN layout -> (B, R, E) region embeddings."""
    return torch.stack([torch.stack([encode_region(sd, feats[b, r], layout[b, r]) for r in range(feats.shape[1])])
                        for b in range(feats.shape[0])])


def _attend(query: torch.Tensor, context: torch.Tensor, lam: float) -> torch.Tensor:
    """SCAN attention (clipped_l2norm): weights (Lq, Lc), normalised over the queries, softmax over the context."""
    raw = context @ query.T  # (Lc, Lq)
    raw = torch.where(raw > 0, raw, 0.1 * raw)
    raw = raw / (raw.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)
    return torch.softmax(lam * raw.T, dim=1)  # (Lq, Lc)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / max(float(a.norm() * b.norm()), 1e-8)


@torch.no_grad()
def t2i_scores(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, lam: float) -> torch.Tensor:
    """mean_t cos(e_t, a_t) + 0.5 * mean_t max_r alpha_tr (official xattn_score_t2i with agg_func=Mean)."""
    out = torch.zeros(images.shape[0], captions.shape[0], dtype=torch.float64)
    for j in range(captions.shape[0]):
        words = captions[j, : int(lengths[j])].double()
        for i in range(images.shape[0]):
            regions = images[i].double()
            alpha = _attend(words, regions, lam)
            rel = [_cos(words[t], alpha[t] @ regions) for t in range(words.shape[0])]
            peak = [float(alpha[t].max()) for t in range(words.shape[0])]
            out[i, j] = sum(rel) / len(rel) + 0.5 * sum(peak) / len(peak)
    return out


@torch.no_grad()
def i2t_scores(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, lam: float) -> torch.Tensor:
    """mean_r cos(v_r, a_r) (official xattn_score_i2t with agg_func=Mean; no max term)."""
    out = torch.zeros(images.shape[0], captions.shape[0], dtype=torch.float64)
    for j in range(captions.shape[0]):
        words = captions[j, : int(lengths[j])].double()
        for i in range(images.shape[0]):
            regions = images[i].double()
            alpha = _attend(regions, words, lam)
            rel = [_cos(regions[r], alpha[r] @ words) for r in range(regions.shape[0])]
            out[i, j] = sum(rel) / len(rel)
    return out
