"""MMCA (Wei et al., CVPR 2020): Multi-Modality Cross Attention for image and sentence matching.

An MMCA model in a recipe is two matching branches over the same towers:

    [image] encoder = core.precomp (normalize = false)    R = O W_r + b_r           (k, d)  eq. 1
            pool    = mmca.self_attention                 i0 = l2norm(mean TU(R))    (d)     eq. 2-5
    [text]  encoder = frozen BERT, last hidden states      E                         (n, 768) eq. 6
            pool    = mmca.text_cnn                       c0 = l2norm(LN(W_e [q1;q2;q3]))     eq. 7
    [[match]] similarity = core.dot                       i0 . c0                    weight 1
    [[match]] similarity = mmca.cross                     i1 . c1 from TU([R; E W_p])  weight alpha = 0.2

The towers' fragments stay R and E (the cross branch reads the FC features, not the
self-attended ones, Fig. 2), so the image Transformer unit and the text CNN are *pools*.

``mmca.cross`` is pair-dependent: each image x caption pair is one Transformer unit over the
k + n rows of [R; E'] (E' = E W_p, the projection being our ASSUMPTION, see docs/plugins/mmca.md).
It runs on a whole Ni x Nt block at once. A row's attention over the joint sequence splits into
its own side's keys (the same for every pair of that item) and the other side's keys (per pair):

    out_r = (sum_j e^{a_rj} v_j + sum_u e^{b_ru} v_u) / (sum_j e^{a_rj} + sum_u e^{b_ru})

so the Q/K/V projections, the own-side logits and their exponent-weighted sums are computed once
per item of the block, and only the cross-modal logits, the residual/LayerNorm/FFN rows and the
CNN head once per pair. Padded regions and tokens are masked as keys, left out of the mean and of
the n-gram windows, so they change nothing.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from itmkit.explain import active, note_attention
from itmkit.ops import float32, l2norm, masked_mean
from itmkit.stage import PortError, Stage, param
from itmkit.types import GlobalPort, Local, LocalPort, ScorePort
from itmkit_saem.modules import NgramCNN, TransformerLayer

FLOAT = 4  # bytes of a float32

# ============================================================================ self-attention


class SelfAttentionPool(nn.Module):
    """i0 = l2norm( (1/k) sum_i TU(R)_i ) over the valid regions: Local (B, k, d) -> (B, d). MMCA eq. 2-5."""

    def __init__(self, *, dim: int, heads: int, intermediate: int, activation: str, dropout: float,
                 ln_eps: float, normalize: bool = True):
        super().__init__()
        self.layer = TransformerLayer(dim=dim, heads=heads, intermediate=intermediate, activation=activation,
                                      dropout=dropout, ln_eps=ln_eps)
        self.normalize = normalize

    def forward(self, x: Local) -> torch.Tensor:
        attended = self.layer(x.feats, x.mask)  # (B, k, d)
        pooled = masked_mean(attended, x.mask, dim=1)  # (B, d)
        return l2norm(pooled) if self.normalize else pooled


def _unit_ports(stage: str, dim: int, heads: int) -> None:
    if dim % heads:
        raise PortError(f"{stage}: width {dim} is not divisible by heads = {heads}; choose heads dividing it")


@attrs.frozen(kw_only=True)
class SelfAttention(Stage):
    """MMCA image self-attention: one Transformer unit over the regions, mean over the valid ones, l2norm (i0)."""

    name = "mmca.self_attention"
    kind = "aggregator"
    paper = "Wei et al. 2020 (MMCA), Sec. 3.3, eq. 1-5 (Transformer unit, then average pooling)"

    heads: int = param(16, "attention heads of the Transformer unit (MMCA: 16)", ge=1)
    intermediate: int | None = param(None, "inner width of the feed-forward layer (default: the model width,"
                                           " W1, W2 in R^{dx x dx} as printed; BERT-style would be 4x)", ge=1)
    activation: str = param("relu", "feed-forward activation (MMCA: ReLU; SAEM: gelu)", choices=("relu", "gelu"))
    dropout: float = param(0.1, "dropout in the unit (not given in the paper; 0.1 as SAEM's unit)", ge=0.0, le=1.0)
    ln_eps: float = param(1e-12, "LayerNorm epsilon of the unit (BERT's 1e-12, as SAEM)", gt=0.0)
    normalize: bool = param(True, "l2-normalise the pooled vector (MMCA: i0 has unit norm)")

    def ports(self, x: LocalPort) -> GlobalPort:
        _unit_ports(self.name, x.dim, self.heads)
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return SelfAttentionPool(dim=x.dim, heads=self.heads, intermediate=self.intermediate or x.dim,
                                 activation=self.activation, dropout=self.dropout, ln_eps=self.ln_eps,
                                 normalize=self.normalize)


# ============================================================================ cross attention


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, d) -> (B, heads, L, d / heads)."""
    b, length, d = t.shape
    return t.view(b, length, heads, d // heads).transpose(1, 2)


def _own_side(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              dropout: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of a side's rows over its own valid keys, left unnormalised, per item.

    q, k, v (B, h, L, dh) (q already scaled), mask (B, L). Returns the shift m (B, h, L, 1), the
    sum of exp(logit - m) z (B, h, L, 1) and the sum of exp(logit - m) v (B, h, L, dh).
    """
    # the exponentials and their sums in float32 under mixed precision (itmkit.precision)
    logits = float32(q @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], float("-inf"))  # (B, h, L, L)
    shift = logits.amax(dim=-1, keepdim=True).detach()  # softmax is shift-invariant: no gradient needed
    e = torch.exp(logits - shift)
    return shift, e.sum(dim=-1, keepdim=True), dropout(e) @ v


def _join(own: tuple[torch.Tensor, torch.Tensor, torch.Tensor], logits: torch.Tensor, key_mask: torch.Tensor,
          values: torch.Tensor, spec: str, dropout: nn.Module, report: tuple[str, str] | None = None) -> torch.Tensor:
    """The softmax over [own keys; other side's keys] for each pair, from the per-item own-side sums.

    own: _own_side's (shift, z, weighted sum), broadcastable to (Ni, Nt, h, L, ·); logits (Ni, Nt, h, L, M)
    of the rows against the other side's keys; key_mask broadcastable to it; values the other side's
    (·, h, M, dh) and ``spec`` the einsum of weights x values. Returns (Ni, Nt, h, L, dh).
    ``report`` (query side, label): while ``itmkit explain`` records, the cross-modal block of the joint
    softmax, averaged over the heads (Ni, Nt, L, M), is reported; a row sums to the share of its attention
    that goes to the other side (its own side's keys take the rest), not to 1.
    """
    own_shift, own_z, own_sum = own
    logits = float32(logits)  # the exponentials and their sums in float32 under mixed precision
    in_place = not torch.is_grad_enabled()  # scoring: no graph needs the overwritten values
    if not bool(key_mask.all()):
        logits = logits.masked_fill_(~key_mask, float("-inf")) if in_place else logits.masked_fill(~key_mask, float("-inf"))
    shift = torch.maximum(own_shift, logits.amax(dim=-1, keepdim=True).detach())
    own_scale = torch.exp(own_shift - shift)  # (Ni, Nt, h, L, 1)
    e = logits.sub_(shift).exp_() if in_place else torch.exp(logits - shift)
    total = e.sum(dim=-1, keepdim=True).add_(own_z * own_scale)
    if report is not None and active() is not None:
        note_attention((e / total).mean(dim=2), *report)  # the heads' mean of the weights the values get
    out = torch.einsum(spec, dropout(e), values)
    out = out.add_(own_sum * own_scale) if in_place else out + own_sum * own_scale
    return out.div_(total) if in_place else out / total


def _conv_taps(cnn: NgramCNN) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(window size, weight (C, size, D), bias (C)) of each convolution of SAEM's n-gram CNN (Conv2d(1, C, (size, D)))."""
    return [(size, conv.weight[:, 0], conv.bias) for size, conv in zip(cnn.widths, cnn.convs)]


def ngram_head(cnn: NgramCNN, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The n-gram CNN head on many sequences at once: (P, n, D) with mask (P, n) -> (P, out).

    The same function as ``cnn(feats, mask)``, computed as ONE matrix product of every position
    with every window offset's filters, (P n, D) x (D, C sum(sizes)), then shifted sums: window
    s of size l is sum_o Y_o[s + o]. The bias and the ReLU come after the max-pool (max commutes
    with both), so the elementwise passes run over pooled vectors. Windows must lie inside the
    valid positions (so padded rows are never read); a sequence shorter than a window gets the
    one window at its start, zeros past its end (as the module does).
    """
    taps = _conv_taps(cnn)
    p, n, _ = feats.shape
    widest = max(size for size, _, _ in taps)
    lengths = mask.sum(dim=1)
    if bool((lengths < widest).any()):  # a zero-padded window reads past a caption's end: zero the padding
        feats = feats.masked_fill(~mask[..., None], 0)
    if n < widest:
        feats = F.pad(feats, (0, 0, 0, widest - n))
        mask = F.pad(mask, (0, widest - n))
    length = feats.shape[1]
    weight = torch.cat([w[:, o] for size, w, _ in taps for o in range(size)], dim=0)  # (C sum(sizes), D)
    products = (feats.reshape(p * length, -1) @ weight.T).view(p, length, len(weight))
    pooled, column = [], 0
    for size, w, bias in taps:
        channels = w.shape[0]
        windows = length - size + 1
        acc = products[:, :windows, column:column + channels]
        for o in range(1, size):
            part = products[:, o:o + windows, column + o * channels:column + (o + 1) * channels]
            acc = acc + part
        column += size * channels
        starts = torch.arange(windows, device=feats.device)
        valid = starts[None, :] <= (lengths[:, None] - size).clamp(min=0)  # (P, windows)
        best = acc.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)  # (P, C)
        pooled.append(torch.relu(best + bias))
    out = cnn.fc(cnn.drop(torch.cat(pooled, dim=-1)))
    out = cnn.norm(out) if cnn.norm is not None else out
    return l2norm(out) if cnn.normalize else out


class CrossAttentionScore(nn.Module):
    """MMCA cross-attention branch: s = i1 . c1 for every image x caption pair of a block (eq. 8-14).

    image: Local (Ni, k, d) region features R; text: Local (Nt, n, D) BERT states E. Per pair,
    Y = [R; E W_p + b_p] (k + n, d) goes through one Transformer unit (16 heads, post-LN), whose
    output splits into R_c and E_c; i1 = l2norm(mean of the valid R_c rows), c1 = l2norm(LN(FC(
    n-gram CNN max-pooled over E_c))). Returns the (Ni, Nt) scores i1 . c1.
    """

    def __init__(self, *, dim: int, text_dim: int, heads: int, intermediate: int, activation: str, dropout: float,
                 ln_eps: float, project_text: bool, channels: int, ngrams: tuple[int, ...], head_dropout: float,
                 head_layer_norm: bool, head_ln_eps: float, attention_scale: str = "head"):
        super().__init__()
        self.heads = heads
        self.attention_scale = attention_scale
        self.text_proj = nn.Linear(text_dim, dim) if project_text else nn.Identity()
        self.layer = TransformerLayer(dim=dim, heads=heads, intermediate=intermediate, activation=activation,
                                      dropout=dropout, ln_eps=ln_eps)
        self.text_head = NgramCNN(in_dim=dim, out_dim=dim, channels=channels, widths=ngrams, dropout=head_dropout,
                                  layer_norm=head_layer_norm, ln_eps=head_ln_eps)

    def forward(self, image: Local, text: Local) -> torch.Tensor:
        layer, h = self.layer, self.heads
        regions, region_mask = image.feats, image.mask  # (Ni, k, d), (Ni, k)
        tokens, token_mask = self.text_proj(text.feats), text.mask  # (Nt, n, d), (Nt, n)
        (ni, k, d), (nt, n) = regions.shape, token_mask.shape
        scale = 1.0 / math.sqrt(d // h if self.attention_scale == "head" else d)
        # per item: projections and the attention over the item's own side
        qr, kr, vr = (_heads(f(regions), h) for f in (layer.query, layer.key, layer.value))  # (Ni, h, k, dh)
        qt, kt, vt = (_heads(f(tokens), h) for f in (layer.query, layer.key, layer.value))  # (Nt, h, n, dh)
        qr, qt = qr * scale, qt * scale
        own_r = tuple(t[:, None] for t in _own_side(qr, kr, vr, region_mask, layer.attn_drop))  # (Ni, 1, h, k, ·)
        own_t = tuple(t[None] for t in _own_side(qt, kt, vt, token_mask, layer.attn_drop))  # (1, Nt, h, n, ·)
        # per pair: the rows of one side against the other side's keys, (Ni, Nt, h, k, dh) and (Ni, Nt, h, n, dh)
        region_rows = _join(own_r, torch.einsum("ihqd,thcd->ithqc", qr, kt), token_mask[None, :, None, None, :],
                            vt, "ithqc,thcd->ithqd", layer.attn_drop, ("image", "region->word head-mean"))
        token_rows = _join(own_t, torch.einsum("thqd,ihcd->ithqc", qt, kr), region_mask[:, None, None, None, :],
                           vr, "ithqc,ihcd->ithqd", layer.attn_drop, ("text", "word->region head-mean"))
        region_rows = region_rows.transpose(2, 3).reshape(ni, nt, k, d)
        token_rows = token_rows.transpose(2, 3).reshape(ni, nt, n, d)
        regions_c = layer.after_attention(region_rows, regions[:, None])  # R_c (Ni, Nt, k, d)
        tokens_c = layer.after_attention(token_rows, tokens[None])  # E_c (Ni, Nt, n, d)
        i1 = l2norm(masked_mean(regions_c, region_mask[:, None], dim=2))  # (Ni, Nt, d)
        pair_mask = token_mask[None].expand(ni, nt, n).reshape(ni * nt, n)
        c1 = l2norm(ngram_head(self.text_head, tokens_c.reshape(ni * nt, n, d), pair_mask)).view(ni, nt, -1)
        return (i1 * c1).sum(dim=-1)


@attrs.frozen(kw_only=True)
class Cross(Stage):
    """MMCA cross-attention: one Transformer unit over each pair's [regions; tokens], i1 = mean, c1 = n-gram CNN; i1 . c1."""

    name = "mmca.cross"
    kind = "similarity"
    paper = "Wei et al. 2020 (MMCA), Sec. 3.4, eq. 8-14 and Fig. 2; score term alpha * i1 . c1 of Sec. 3.5"

    embed_dim: int | None = param(None, "width d of the joint sequence; the image fragments must have it (default:"
                                        " [recipe].embed_dim; MMCA: 256)", ge=1)
    project_text: bool = param(True, "project the text fragments to d with a linear layer before stacking"
                                     " (ASSUMPTION: the paper stacks 256-d R with 768-d E without saying how);"
                                     " false: they must already have width d")
    heads: int = param(16, "attention heads of the joint Transformer unit (MMCA: 16)", ge=1)
    attention_scale: str = param("head", "logits divided by sqrt of the head width d/h ('head': a Transformer unit as"
                                         " eq. 1 defines it) or of d ('width': eq. 11 as printed, written for one head)",
                                 choices=("head", "width"))
    intermediate: int | None = param(None, "inner width of its feed-forward layer (default: d, as printed)", ge=1)
    activation: str = param("relu", "feed-forward activation (MMCA: ReLU)", choices=("relu", "gelu"))
    dropout: float = param(0.1, "dropout in the unit (not given; 0.1 as SAEM's unit)", ge=0.0, le=1.0)
    ln_eps: float = param(1e-12, "LayerNorm epsilon of the unit (BERT's 1e-12)", gt=0.0)
    channels: int = param(256, "filters per window size of the c1 CNN (as the c0 head: 256)", ge=1)
    ngrams: list[int] = param(attrs.Factory(lambda: [1, 2, 3]), "window sizes of the c1 CNN (1, 2, 3)")
    head_dropout: float = param(0.1, "dropout before the c1 FC (not given; as the c0 head saem.cnn: 0.1)", ge=0.0,
                                le=1.0)
    head_layer_norm: bool = param(True, "LayerNorm after the c1 FC (the paper: 'similar to' the c0 head)")
    head_ln_eps: float = param(1e-12, "epsilon of that LayerNorm (not given; saem.cnn's 1e-12)", gt=0.0)

    @property
    def width(self) -> int:
        return self.embed_dim or 1024

    def ports(self, image: LocalPort, text: LocalPort) -> ScorePort:
        d = self.width
        if image.dim != d:
            raise PortError(f"{self.name}: the image fragments have width {image.dim} but the joint sequence has"
                            f" d = {d}; set embed_dim = {image.dim} or size the image encoder to {d}")
        if not self.project_text and text.dim != d:
            raise PortError(f"{self.name}: the text fragments have width {text.dim}, not d = {d}; set"
                            " project_text = true to project them")
        _unit_ports(self.name, d, self.heads)
        if not self.ngrams or min(self.ngrams) < 1:
            raise PortError(f"{self.name}: ngrams must be a non-empty list of window sizes >= 1, got {self.ngrams}")
        return ScorePort()

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        d = self.width
        return CrossAttentionScore(dim=d, text_dim=text.dim, heads=self.heads, intermediate=self.intermediate or d,
                                   activation=self.activation, dropout=self.dropout, ln_eps=self.ln_eps,
                                   project_text=self.project_text, channels=self.channels, ngrams=tuple(self.ngrams),
                                   head_dropout=self.head_dropout, head_layer_norm=self.head_layer_norm,
                                   head_ln_eps=self.head_ln_eps, attention_scale=self.attention_scale)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # float32 numbers per pair at the peak of a no-grad forward: two (h, k, n) arrays of the
        # cross-modal logits (the exponentials are taken in place; einsum may copy them once), two
        # row arrays per joint row and one FFN inner row, and one n-gram window array per window size
        # (the CNN's products, C per offset, and their shifted sums). Measured as peak RSS growth over
        # one block (32 x 64 and 64 x 128 pairs, k = 36, n = 16 to 32, d = 64 and 256): 0.95 to 0.97 of this.
        k, n, d = image_len, text_len, self.width
        f, c, windows = self.intermediate or d, self.channels, len(self.ngrams)
        floats = 2 * self.heads * k * n + 2 * (k + n) * d + (k + n) * f + windows * n * c
        return FLOAT * floats
