"""SHAN's three alignment steps as plain modules, vectorised over a block of Ni images x Nt captions.

Ji, Chen & Wang, "Step-wise Hierarchical Alignment Network for Image-Text Matching", IJCAI 2021
(arXiv 2106.06509), Sec. 3.2. Shapes: V (Ni, k, D) regions, T (Nt, n, D) words, per pair (i, t):

    step 1, L2L (eq. 3-7)   A = (V W~_v^T)(T W~_t^T)^T                              (k, n)
                            alpha = softmax_words(lambda A),  t*_r = sum_j alpha_rj t_j
                            beta  = softmax_regions(lambda A), v*_j = sum_r beta_rj v_r
                            S_L2L = mu1 sum_r cos(v_r, t*_r) + (1 - mu1) sum_j cos(t_j, v*_j)
    step 2, G2L (eq. 8-13)  g_r = sigmoid(W_g [v_r; t*_r] + b_g),  v^c_r = g_r v_r + (1 - g_r) t*_r
                            v_c = softmax_r(w^_v . v^c_r) V^c  (t_c likewise from t_j, v*_j)
                            t*_c = sum_j softmax_j(cos(v_c, t_j)) t_j,  v*_c = sum_r softmax_r(cos(t_c, v_r)) v_r
                            S_G2L = mu2 cos(v_c, t*_c) + (1 - mu2) cos(t_c, v*_c)
    step 3, G2G (eq. 14-15) S_G2G = cos(v_c + t*_c, t_c + v*_c)
    S = S_L2L + S_G2L + S_G2G                                                          (eq. 16)

What is computed once per item and what once per pair: the projections W~ V, W~ T, both halves
of the gate, W_g [v; t*] = W_g^v v + W_g^t t*, and the pool's projection are per item, because
t*_r = alpha_r T makes W_g^t t*_r = alpha_r (T W_g^t^T): no D x D product per pair. Per pair there
are the (k, n) affinities and their two softmaxes; with the scalar gate (the paper's "g in [0, 1]
is a gate value", the default) everything else is linear in the attended vectors, so they are
never built (``attend_and_fuse``) and a pair costs O(k n + (k + n) D); a vector gate builds the
attended and fused fragments, (k + n) x D per pair. Padding is masked (zeroed fragments, masked
softmaxes, masked pools), so a caption scored in a block gets the score it gets alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itmkit.attention import masked_softmax
from itmkit.explain import note_attention
from itmkit.ops import EPS, float32, l2norm, masked_mean, xavier_linear_
from itmkit.types import Local

VARIANTS = ("full", "t2i", "i2t")
STEPS = ("l2l", "l2l+g2l", "l2l+g2l+g2g")
GLOBAL_STEPS = ("g2l+g2g", "g2l", "g2g")
L2L_POOLS = ("sum", "mean")
GATES = ("vector", "scalar")


def sides(variant: str) -> tuple[bool, bool]:
    """(regions are queries, words are queries) of a variant (paper Sec. 4.2).

    full: both directions. t2i: the hierarchy runs text-to-image only: words query the regions
    (beta, v*_j), the words are fused and pooled into t_c, t_c queries the regions. i2t: the mirror.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant in ("full", "i2t"), variant in ("full", "t2i")


def _cos(a: torch.Tensor, b: torch.Tensor, dots: torch.Tensor, eps: float) -> torch.Tensor:
    """cos from precomputed dots: dots / max(|a| |b|, eps) (SCAN's cosine_similarity floor), in float32."""
    a, b, dots = float32(a), float32(b), float32(dots)
    return dots / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=eps)


def _balance(first: torch.Tensor | None, second: torch.Tensor | None, mu: float) -> torch.Tensor:
    """mu * first + (1 - mu) * second; a variant with one direction keeps that term alone (ASSUMPTION)."""
    if first is not None and second is not None:
        return mu * first + (1 - mu) * second
    return first if first is not None else second


# =========================================================================== step 2 + 3


def global_alignment(
    v_c: torch.Tensor,
    t_c: torch.Tensor,
    image: Local,
    text: Local,
    *,
    image_queries: bool,
    text_queries: bool,
    mu2: float,
    temperature: float = 1.0,
    g2l: bool = True,
    g2g: bool = True,
    eps: float = EPS,
) -> torch.Tensor:
    """Context-level G2L (eq. 10-13) and G2G (eq. 14-15) of every pair: S_G2L + S_G2G, (Ni, Nt).

    ``v_c`` (Ni, Nt, D) or (Ni, 1, D) and ``t_c`` (Ni, Nt, D) or (1, Nt, D): the global context
    vectors (per pair after step 2's fusion, per item when a tower's pool stands in for them);
    ``image`` / ``text``: the fragments V, T with padding zeroed. ``image_queries``: v_c attends
    over the words (t*_c, the Rv term, v_g = v_c + t*_c); otherwise v_g = v_c. ``text_queries``
    likewise for t_c over the regions. Softmax logits are cos / ``temperature`` (paper: 1).
    """
    ni, nt = image.feats.shape[0], text.feats.shape[0]
    v_c, t_c = v_c.expand(ni, nt, -1), t_c.expand(ni, nt, -1)
    v_g, t_g, g2l_terms = v_c, t_c, []
    if image_queries:  # eq. 10: the image's context attends over the caption's words
        dots = torch.einsum("itd,tjd->itj", v_c, text.feats)  # (Ni, Nt, n)
        weights = masked_softmax(_cos(v_c[:, :, None], text.feats[None], dots, eps) / temperature, text.mask[None])
        attended = torch.einsum("itj,tjd->itd", weights, text.feats)  # t*_c (Ni, Nt, D)
        g2l_terms.append(_cosine_rows(v_c, attended, eps) if g2l else None)
        v_g = v_c + attended
    else:
        g2l_terms.append(None)
    if text_queries:  # eq. 11: the caption's context attends over the image's regions
        dots = torch.einsum("itd,ird->itr", t_c, image.feats)  # (Ni, Nt, k)
        weights = masked_softmax(_cos(t_c[:, :, None], image.feats[:, None], dots, eps) / temperature,
                                 image.mask[:, None])
        attended = torch.einsum("itr,ird->itd", weights, image.feats)  # v*_c (Ni, Nt, D)
        g2l_terms.append(_cosine_rows(t_c, attended, eps) if g2l else None)
        t_g = t_c + attended
    else:
        g2l_terms.append(None)
    score = v_c.new_zeros(ni, nt)
    if g2l:
        score = score + _balance(*g2l_terms, mu2)  # eq. 13
    if g2g:
        score = score + _cosine_rows(v_g, t_g, eps)  # eq. 14-15
    return score


def _cosine_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    a, b = float32(a), float32(b)  # the norms in float32 under mixed precision
    return (a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=eps)


# =========================================================================== step 1 + fusion


class ContextFusion(nn.Module):
    """Eq. 8-9 for one side: gate each fragment with its attended context, then attention-pool.

    ``gate``: W_g [q; a] + b_g as one Linear(2D, 1) (a scalar gate, the paper's "gate value") or
    Linear(2D, D) (a vector gate); separate weights per side (ASSUMPTION); ``pool``: w^ of eq. 9, Linear(D, 1) without bias (a bias cancels in the softmax).
    """

    def __init__(self, *, dim: int, gate: str):
        super().__init__()
        self.dim = dim
        self.scalar = gate == "scalar"
        self.gate = nn.Linear(2 * dim, dim if gate == "vector" else 1)
        self.pool = nn.Linear(dim, 1, bias=False)
        xavier_linear_(self.gate)
        xavier_linear_(self.pool)

    def query_gate(self, query: torch.Tensor) -> torch.Tensor:
        """W_g^q q + b_g per item (the query half of the concatenation)."""
        return F.linear(query, self.gate.weight[:, : self.dim], self.gate.bias)

    def context_gate(self, context: torch.Tensor) -> torch.Tensor:
        """W_g^a c per item (the attended half; alpha (W_g^a C) = W_g^a (alpha C))."""
        return F.linear(context, self.gate.weight[:, self.dim:])


def attend_and_fuse(
    weights: torch.Tensor,
    query: Local,
    context: Local,
    *,
    query_side: str,
    fusion: ContextFusion | None,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One direction of step 1 and that side's step 2 fusion, for every pair of the block.

    ``weights`` (Ni, Nt, Lq, Lc): each query fragment's attention over the other side's fragments
    (rows of padded queries are ignored); query / context: V and T with padding zeroed, ``query_side``
    "image" (regions query words) or "text". Returns the fragment-level cosines (Ni, Nt, Lq) of eq. 6
    and, with ``fusion``, the pooled context vector (Ni, Nt, D) of eq. 8-9 (else None).

    Without a fusion, or with a scalar gate, the attended vectors a_q = w_q C are never built:
    cos(q, a_q) = w_q (C q) / (|q| sqrt(w_q G w_q^T)) with G the context's Gram matrix (as
    ``core.cosine``'s aligned_cosine), and with one gate value g_q per fragment everything of eq. 8-9
    is linear in a_q: g_q = sigmoid(W_g^q q + w_q (C W_g^a) + b), w^ . q^c = g_q (w^ . q) + (1 - g_q)
    w_q (C w^), and the pooled vector sum_q gamma_q q^c = (gamma g)^T Q + (sum_q gamma_q (1 - g_q) w_q) C.
    Per pair that is O(Lq Lc) numbers and two (L, D) products, no (Lq, D) array. A vector gate needs
    the attended vectors themselves (Lq x D per pair).
    """
    item = "i" if query_side == "image" else "t"  # the query's item axis; the context's is the other
    other = "t" if item == "i" else "i"
    q = query.feats[:, None] if item == "i" else query.feats[None]  # (Ni, 1, Lq, D) or (1, Nt, Lq, D)
    q_mask = query.mask[:, None] if item == "i" else query.mask[None]
    mix = f"itqc,{other}cd->itqd"  # weights x one item's context rows
    if fusion is None or fusion.scalar:
        dots = torch.einsum(f"{item}qd,{other}cd->itqc", query.feats, context.feats)  # <q, c> (Ni, Nt, Lq, Lc)
        numerator = (weights * dots).sum(-1)
        del dots
        gram = context.feats @ context.feats.transpose(1, 2)  # (Nc, Lc, Lc), per item
        # w G w^T, floored at the smallest normal float: an attended vector that is exactly 0 (all the
        # weight on a zero fragment) would give sqrt an infinite derivative, NaN through 0 x inf; the
        # value is unchanged, as the norm product is floored at eps below anyway
        attended_sq = (torch.einsum(mix, weights, gram) * weights).sum(-1).clamp(min=torch.finfo(gram.dtype).tiny)
        norms = torch.linalg.vector_norm(float32(q), dim=-1) * float32(attended_sq).sqrt()
        cosines = numerator / norms.clamp(min=eps)
        if fusion is None:
            return cosines, None
        on_context = f"itqc,{other}c->itq"  # weights x one number per context fragment
        gate = torch.sigmoid(fusion.query_gate(q)[..., 0]
                             + torch.einsum(on_context, weights, fusion.context_gate(context.feats)[..., 0]))
        own = fusion.pool(q)[..., 0]  # w^ . q, per item
        logits = gate * own + (1 - gate) * torch.einsum(on_context, weights, fusion.pool(context.feats)[..., 0])
        gamma = masked_softmax(logits, q_mask)  # eq. 9
        on_context_rows = torch.einsum("itq,itqc->itc", gamma * (1 - gate), weights)  # (Ni, Nt, Lc)
        pooled = (torch.einsum(f"itq,{item}qd->itd", gamma * gate, query.feats)
                  + torch.einsum(f"itc,{other}cd->itd", on_context_rows, context.feats))
        return cosines, pooled
    in_place = not torch.is_grad_enabled()  # scoring: no graph needs the overwritten values
    attended = torch.einsum(mix, weights, context.feats)  # t*_r or v*_j (Ni, Nt, Lq, D)
    cosines = _cos(q, attended, torch.einsum(f"{item}qd,itqd->itq", query.feats, attended), eps)  # eq. 6
    gate = torch.einsum(mix, weights, fusion.context_gate(context.feats))  # W_g^a a, (Ni, Nt, Lq, D)
    gate = gate.add_(fusion.query_gate(q)).sigmoid_() if in_place else torch.sigmoid(gate + fusion.query_gate(q))
    # eq. 8: fused = g q + (1 - g) a = q - (1 - g)(q - a), computed in the two (Lq, D) buffers
    diff = attended.neg_().add_(q) if in_place else q - attended
    fused = diff.mul_(gate.sub_(1)).add_(q) if in_place else q - (1 - gate) * diff  # (g - 1)(q - a) + q
    del diff, attended, gate
    gamma = masked_softmax(fusion.pool(fused).squeeze(-1), q_mask)  # (Ni, Nt, Lq), eq. 9
    return cosines, torch.einsum("itq,itqd->itd", gamma, fused)


def pool_l2l(cosines: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Eq. 7's sum over the valid fragments (as printed) or their mean (as the text says)."""
    total = (cosines * mask).sum(-1)
    return total if how == "sum" else total / mask.sum(-1).clamp(min=1)


class StepwiseHierarchy(nn.Module):
    """SHAN's score S = S_L2L + S_G2L + S_G2G for every image x caption pair of a block (eq. 3-16).

    image: Local (Ni, k, D) regions; text: Local (Nt, n, D) words; returns (Ni, Nt).
    """

    def __init__(self, *, dim: int, variant: str = "full", steps: str = "l2l+g2l+g2g", lambda_softmax: float = 15.0,
                 mu1: float = 0.3, mu2: float = 0.5, l2l_pool: str = "sum", normalize_affinity: bool = True,
                 g2l_temperature: float = 1.0, gate: str = "vector", eps: float = EPS):
        super().__init__()
        if steps not in STEPS:
            raise ValueError(f"steps must be one of {STEPS}, got {steps!r}")
        self.image_queries, self.text_queries = sides(variant)
        self.steps, self.lambda_softmax, self.mu1, self.mu2 = steps, lambda_softmax, mu1, mu2
        self.l2l_pool, self.normalize_affinity, self.g2l_temperature, self.eps = (l2l_pool, normalize_affinity,
                                                                                  g2l_temperature, eps)
        self.affinity_image = nn.Linear(dim, dim, bias=False)  # W~_v of eq. 3
        self.affinity_text = nn.Linear(dim, dim, bias=False)  # W~_t
        xavier_linear_(self.affinity_image)
        xavier_linear_(self.affinity_text)
        fuse = steps != "l2l"
        self.image_fusion = ContextFusion(dim=dim, gate=gate) if fuse and self.image_queries else None
        self.text_fusion = ContextFusion(dim=dim, gate=gate) if fuse and self.text_queries else None

    def affinity(self, image: Local, text: Local) -> torch.Tensor:
        """lambda * A (Ni, Nt, k, n), eq. 3 (on l2-normalised projections with ``normalize_affinity``)."""
        pv, pt = self.affinity_image(image.feats), self.affinity_text(text.feats)
        if self.normalize_affinity:
            pv, pt = l2norm(pv, eps=self.eps), l2norm(pt, eps=self.eps)
        ni, k, d = pv.shape
        nt, n, _ = pt.shape
        # one GEMM over all fragments of the block, viewed as (Ni, k, Nt, n) then permuted (no copy)
        dots = (pv.reshape(ni * k, d) @ pt.reshape(nt * n, d).T).view(ni, k, nt, n).permute(0, 2, 1, 3)
        return dots.mul_(self.lambda_softmax) if not torch.is_grad_enabled() else dots * self.lambda_softmax

    def forward(self, image: Local, text: Local) -> torch.Tensor:
        image, text = zero_padding(image), zero_padding(text)
        logits = self.affinity(image, text)  # (Ni, Nt, k, n)
        l2l, contexts = [None, None], [None, None]
        if self.image_queries:  # eq. 4: each region over the words
            alpha = masked_softmax(logits, text.mask[None, :, None, :], dim=-1)
            note_attention(alpha, "image", "L2L region->word")  # itmkit explain: (Ni, Nt, k, n), rows sum to 1
            cos, contexts[0] = attend_and_fuse(alpha, image, text, query_side="image", fusion=self.image_fusion,
                                               eps=self.eps)
            l2l[0] = pool_l2l(cos, image.mask[:, None], self.l2l_pool)
            del alpha, cos
        if self.text_queries:  # eq. 5: each word over the regions
            beta = masked_softmax(logits, image.mask[:, None, :, None], dim=-2).transpose(-1, -2)  # (Ni, Nt, n, k)
            note_attention(beta, "text", "L2L word->region")
            del logits
            cos, contexts[1] = attend_and_fuse(beta, text, image, query_side="text", fusion=self.text_fusion,
                                               eps=self.eps)
            l2l[1] = pool_l2l(cos, text.mask[None], self.l2l_pool)
            del beta, cos
        score = _balance(*l2l, self.mu1)  # eq. 7
        if self.steps == "l2l":
            return score
        # a side without its hierarchy: the mean of its fragments is its global vector (paper Sec. 4.2)
        v_c = contexts[0] if self.image_queries else masked_mean(image.feats, image.mask, dim=1)[:, None]
        t_c = contexts[1] if self.text_queries else masked_mean(text.feats, text.mask, dim=1)[None]
        return score + global_alignment(v_c, t_c, image, text, image_queries=self.image_queries,
                                        text_queries=self.text_queries, mu2=self.mu2,
                                        temperature=self.g2l_temperature, g2g=self.steps == "l2l+g2l+g2g",
                                        eps=self.eps)


class GlobalToLocal(nn.Module):
    """SHAN's step 2 global-queried attention and step 3 with a tower's pooled vectors as v_c, t_c.

    image / text: Local fragments (Ni, k, D), (Nt, n, D); image_global (Ni, D), text_global (Nt, D).
    Returns S_G2L + S_G2G (or one of them) (Ni, Nt). No parameters of its own.
    """

    def __init__(self, *, variant: str = "full", steps: str = "g2l+g2g", mu2: float = 0.5,
                 g2l_temperature: float = 1.0, eps: float = EPS):
        super().__init__()
        if steps not in GLOBAL_STEPS:
            raise ValueError(f"steps must be one of {GLOBAL_STEPS}, got {steps!r}")
        self.image_queries, self.text_queries = sides(variant)
        self.steps, self.mu2, self.g2l_temperature, self.eps = steps, mu2, g2l_temperature, eps

    def forward(self, image: Local, text: Local, image_global: torch.Tensor, text_global: torch.Tensor) -> torch.Tensor:
        return global_alignment(image_global[:, None], text_global[None], zero_padding(image), zero_padding(text),
                                image_queries=self.image_queries, text_queries=self.text_queries, mu2=self.mu2,
                                temperature=self.g2l_temperature, g2l="g2l" in self.steps, g2g="g2g" in self.steps,
                                eps=self.eps)


def zero_padding(x: Local) -> Local:
    """Padded fragments set to 0, so that no value there (noise, inf) reaches a product or a sum."""
    if bool(x.mask.all()):
        return x
    return Local(x.feats.masked_fill(~x.mask[..., None], 0.0), x.mask, x.extras)
