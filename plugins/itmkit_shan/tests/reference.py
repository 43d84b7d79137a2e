"""A slow reference of SHAN written literally from the paper's equations: one pair at a time, one fragment at a time.

Each function takes ONE image's valid regions V (k, D) and ONE caption's valid words T (n, D) (no
padding anywhere) and the weights of a built module, and follows eq. 3-16 of Ji, Chen & Wang 2021
line by line. The tests compare the vectorised block forward with it in float64.
"""

from __future__ import annotations

import torch


def cos(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (a @ b) / torch.clamp(a.norm() * b.norm(), min=eps)


def softmax(values: list[torch.Tensor]) -> torch.Tensor:
    x = torch.stack(values)
    e = torch.exp(x - x.max())
    return e / e.sum()


def fuse_and_pool(fusion, queries: torch.Tensor, attended: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 8-9: g = sigmoid(W_g cat(q, a) + b_g), q^c = g * q + (1 - g) * a; gamma = softmax(w^ q^c); sum gamma q^c."""
    fused = []
    for q, a in zip(queries, attended):
        g = torch.sigmoid(fusion.gate.weight @ torch.cat([q, a]) + fusion.gate.bias)
        fused.append(g * q + (1 - g) * a)
    gamma = softmax([fusion.pool.weight[0] @ f for f in fused])
    return sum(w * f for w, f in zip(gamma, fused))


def global_steps(v_c, t_c, V, T, *, image_queries: bool, text_queries: bool, mu2: float, temperature: float = 1.0,
                 g2l: bool = True, g2g: bool = True) -> torch.Tensor:
    """Eq. 10-15 for one pair: S_G2L + S_G2G."""
    terms, v_g, t_g = [], v_c, t_c
    if image_queries:
        alpha = softmax([cos(v_c, t) / temperature for t in T])  # eq. 10
        t_star_c = sum(a * t for a, t in zip(alpha, T))
        terms.append(("v", cos(v_c, t_star_c)))  # eq. 12
        v_g = v_c + t_star_c  # eq. 14
    if text_queries:
        beta = softmax([cos(t_c, v) / temperature for v in V])  # eq. 11
        v_star_c = sum(b * v for b, v in zip(beta, V))
        terms.append(("t", cos(t_c, v_star_c)))
        t_g = t_c + v_star_c
    score = torch.zeros((), dtype=V.dtype)
    if g2l:
        if len(terms) == 2:
            score = score + mu2 * terms[0][1] + (1 - mu2) * terms[1][1]  # eq. 13
        else:
            score = score + terms[0][1]
    if g2g:
        score = score + cos(v_g, t_g)  # eq. 15
    return score


def shan_pair(module, V: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """S(I, T) of eq. 16 for one pair, from the module's weights and settings."""
    k, n = V.shape[0], T.shape[0]
    pv = [module.affinity_image.weight @ v for v in V]  # W~_v v_i
    pt = [module.affinity_text.weight @ t for t in T]
    if module.normalize_affinity:
        pv = [p / (p.norm() + 1e-8) for p in pv]
        pt = [p / (p.norm() + 1e-8) for p in pt]
    A = torch.stack([torch.stack([pv[i] @ pt[j] for j in range(n)]) for i in range(k)])  # eq. 3
    lam = module.lambda_softmax
    mean_pool = module.l2l_pool == "mean"
    l2l, v_c, t_c = [], None, None
    if module.image_queries:
        t_star = []
        for i in range(k):  # eq. 4
            alpha = softmax([lam * A[i, j] for j in range(n)])
            t_star.append(sum(alpha[j] * T[j] for j in range(n)))
        r_v = sum(cos(V[i], t_star[i]) for i in range(k))  # eq. 6, 7
        l2l.append(r_v / k if mean_pool else r_v)
        if module.image_fusion is not None:
            v_c = fuse_and_pool(module.image_fusion, V, t_star)
    if module.text_queries:
        v_star = []
        for j in range(n):  # eq. 5
            beta = softmax([lam * A[i, j] for i in range(k)])
            v_star.append(sum(beta[i] * V[i] for i in range(k)))
        r_t = sum(cos(T[j], v_star[j]) for j in range(n))
        l2l.append(r_t / n if mean_pool else r_t)
        if module.text_fusion is not None:
            t_c = fuse_and_pool(module.text_fusion, T, v_star)
    score = module.mu1 * l2l[0] + (1 - module.mu1) * l2l[1] if len(l2l) == 2 else l2l[0]
    if module.steps == "l2l":
        return score
    if v_c is None:  # SHAN-T2I: the image's global vector is the mean of its regions (Sec. 4.2)
        v_c = V.mean(dim=0)
    if t_c is None:
        t_c = T.mean(dim=0)
    return score + global_steps(v_c, t_c, V, T, image_queries=module.image_queries,
                                text_queries=module.text_queries, mu2=module.mu2,
                                temperature=module.g2l_temperature, g2g=module.steps == "l2l+g2l+g2g")
