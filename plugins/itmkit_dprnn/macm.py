"""DP-RNN's Multi-attention Cross Matching (MACM, Chen & Luo, AAAI 2020, eq. 4-12) on pair-shaped tensors.

Both functions take the raw products of a batch of pairs laid out on any leading "pair" axes
(``(Ni, Nt)`` for a whole block, ``(P,)`` for a list of selected pairs): ``dots`` (..., R, L) holds
<o_r, w_l>, the Gram matrices hold the products within one side. Everything the paper's equations
need follows from these without materialising an attended vector per pair and fragment:

    cos(o_r, w_l)   = dots / max(|o_r| |w_l|, eps)                      (|.|^2 from the Gram diagonals)
    <w_l, m_l>      = sum_r alpha_rl dots_rl,   |m_l|^2 = alpha_l^T G_o alpha_l
    <o_r, t_r>      = sum_l alpha_rl dots_rl,   |t_r|^2 = alpha_r^T G_w alpha_r

Padding: objects and words outside the masks get no attention weight, add nothing to the
query-axis norms and have weight 0 in the self-attention sums, so a pair scores as it would with
every padded row sliced off (the tests check this against a per-pair loop).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from itmkit.attention import masked_softmax
from itmkit.ops import EPS, float32

CLIPS = ("relu", "leaky_relu")  # DP-RNN writes [x]+ = max(x, 0); SCAN's code uses LeakyReLU(0.1)


def _clip(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "relu":
        return torch.relu(x)
    if how == "leaky_relu":
        return F.leaky_relu(x, 0.1)
    raise ValueError(f"clip must be one of {CLIPS}, got {how!r}")


def _norms(gram: torch.Tensor) -> torch.Tensor:
    """|x| from a Gram matrix's diagonal (..., N); floored so a zero row keeps finite gradients."""
    return torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(torch.finfo(gram.dtype).tiny).sqrt()


def clipped_cosines(dots: torch.Tensor, object_norms: torch.Tensor, word_norms: torch.Tensor,
                    valid: torch.Tensor, clip: str, eps: float) -> torch.Tensor:
    """c+(o_r, w_l) = [cos(o_r, w_l)]+ (..., R, L), 0 wherever the object or the word is padding (eq. 4, 7)."""
    cos = dots / (object_norms[..., :, None] * word_norms[..., None, :]).clamp(min=eps)
    return _clip(cos, clip) * valid


def word_oriented(dots: torch.Tensor, object_gram: torch.Tensor, word_gram_diag: torch.Tensor,
                  object_mask: torch.Tensor, word_mask: torch.Tensor, word_weights: torch.Tensor, *,
                  lambda_softmax: float, clip: str = "relu", eps: float = EPS,
                  report: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """S_w(I, T) = sum_l a^w_l cos(w_l, m_l), m_l = sum_r softmax_r(lambda2 A~_lr) o_r (eq. 7-10, 12).

    dots (..., R, L); object_gram (..., R, R); word_gram_diag (..., L) the words' squared norms;
    object_mask (..., R), word_mask (..., L) bool; word_weights a^w (..., L), 0 on padding. All
    broadcast to the pair axes. A~ is c+ normalised over the *words* (the queries). ``report``, if
    given, receives the attention weights (..., R, L), each word's softmax over the objects (axis -2).
    """
    # the norms, cosines and softmax in float32 under mixed precision (itmkit.precision)
    dots, object_gram, word_gram_diag = float32(dots), float32(object_gram), float32(word_gram_diag)
    object_norms = _norms(object_gram)
    word_norms = word_gram_diag.clamp_min(torch.finfo(dots.dtype).tiny).sqrt()
    c = clipped_cosines(dots, object_norms, word_norms, object_mask[..., :, None] & word_mask[..., None, :], clip, eps)
    normed = c / (torch.linalg.vector_norm(c, dim=-1, keepdim=True) + eps)
    alpha = masked_softmax(lambda_softmax * normed, object_mask[..., :, None].expand_as(normed), dim=-2)  # over r
    if report is not None:
        report(alpha)
    attended_dot = (alpha * dots).sum(dim=-2)  # <w_l, m_l> (..., L)
    m_sq = (alpha * (object_gram @ alpha)).sum(dim=-2).clamp_min(torch.finfo(dots.dtype).tiny)  # |m_l|^2
    relevance = attended_dot / (word_norms * m_sq.sqrt()).clamp(min=eps)  # S(I, j) (..., L)
    return (word_weights * relevance).sum(dim=-1)


def object_oriented(dots: torch.Tensor, word_gram: torch.Tensor, object_gram_diag: torch.Tensor,
                    object_mask: torch.Tensor, word_mask: torch.Tensor, object_weights: torch.Tensor, *,
                    lambda_softmax: float, clip: str = "relu", eps: float = EPS,
                    report: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """S_o(I, T) = sum_r a~^o_r cos(o_r, t_r), t_r = sum_l softmax_l(lambda1 A_rl) w_l (eq. 4-6, 11).

    dots (..., R, L); word_gram (..., L, L); object_gram_diag (..., R) the objects' squared norms;
    object_weights a~^o (..., R), 0 on padding. A is c+ normalised over the *objects* (the queries).
    ``report``, if given, receives the attention weights (..., R, L), each object's softmax over the words.
    """
    # the norms, cosines and softmax in float32 under mixed precision (itmkit.precision)
    dots, word_gram, object_gram_diag = float32(dots), float32(word_gram), float32(object_gram_diag)
    word_norms = _norms(word_gram)
    object_norms = object_gram_diag.clamp_min(torch.finfo(dots.dtype).tiny).sqrt()
    c = clipped_cosines(dots, object_norms, word_norms, object_mask[..., :, None] & word_mask[..., None, :], clip, eps)
    normed = c / (torch.linalg.vector_norm(c, dim=-2, keepdim=True) + eps)
    alpha = masked_softmax(lambda_softmax * normed, word_mask[..., None, :].expand_as(normed), dim=-1)  # over l
    if report is not None:
        report(alpha)
    attended_dot = (alpha * dots).sum(dim=-1)  # <o_r, t_r> (..., R)
    t_sq = (alpha * (alpha @ word_gram)).sum(dim=-1).clamp_min(torch.finfo(dots.dtype).tiny)  # |t_r|^2
    relevance = attended_dot / (object_norms * t_sq.sqrt()).clamp(min=eps)  # S(i, T) (..., R)
    return (object_weights * relevance).sum(dim=-1)
