"""CAAN (Zhang, Lei, Zhang & Li, CVPR 2020): Context-Aware Attention Network for image-text retrieval.

A CAAN model in a recipe is one matching branch over plain towers:

    [image] encoder = core.precomp (normalize = false)   v_i = W_x x_i + b               (n, D)  eq. 1
    [text]  encoder = core.bigru (normalize = false)     u_j = (h->_j + h<-_j) / 2        (m, D)  eq. 2-4
    [[match]] similarity = caan.attention                S = v_hat . u_hat, per pair          eq. 5-17

``caan.attention`` is pair-dependent: for each image x caption pair (rows v_i of V, u_j of U)

    H    = tanh(V K U^T)                                   (n, m)   region-word similarities  eq. 7
    H^uv = [H]_+ / ||[H]_+ column over the regions||       (n, m)   word-to-region            eq. 12
    H^vu = [H]_+ / ||[H]_+ row over the words||            (n, m)   region-to-word            eq. 13
    H^v  = N(H^uv) N(H^uv)^T,  N = l2norm of each row      (n, n)   "SA", second order        eq. 16
    H^u  = N(H^vu^T) N(H^vu^T)^T                           (m, m)   (rows: the words)         eq. 17
    f    = softmax_i( tanh(H^v V Q1 + H^uv U Q2) w_v )     (n)                                eq. 8-9
    g    = softmax_j( tanh(H^u U Q3 + H^vu^T V Q4) w_u )   (m)                                eq. 10-11
    v_hat = f^T V,  u_hat = g^T U,  S = <v_hat, u_hat>     (cosine by default, an ASSUMPTION) eq. 5-6

The printed eq. 10 reads H^vu V^T Q4, whose shapes do not fit: the word rows need (H^vu)^T; eq. 17
indexes H^vu's rows 1..m, i.e. its columns (each word's response over the regions).

The whole Ni x Nt block runs at once. Per item (not per pair): V K, V Q1, V Q4, U Q2, U Q3 and, for
the feature-based variant (FA, eq. 14-15), H^v = V M1 V^T and H^u = U M2 U^T. Per pair: H from one
GEMM of every region with every word of the block, the normalisations, the (n + m) x z attention
activations (tanh is not linear: they must exist), and the attended vectors. Padded regions and
words are zeroed first, so their rows and columns of H are tanh(0) = 0 and add nothing to any
norm or product; the two softmaxes skip them. A caption scored in a block scores as it does alone.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from itmkit.attention import masked_softmax
from itmkit.explain import note_attention
from itmkit.ops import EPS, float32, l2norm
from itmkit.stage import PortError, Stage, param
from itmkit.types import Local, LocalPort, Port, ScorePort

FLOAT = 4  # bytes of a float32
INTRA = ("semantic", "feature", "none")


def _zero_padding(x: Local) -> torch.Tensor:
    """The fragments with padded rows set to 0 (their noise must reach no product)."""
    return x.feats.masked_fill(~x.mask[..., None], 0)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """||x|| + EPS over the last axis, with a finite gradient at 0 (as itmkit.ops.l2norm); in float32."""
    x = float32(x)
    return x.pow(2).sum(dim=-1).clamp_min(torch.finfo(x.dtype).tiny).sqrt() + EPS


class ContextAwareAttention(nn.Module):
    """CAAN's context-aware attention and inner-product score for every pair of a block (eq. 5-17).

    image: Local (Ni, n, D) regions V; text: Local (Nt, m, D) words U. Returns (Ni, Nt) scores.
    ``intra``: "semantic" (SA, eq. 16-17), "feature" (FA, eq. 14-15) or "none"; ``inter``: the
    H^uv / H^vu terms of eq. 8 and 10. Weights exist only for the terms in use.
    """

    def __init__(self, *, dim: int, width: int, intra: str = "semantic", inter: bool = True,
                 normalize_h_inputs: bool = False, normalize: bool = True):
        super().__init__()
        if intra not in INTRA:
            raise ValueError(f"intra must be one of {INTRA}, got {intra!r}")
        if intra == "none" and not inter:
            raise ValueError("no attention term left: intra = 'none' needs inter = True")
        self.intra, self.inter = intra, inter
        self.normalize_h_inputs, self.normalize = normalize_h_inputs, normalize

        def linear(n_in: int, n_out: int, used: bool) -> nn.Linear | None:
            return nn.Linear(n_in, n_out, bias=False) if used else None  # the paper's maps have no bias

        self.k = linear(dim, dim, inter or intra == "semantic")  # K of eq. 7 (x @ k.weight.T = x K)
        self.m1 = linear(dim, dim, intra == "feature")  # eq. 14
        self.m2 = linear(dim, dim, intra == "feature")  # eq. 15
        self.q1 = linear(dim, width, intra != "none")  # eq. 8, intra-modal term
        self.q2 = linear(dim, width, inter)  # eq. 8, inter-modal term
        self.q3 = linear(dim, width, intra != "none")  # eq. 10, intra-modal term
        self.q4 = linear(dim, width, inter)  # eq. 10, inter-modal term
        self.w_v = nn.Linear(width, 1, bias=False)  # eq. 9
        self.w_u = nn.Linear(width, 1, bias=False)  # eq. 11

    def inter_modal(self, v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H^uv and H^vu (Ni, Nt, n, m) of eq. 7, 12, 13 from zero-padded V (Ni, n, D) and U (Nt, m, D)."""
        (ni, n, d), (nt, m, _) = v.shape, u.shape
        if self.normalize_h_inputs:
            v, u = l2norm(v), l2norm(u)  # zero rows stay zero
        # every region of the block against every word of the block: one GEMM, laid out (Ni, Nt, n, m)
        # once, so that the pair-wise products below read contiguous matrices instead of copying them
        h = (self.k(v).reshape(ni * n, d) @ u.reshape(nt * m, d).T).view(ni, n, nt, m).transpose(1, 2).contiguous()
        h = h.tanh_()  # in place: the product's backward needs its inputs only
        clipped = torch.relu(h) if torch.is_grad_enabled() else h.relu_()  # [H]_+ (tanh's backward needs h)
        return l2norm(clipped, dim=2), l2norm(clipped, dim=3)

    def region_logits(self, v: torch.Tensor, u: torch.Tensor, h_uv: torch.Tensor | None) -> torch.Tensor:
        """tanh(H^v V Q1 + H^uv U Q2) w_v (Ni, Nt or 1, n) of eq. 8-9, before the softmax."""
        term = h_uv @ self.q2(u) if self.inter else None  # H^uv U Q2 (Ni, Nt, n, z), U Q2 once per caption
        # the intra-modal term is added in place: a product's backward needs its inputs, not its output
        if self.intra == "semantic":
            rows = l2norm(h_uv, dim=3)  # N(H^uv_i.): each region's response over the words, eq. 16
            vq1 = self.q1(v)  # (Ni, n, z)
            (n, m), z = rows.shape[-2:], vq1.shape[-1]
            if 2 * m < n:  # H^v V Q1 = N (N^T V Q1): 2 n m z products a pair instead of n n (m + z)
                x = torch.einsum("itnm,inz->itmz", rows, vq1)  # N^T V Q1, one GEMM per image
                if term is None:
                    term = rows @ x
                else:
                    term.view(-1, n, z).baddbmm_(rows.view(-1, n, m), x.view(-1, m, z))
            else:
                intra = torch.einsum("itnp,ipz->itnz", rows @ rows.transpose(-1, -2), vq1)
                term = intra if term is None else term.add_(intra)
        elif self.intra == "feature":
            h_v = self.m1(v) @ v.transpose(1, 2)  # V M1 V^T (Ni, n, n), eq. 14: one per image
            intra = (h_v @ self.q1(v))[:, None]  # (Ni, 1, n, z)
            term = intra if term is None else term.add_(intra)
        return self.w_v(term.tanh_()).squeeze(-1)

    def word_logits(self, v: torch.Tensor, u: torch.Tensor, h_vu: torch.Tensor | None) -> torch.Tensor:
        """tanh(H^u U Q3 + (H^vu)^T V Q4) w_u (Ni or 1, Nt, m) of eq. 10-11, before the softmax."""
        term = None
        if self.intra == "semantic":
            cols = l2norm(h_vu, dim=2)  # N(H^vu_.j): each word's response over the regions, eq. 17
            h_u = cols.transpose(-1, -2) @ cols  # (Ni, Nt, m, m)
            del cols
            term = torch.einsum("itjk,tkz->itjz", h_u, self.q3(u))
            del h_u
        elif self.intra == "feature":
            h_u = self.m2(u) @ u.transpose(1, 2)  # U M2 U^T (Nt, m, m), eq. 15: one per caption
            term = (h_u @ self.q3(u))[None]  # (1, Nt, m, z)
        if self.inter:
            # (H^vu)^T V Q4 (eq. 10 prints H^vu V^T), one GEMM per image, laid out (Ni, Nt, m, z)
            cross = torch.einsum("itnm,inz->itmz", h_vu, self.q4(v))
            term = cross if term is None else cross.add_(term)
        return self.w_u(term.tanh_()).squeeze(-1)

    def attention(self, image: Local, text: Local) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention weights f (Ni, Nt, n) over the regions and g (Ni, Nt, m) over the words (eq. 8-11)."""
        v, u = _zero_padding(image), _zero_padding(text)
        ni, nt = v.shape[0], u.shape[0]
        h_uv, h_vu = self.inter_modal(v, u) if self.k is not None else (None, None)
        if h_uv is not None:  # itmkit explain: eq. 12-13, l2-normalised (not softmaxes), laid out (Ni, Nt, n, m)
            note_attention(h_uv.transpose(-1, -2), "text", "word->region")  # each word's column over the regions
            note_attention(h_vu, "image", "region->word")  # each region's row over the words
        # one side at a time, so that only one side's (.., z) activations are alive at once
        f = masked_softmax(self.region_logits(v, u, h_uv), image.mask[:, None])  # eq. 9
        del h_uv
        g = masked_softmax(self.word_logits(v, u, h_vu), text.mask[None])  # eq. 11
        return f.expand(ni, nt, -1), g.expand(ni, nt, -1)

    def forward(self, image: Local, text: Local) -> torch.Tensor:
        f, g = self.attention(image, text)
        v, u = _zero_padding(image), _zero_padding(text)
        # v_hat = f^T V, u_hat = g^T U: (n + m) D multiply-adds a pair; the bilinear form f^T (V U^T) g
        # would cost n m D for V U^T and is no smaller in memory than the (n + m) x z activations above
        v_hat = torch.einsum("itn,ind->itd", f, v)  # eq. 5
        u_hat = torch.einsum("itm,tmd->itd", g, u)  # eq. 6
        dot = torch.einsum("itd,itd->it", v_hat, u_hat)
        if not self.normalize:
            return dot
        return dot / (_norm(v_hat) * _norm(u_hat))  # l2norm(v_hat) . l2norm(u_hat), SCAN's eps form


@attrs.frozen(kw_only=True)
class Attention(Stage):
    """CAAN context-aware attention: H = tanh(V K U^T), inter- and intra-modal attention, S = <v_hat, u_hat>."""

    name = "caan.attention"
    kind = "similarity"
    paper = "Zhang et al. 2020 (CAAN), Sec. 3.3, eq. 5-17 (Figs. 2-3); inner-product score of Sec. 3.4"

    width: int = param(256, "z, the width of the attention functions (Q1..Q4 in R^{D x z}, w_v, w_u in R^z);"
                            " not given in the paper (ASSUMPTION: 256, which keeps the model near its 11 M"
                            " parameters at D = 1024)", ge=1)
    intra_modal: str = param("semantic", "intra-modal attention H^v, H^u: 'semantic' (SA, eq. 16-17, the paper's"
                                         " model), 'feature' (FA, V^T M1 V and U^T M2 U, eq. 14-15, ablation) or"
                                         " 'none' (ablation 'baseline+IA')", choices=INTRA)
    inter_modal: bool = param(True, "the inter-modal terms H^uv U Q2 and H^vu^T V Q4 of eq. 8 and 10 (false:"
                                    " ablations 'baseline+FA' and 'baseline+SA', where SA still reads H^uv, H^vu)")
    normalize_h_inputs: bool = param(False, "l2-normalise V and U before H = tanh(V^T K U) (eq. 7) only;"
                                            " ASSUMPTION: false, eq. 7 reads the encoders' vectors as they are")
    normalize: bool = param(True, "l2-normalise v_hat and u_hat before the inner product, i.e. a cosine"
                                  " (ASSUMPTION: the paper says 'inner product' and gives no norm; without one"
                                  " the hinge margin has no fixed scale)")

    def ports(self, image: LocalPort, text: LocalPort) -> ScorePort:
        if image.dim != text.dim:
            raise PortError(f"{self.name}: regions (width {image.dim}) and words (width {text.dim}) must have one"
                            " width D (H = tanh(V^T K U) with K in R^(D x D)); size both encoders alike, e.g."
                            " leave their embed_dim to [recipe].embed_dim")
        if self.intra_modal == "none" and not self.inter_modal:
            raise PortError(f"{self.name}: intra_modal = 'none' with inter_modal = false leaves no attention term"
                            " (the paper's mean-pooling 'baseline'): use pool = 'core.mean' on both towers and"
                            " similarity = 'core.cosine' instead, or enable a term")
        return ScorePort()

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return ContextAwareAttention(dim=image.dim, width=self.width, intra=self.intra_modal, inter=self.inter_modal,
                                     normalize_h_inputs=self.normalize_h_inputs, normalize=self.normalize)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict[str, Port] | None = None) -> int:
        # float32 numbers per pair at the peak of a no-grad forward, one side at a time (the default
        # SA + IA; the ablation variants hold less). Regions, 2 m < n: the (n, z) term of eq. 8 and
        # N^T V Q1 (m, z) beside four (n, m) arrays (H^uv, H^vu, N and the copy einsum makes of it);
        # otherwise both (n, z) terms and H^v (n, n) beside three. Words: H^u (m, m) and its layout
        # copy beside an (m, z) term, or H^vu and its copy beside both (m, z) terms of eq. 10. The
        # attended vectors (3 D) come after these are freed. Measured with a live-storage count over
        # blocks of 16 x 24 pairs (tests/test_stages.py): 0.9 to 1.1 of this with the per-item arrays.
        n, m, z = image_len, text_len, self.width
        regions = n * z + m * z + 4 * n * m if 2 * m < n else 2 * n * z + 3 * n * m + n * n
        words = max(n * m + 2 * m * m + m * z, 2 * n * m + 2 * m * z)
        d = ports["image"].dim if ports and "image" in ports else 1024  # D as wired (the engine passes it)
        return FLOAT * max(regions, words, 3 * d)
