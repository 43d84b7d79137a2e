"""VSRN (Li, Zhang, Li, Li, Fu, ICCV 2019): Visual Semantic Reasoning for image-text matching.

A VSRN model in a recipe (the official EncoderImagePrecompAttn, both dataset branches):

    [image] encoder   core.precomp, normalize = false     v_i = W f_i + b                    (Local)
            reasoners [vsrn.l2norm axis = "regions"]      COCO branch only (see below)
                      vsrn.rsgcn x 4                      v* = BN(W_o (R g(v))) + v,  R = theta(v)^T phi(v) / N
                      vsrn.l2norm axis = "regions"        what the caption decoder reads
            pool      vsrn.gru                            GRU over the regions in order, final state
                                                          [-> BatchNorm, F30K branch] -> l2norm (Global)
    [text]  core.bigru bidirectional = false -> core.last  a uni-GRU's state at the last word, l2norm
    score   core.dot,  loss core.triplet (hardest negative),  [[objective]] vsrn.caption (weight 1)

The official ``l2norm`` sums over dim 1. On the (B, 36, D) region tensor that is the *region*
axis: every channel is normalised across the image's regions, not every region across its
channels. The official code does this after the GCN blocks on both branches, and also right
after the projection on every dataset but ``f30k_precomp``; ``vsrn.l2norm`` replicates it
(``axis = "features"`` is the per-region norm the paper's text suggests).

Padding: the official features always hold 36 valid regions. Here an image may hold fewer,
padded to the batch's longest; every stage reads the valid ones only (mask), so that with all
regions valid each stage computes exactly the official forward (tests/official.py is the
official forward, written with its Conv1d layout).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.ops import float32, l2norm
from itmkit.stage import PortError, Stage, param
from itmkit.types import GlobalPort, Local, LocalPort, LossPort, Tokens, TokensPort

# ================================================================================ helpers


def masked_batch_norm(bn: nn.BatchNorm1d, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BatchNorm of the valid rows of (B, N, D) only: statistics (and running averages) over the M valid regions.

    With every region valid this is the official BatchNorm1d over (B, D, N), whose statistics run
    over B * N. Padded rows come back as zeros and never enter a statistic.
    """
    out = feats.new_zeros(feats.shape)
    out[mask] = bn(feats[mask])  # (M, D): BatchNorm1d over the M valid rows
    return out


def _packed_gru(rnn: nn.GRU, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``rnn`` over each item's valid prefix: (outputs (B, N, H) zero past each length, final state (B, H))."""
    lengths = mask.sum(dim=1).clamp(min=1).cpu()  # an empty item reads one (zero) row
    packed = pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
    out, hidden = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=feats.shape[1])
    return out, hidden[-1]


# ===================================================================== region-axis l2norm


class AxisL2Norm(nn.Module):
    """x / ||x|| over the regions of each channel (``axis="regions"``) or over the channels of each region.

    Local (B, N, D) -> Local (B, N, D). Over the regions, only the valid ones count and padded rows
    come back as zeros. ``eps`` is added to the norm (the official VSRN l2norm adds nothing).
    """

    def __init__(self, *, axis: str = "regions", eps: float = 0.0):
        super().__init__()
        self.axis = axis
        self.eps = eps

    def forward(self, x: Local) -> Local:
        feats = x.feats.masked_fill(~x.mask[..., None], 0.0)  # (B, N, D)
        feats = l2norm(feats, dim=1 if self.axis == "regions" else -1, eps=self.eps)
        return Local(feats, x.mask, x.extras)


@attrs.frozen(kw_only=True)
class L2Norm(Stage):
    """The official VSRN l2norm of a (B, N, D) tensor: over dim 1, i.e. each channel across the regions."""

    name = "vsrn.l2norm"
    kind = "reasoner"
    paper = ("Li et al. 2019 (VSRN), official model.py l2norm (sum over dim=1) as EncoderImagePrecompAttn applies it"
             " to (B, 36, D): after the GCN blocks, and after fc on every dataset but f30k_precomp")

    axis: str = param("regions", "normalise each channel across the valid regions (official, dim=1) or each"
                                 " region across its channels", choices=("regions", "features"))
    eps: float = param(0.0, "added to the norm (official VSRN: none; SCAN's l2norm: 1e-8)", ge=0.0)

    def ports(self, x: LocalPort) -> LocalPort:
        return LocalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return AxisL2Norm(axis=self.axis, eps=self.eps)


# ================================================================================= Rs-GCN


class RsGCNBlock(nn.Module):
    """One region-relationship reasoning block (VSRN's region relationship reasoning; the official Rs_GCN):

        R = theta(V) phi(V)^T / N      (B, N, N) affinities of the valid regions, no softmax
        Y = R g(V)                     (B, N, I)
        V* = BN(W_o Y) + V             (B, N, D), residual

    theta, phi, g, W_o are the official 1x1 Conv1d, here Linear over the channel axis (same
    weights, squeezed of the kernel axis). N is the image's count of *valid* regions (the
    official N = 36 when all are valid); padded regions are neither rows nor columns of R. The
    BatchNorm counts only valid regions (``masked_batch_norm``); gamma and beta start at 0 as in
    the official code, so a new block is the identity.
    """

    def __init__(self, *, dim: int, inter_dim: int):
        super().__init__()
        self.g = nn.Linear(dim, inter_dim)
        self.theta = nn.Linear(dim, inter_dim)
        self.phi = nn.Linear(dim, inter_dim)
        self.W = nn.Sequential(nn.Linear(inter_dim, dim), nn.BatchNorm1d(dim))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: Local) -> Local:
        mask = x.mask  # (B, N)
        v = x.feats.masked_fill(~mask[..., None], 0.0)  # (B, N, D); garbage (NaN) in padding never reaches R
        count = mask.sum(dim=1).clamp(min=1).to(v.dtype)[:, None, None]  # N per image
        affinity = self.theta(v) @ self.phi(v).transpose(1, 2)  # (B, N, N)
        affinity = affinity.masked_fill(~mask[:, None, :], 0.0) / count  # padded regions are no neighbours
        y = affinity @ self.g(v)  # (B, N, I)
        out = masked_batch_norm(self.W[1], self.W[0](y), mask) + v
        return Local(out.masked_fill(~mask[..., None], 0.0), mask, x.extras)


@attrs.frozen(kw_only=True)
class RsGCN(Stage):
    """Region relationship reasoning (VSRN, Rs-GCN): a residual non-local GCN block over the image's regions."""

    name = "vsrn.rsgcn"
    kind = "reasoner"
    paper = ("Li et al. 2019 (VSRN), region relationship reasoning (Rs-GCN); official GCN_lib/Rs_GCN.py"
             " (inter_channels = embed_size)")

    inter_dim: int | None = param(None, "size of theta, phi and g (official: inter_channels = embed_size, the"
                                        " default when unset)", ge=1)

    def ports(self, x: LocalPort) -> LocalPort:
        return LocalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return RsGCNBlock(dim=x.dim, inter_dim=self.inter_dim or x.dim)


# ========================================================================== GRU aggregator


class GRUPool(nn.Module):
    """Global semantic reasoning (VSRN): a GRU reads the regions in order; its final state is the image.

    Local (B, N, D) -> (B, D): GRU(D, D) over each image's valid regions (packed), the hidden
    state after the last one, then BatchNorm1d (``batch_norm``, the official F30K branch) and
    l2norm over the channels (``normalize``; the official no_imgnorm off).
    """

    def __init__(self, *, dim: int, batch_norm: bool = False, normalize: bool = True, eps: float = 0.0):
        super().__init__()
        self.rnn = nn.GRU(dim, dim, 1, batch_first=True)
        self.bn = nn.BatchNorm1d(dim) if batch_norm else None
        self.normalize = normalize
        self.eps = eps

    def forward(self, x: Local) -> torch.Tensor:
        _, final = _packed_gru(self.rnn, x.feats.masked_fill(~x.mask[..., None], 0.0), x.mask)  # (B, D)
        if self.bn is not None:
            final = self.bn(final)
        return l2norm(final, eps=self.eps) if self.normalize else final


@attrs.frozen(kw_only=True)
class GRU(Stage):
    """VSRN's global reasoning: a GRU over the reasoned regions; its final hidden state (+ BN on F30K) is the image."""

    name = "vsrn.gru"
    kind = "aggregator"
    paper = "Li et al. 2019 (VSRN), global semantic reasoning (GRU memory); official model.py img_rnn + bn"

    batch_norm: bool = param(False, "BatchNorm1d on the final state (the official code does it for data_name ="
                                    " f30k_precomp only)")
    normalize: bool = param(True, "l2-normalise the image vector (official: no_imgnorm off)")
    eps: float = param(0.0, "added to the norm (official VSRN: none)", ge=0.0)

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return GRUPool(dim=x.dim, batch_norm=self.batch_norm, normalize=self.normalize, eps=self.eps)


# ===================================================================== caption generation


class EncoderRNN(nn.Module):
    """The S2VT encoder over regions: dropout(W r_i + b) -> GRU over each image's valid regions."""

    def __init__(self, *, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.vid2hid = nn.Linear(dim, hidden)
        self.input_dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(hidden, hidden, 1, batch_first=True)
        nn.init.xavier_normal_(self.vid2hid.weight)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _packed_gru(self.rnn, self.input_dropout(self.vid2hid(feats)), mask)


class Attention(nn.Module):
    """Additive attention of the decoder state h over the encoded regions e_i:

        a_i = w . tanh(W1 [e_i ; h] + b1),   context = sum_i softmax_i(a) e_i   (valid regions only)
    """

    def __init__(self, *, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim * 2, dim)
        self.linear2 = nn.Linear(dim, 1, bias=False)

    def region_part(self, encoded: torch.Tensor) -> torch.Tensor:
        """W1[:, :H] e_i + b1 (B, N, H): the half of W1 [e ; h] that is the same at every step."""
        half = encoded.shape[-1]
        return F.linear(encoded, self.linear1.weight[:, :half], self.linear1.bias)

    def forward(self, hidden: torch.Tensor, encoded: torch.Tensor, region_part: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        half = encoded.shape[-1]
        pre = region_part + F.linear(hidden, self.linear1.weight[:, half:])[:, None]  # (B, N, H)
        scores = self.linear2(torch.tanh(pre)).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, N)
        return (float32(scores).softmax(dim=1)[:, None] @ encoded).squeeze(1)  # (B, H)


class DecoderRNN(nn.Module):
    """The S2VT attention decoder, teacher-forced: step t reads word t and the attended regions, predicts word t+1."""

    def __init__(self, *, vocab_size: int, hidden: int, word_dim: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim)
        self.attention = Attention(dim=hidden)
        self.input_dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(hidden + word_dim, hidden, 1, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)
        nn.init.xavier_normal_(self.out.weight)

    def forward(self, encoded: torch.Tensor, final: torch.Tensor, mask: torch.Tensor,
                inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the words after ``inputs`` (B, T), from the encoder's outputs and final state."""
        words = self.embedding(inputs)  # (B, T, W)
        region_part = self.attention.region_part(encoded)
        hidden = final[None].contiguous()  # (1, B, H)
        outputs = []
        for t in range(inputs.shape[1]):  # sequential in time; vectorised over the batch
            context = self.attention(hidden[0], encoded, region_part, mask)
            step = self.input_dropout(torch.cat([words[:, t], context], dim=1))[:, None]  # (B, 1, W + H)
            out, hidden = self.rnn(step, hidden)
            outputs.append(out)
        return self.out(torch.cat(outputs, dim=1))


def caption_targets(tokens: Tokens, max_len: int, pad_after_end: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official caption_label / caption_mask, (B, max_len + 1) each, from zero-padded token ids.

    A caption of L tokens (<start> words <end>) longer than max_len - 1 keeps its first
    max_len - 1 tokens and its last one; labels are the ids zero-padded to max_len + 1 and the
    mask covers the caption *and one position past it* (the official ``mask[:first_zero + 1]``),
    so the decoder is also taught to say <pad> (id 0) after <end>; ``pad_after_end = False``
    drops that extra position.
    """
    ids, lengths = tokens.ids, tokens.lengths.clamp(min=1)
    b = ids.shape[0]
    width = max_len + 1
    labels = ids.new_zeros(b, width)
    keep = min(ids.shape[1], width)
    labels[:, :keep] = ids[:, :keep]
    positions = torch.arange(width, device=ids.device)[None]
    long = lengths > max_len - 1
    kept = torch.where(long, torch.full_like(lengths, max_len), lengths)  # tokens after truncation
    last = ids.gather(1, (lengths - 1)[:, None]).squeeze(1)  # <end> (the caption's own last token)
    labels = torch.where(long[:, None] & (positions == max_len - 1), last[:, None], labels)
    labels = labels.masked_fill(positions >= kept[:, None], 0)
    mask = positions < (kept + (1 if pad_after_end else 0))[:, None]
    return labels, mask


class CaptionLoss(nn.Module):
    """Caption generation from the reasoned regions (VSRN): S2VT attention decoder, cross-entropy.

    loss = -sum_{b,t} m_{b,t} log p(y_{b,t} | y_{b,<t}, regions_b) / B over the targets t = 1 ..
    max_len - 1 of ``caption_targets``, summed over words and averaged over captions (the
    official LanguageModelCriterion). Training only; the decoder is not part of scoring.
    """

    def __init__(self, *, dim: int, vocab_size: int, hidden: int = 512, word_dim: int = 300, dropout: float = 0.2,
                 max_len: int = 60, pad_after_end: bool = True):
        super().__init__()
        self.max_len = max_len
        self.pad_after_end = pad_after_end
        self.encoder = EncoderRNN(dim=dim, hidden=hidden, dropout=dropout)
        self.decoder = DecoderRNN(vocab_size=vocab_size, hidden=hidden, word_dim=word_dim, dropout=dropout)

    def forward(self, *, image: Local, tokens: Tokens, positives: torch.Tensor | None = None,
                epoch: int = 0) -> torch.Tensor:
        labels, mask = caption_targets(tokens, self.max_len, self.pad_after_end)  # (B, max_len + 1)
        # The official decoder always runs max_len - 1 steps; steps past every caption's mask change
        # nothing (the GRU is causal), so only the longest caption's are run.
        steps = max(min(int(mask[:, 1:].sum(dim=1).max()), self.max_len - 1), 1)
        regions = image.feats.masked_fill(~image.mask[..., None], 0.0)
        encoded, final = self.encoder(regions, image.mask)
        logits = float32(self.decoder(encoded, final, image.mask, labels[:, :steps]))  # (B, T, V); the loss in float32
        targets, weights = labels[:, 1:steps + 1], mask[:, 1:steps + 1].to(logits.dtype)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(weights)
        return (nll * weights).sum() / labels.shape[0]


@attrs.frozen(kw_only=True)
class Caption(Stage):
    """VSRN's caption-generation objective: an S2VT attention decoder over the reasoned regions, cross-entropy."""

    name = "vsrn.caption"
    kind = "objective"
    paper = ("Li et al. 2019 (VSRN), text generation from the reasoned regions, trained with L = L_M + L_G;"
             " official models/{EncoderRNN,DecoderRNN,Attention}.py, misc/utils.py LanguageModelCriterion")

    hidden_dim: int = param(512, "hidden size of the encoder and decoder GRUs (official dim_hidden)", ge=1)
    word_dim: int = param(300, "decoder word embedding size (official dim_word)", ge=1)
    dropout: float = param(0.2, "input dropout of the encoder and decoder (official input_dropout_p)", ge=0.0,
                           le=1.0)
    max_len: int = param(60, "caption length with <start> and <end>; longer ones are cut (official max_len,"
                             " train.py 60)", ge=2)
    pad_after_end: bool = param(True, "also train the decoder to predict <pad> after <end> (the official mask"
                                      " covers one position past the caption)")

    def ports(self, image: LocalPort, tokens: TokensPort) -> LossPort:
        if tokens.dim < 2:
            raise PortError(f"vsrn.caption decodes words of the text vocabulary, which has {tokens.dim} entries")
        return LossPort()

    def build(self, image: LocalPort, tokens: TokensPort) -> nn.Module:
        return CaptionLoss(dim=image.dim, vocab_size=tokens.dim, hidden=self.hidden_dim, word_dim=self.word_dim,
                           dropout=self.dropout, max_len=self.max_len, pad_after_end=self.pad_after_end)
