"""GPO / VSE-infinity (Chen, Hu, Song, Li, Vasconcelos, CVPR 2021): the Generalized Pooling Operator.

A VSE-infinity model is VSE++ with both aggregators replaced by a GPO:

    image  regions f_n   -> gpo.precomp  h_n = W f_n + b + MLP(f_n)      (Local)
    text   words         -> gpo.bigru | gpo.bert                          (Local)
    each side            -> gpo.pool     v = l2norm(sum_k theta_k max_k {h_n})   (Global)
    score                =  core.cosine  <v, u>,  loss core.triplet (sum for one epoch, then hardest)

GPO (eq. 2-5): every channel of the set is sorted in descending order and the sorted values are
averaged with weights theta_k = softmax_k(MLP(BiGRU(PE(1..N)))_k / 0.1) that depend only on the
set size N. Training-time augmentations of the official code live in the encoders: regions are
dropped with p = 0.2 ("size augmentation", Sec. 3.3), and each caption token (BERT: each word) is
with p = 0.2 masked (50%), replaced by a random token (10%) or deleted (40%). The formulas, and
where the official code differs from the paper, are in docs/plugins/gpo.md.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.core_stages import GRUTextEncoder
from itmkit.data.vocab import Vocabulary
from itmkit.ops import float32, l2norm, xavier_linear_
from itmkit.stage import PortError, Stage, param
from itmkit.types import GlobalPort, Local, LocalPort, Regions, RegionsPort, Tokens, TokensPort, lengths_to_mask
from itmkit_bert.stages import BertEncoder, BertTextEncoder, load_bert
from itmkit_bert.vocab import WordPieceVocabulary

# ==================================================================================== GPO


def positional_encoding(length: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal encodings of positions 0..length-1 (eq. 4): (length, dim), sin on even channels, cos on odd."""
    if dim % 2:
        raise ValueError(f"sinusoidal positional encodings need an even dim, got {dim}")
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]  # (N, 1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)
    return pe.to(dtype)


class GPOPool(nn.Module):
    """v = sum_k theta_k max_k({x_n}) per channel over the valid set; theta from a BiGRU over positional encodings.

    Local (B, N, D) -> (B, D). The weights depend on the set size only, so they are computed once
    per distinct size in the batch. Padded fragments are never sorted in and get no weight.
    """

    def __init__(self, *, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1, normalize: bool = True):
        super().__init__()
        self.d_pe = d_pe
        self.temperature = temperature
        self.normalize = normalize
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def pool_weights(self, sizes: torch.Tensor) -> torch.Tensor:
        """theta for sets of the given sizes (S,) >= 1: (S, max size), 0 beyond each size (eq. 3, 5)."""
        width = int(sizes.max())
        valid = lengths_to_mask(sizes, width)  # (S, N)
        pe = positional_encoding(width, self.d_pe, device=sizes.device, dtype=self.linear.weight.dtype)
        pe = pe.expand(len(sizes), width, self.d_pe) * valid[..., None]  # PE(0..n-1), zero past each size
        packed = pack_padded_sequence(pe, sizes.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=width)  # (S, N, 2H)
        half = out.shape[-1] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2).squeeze(-1)  # (S, N), directions averaged
        scores = scores.masked_fill(~valid, float("-inf"))  # official: -10000 / 0.1, whose exp is exactly 0 too
        return torch.softmax(float32(scores) / self.temperature, dim=1)  # float32 under mixed precision

    def forward(self, x: Local) -> torch.Tensor:
        lengths = x.mask.sum(dim=1)  # (B,)
        width = max(int(lengths.max()), 1)
        feats, mask = x.feats[:, :width], x.mask[:, :width, None]  # (B, N, D), (B, N, 1); prefix masks
        sizes, which = torch.unique(lengths.clamp(min=1), return_inverse=True)
        weights = self.pool_weights(sizes)[which]  # (B, n_max) with n_max == width
        # Each channel sorted descending over the valid fragments; padding sorts last and is zeroed.
        ranked = feats.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~mask, 0.0)
        pooled = (ranked * weights[..., None]).sum(dim=1)  # (B, D); an empty set pools to 0
        return l2norm(pooled) if self.normalize else pooled


@attrs.frozen(kw_only=True)
class Pool(Stage):
    """GPO (Chen et al. 2021, eq. 2-5): per-channel sorted features weighted by a BiGRU over positional encodings."""

    name = "gpo.pool"
    kind = "aggregator"
    paper = "Chen et al. 2021 (VSE-infinity), Sec. 3.2-3.3, eq. 2 (weighted sorted pooling), 3-5 (theta generator)"

    d_pe: int = param(32, "size of the sinusoidal positional encoding (official: 32)", ge=2)
    d_hidden: int = param(32, "hidden size of the BiGRU that reads the encodings (official: 32)", ge=1)
    temperature: float = param(0.1, "softmax temperature of the pooling weights (official: 0.1)", gt=0.0)
    normalize: bool = param(True, "l2-normalise the pooled vector (official: no_imgnorm / no_txtnorm off)")

    def __attrs_post_init__(self) -> None:
        if self.d_pe % 2:
            raise ValueError(f"d_pe must be even (sin and cos channels), got {self.d_pe}")

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return GPOPool(d_pe=self.d_pe, d_hidden=self.d_hidden, temperature=self.temperature, normalize=self.normalize)


# ========================================================================== image encoder


def drop_regions(feats: torch.Tensor, mask: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size augmentation: each valid region kept with probability 1 - p, the kept ones moved to the front in order.

    Returns the gathered features (B, R, F), the new prefix mask (B, R) and the gather order (B, R).
    An image that would lose every region keeps them all (the official loader would crash on it).
    Draws from torch's global CPU generator, so ``torch.manual_seed`` makes it reproducible.
    """
    keep = mask & (torch.rand(mask.shape).to(mask.device) > p)  # official: np.random.rand(n) > 0.20
    emptied = ~keep.any(dim=1, keepdim=True)
    keep = torch.where(emptied, mask, keep)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept regions first, in their order
    gathered = feats.gather(1, order[..., None].expand_as(feats))
    return gathered, lengths_to_mask(keep.sum(dim=1), mask.shape[1]), order


class PrecompMLPEncoder(nn.Module):
    """h_n = W f_n + b + MLP(f_n), MLP = Linear(F, D/2) -> BatchNorm -> ReLU -> Linear(D/2, D): Regions -> Local.

    In training, regions are dropped with ``drop_prob`` and the batch is cut to its longest set;
    padded regions enter as zero rows, and (as in the official code, whose loader pads with zeros)
    they take part in the BatchNorm statistics.
    """

    def __init__(self, *, in_dim: int, embed_dim: int, drop_prob: float = 0.2):
        super().__init__()
        self.drop_prob = drop_prob
        self.fc = nn.Linear(in_dim, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, embed_dim // 2), nn.BatchNorm1d(embed_dim // 2), nn.ReLU(),
                                 nn.Linear(embed_dim // 2, embed_dim))
        xavier_linear_(self.fc)  # the official init of fc; the MLP keeps PyTorch's defaults

    def forward(self, x: Regions) -> Local:
        feats, mask = x.feats, x.mask
        boxes = x.boxes
        if self.training:
            if self.drop_prob > 0:
                feats, mask, order = drop_regions(feats, mask, self.drop_prob)
                if boxes is not None:
                    boxes = boxes.gather(1, order[..., None].expand_as(boxes))
            width = max(int(mask.sum(dim=1).max()), 1)
            feats, mask = feats[:, :width], mask[:, :width]
            boxes = boxes[:, :width] if boxes is not None else None
        feats = feats.masked_fill(~mask[..., None], 0.0)  # (B, N, F), zero rows as the official collate pads
        b, n, f = feats.shape
        hidden = self.fc(feats) + self.mlp(feats.reshape(b * n, f)).view(b, n, -1)  # (B, N, D)
        return Local(hidden, mask, {"boxes": boxes} if boxes is not None else {})


@attrs.frozen(kw_only=True)
class Precomp(Stage):
    """VSE-infinity region encoder (Chen et al. 2021, Sec. 5): a linear map plus an MLP residual; size augmentation."""

    name = "gpo.precomp"
    kind = "encoder"
    paper = ("Chen et al. 2021 (VSE-infinity), Sec. 3.3 size augmentation and Sec. 5 (BUTD region features);"
             " the official EncoderImageAggr, precomp_enc_type=basic")

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim)", ge=2)
    drop_prob: float = param(0.2, "size augmentation: in training each region is dropped with this probability"
                                  " (official: 0.2; 0 = off)", ge=0.0, le=0.99)

    def ports(self, x: RegionsPort) -> LocalPort:
        return LocalPort(self.embed_dim or 1024)

    def build(self, x: RegionsPort) -> nn.Module:
        return PrecompMLPEncoder(in_dim=x.dim, embed_dim=self.embed_dim or 1024, drop_prob=self.drop_prob)


# ===================================================================== caption augmentation


def augment_tokens(
    ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    prob: float,
    mask_share: float,
    replace_share: float,
    mask_id: int,
    vocab_size: int,
    continuation: torch.Tensor | None = None,
    protect_ends: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPO's caption augmentation on padded ids (B, L): each unit is touched with ``prob``; a touched unit is
    masked (share ``mask_share``), replaced by random ids (``replace_share``) or deleted (the rest).

    A unit is one token, or with ``continuation`` (a bool per token id, True for '##' pieces) one
    word: its first piece and the pieces that continue it, all treated alike. ``protect_ends``
    leaves the first and last valid token ([CLS], [SEP]) untouched. Deleted tokens are removed
    and the rest moved up; a caption that would lose every token keeps them. Draws from torch's
    global CPU generator. Returns the new ids (zero-padded, cut to the longest) and lengths.
    """
    b, width = ids.shape
    device = ids.device
    valid = lengths_to_mask(lengths, width)
    position = torch.arange(width, device=device).expand(b, width)
    touchable = valid.clone()
    if protect_ends:
        touchable &= (position > 0) & (position < lengths[:, None] - 1)
    draw = torch.rand(b, width).to(device)
    if continuation is not None:  # every piece of a word shares its first piece's draw
        starts = ~continuation.to(device)[ids] | ~touchable
        first = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=1).values
        draw = draw.gather(1, first)
    touched = touchable & (draw < prob)
    share = draw / prob  # the official prob /= 0.2
    masked = touched & (share < mask_share)
    replaced = touched & (share >= mask_share) & (share < mask_share + replace_share)
    deleted = touched & (share >= mask_share + replace_share)
    random_ids = torch.randint(0, vocab_size, (b, width)).to(device)
    out = torch.where(masked, torch.full_like(ids, mask_id), ids)
    out = torch.where(replaced, random_ids, out)
    keep = valid & ~deleted
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, valid)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    new_lengths = keep.sum(dim=1)
    new_width = max(int(new_lengths.max()), 1)
    out = out.gather(1, order)[:, :new_width]
    return out.masked_fill(~lengths_to_mask(new_lengths, new_width), 0), new_lengths


def _check_shares(mask_share: float, replace_share: float) -> None:
    if mask_share + replace_share > 1.0:
        raise ValueError(f"mask_share + replace_share must be at most 1 (the rest is deleted), got"
                         f" {mask_share} + {replace_share}")


# ======================================================================== text encoders


class AugmentedGRUTextEncoder(GRUTextEncoder):
    """The SCAN-lineage (bi)GRU text encoder with GPO's token augmentation applied to its input in training."""

    def __init__(self, *, mask_id: int | None, augment_prob: float = 0.2, mask_share: float = 0.5,
                 replace_share: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.mask_id = mask_id
        self.augment_prob = augment_prob
        self.mask_share = mask_share
        self.replace_share = replace_share

    def forward(self, x: Tokens) -> Local:
        if self.training and self.augment_prob > 0:
            if self.mask_id is None:
                raise RuntimeError("gpo.bigru's caption augmentation replaces words by <mask>, which this vocabulary"
                                   " lacks; itmkit adds it when it builds the vocabulary for a gpo.bigru recipe"
                                   " (or set augment_prob = 0)")
            ids, lengths = augment_tokens(x.ids, x.lengths, prob=self.augment_prob, mask_share=self.mask_share,
                                          replace_share=self.replace_share, mask_id=self.mask_id,
                                          vocab_size=self.embed.num_embeddings)
            x = Tokens(ids, lengths)
        return super().forward(x)


@attrs.frozen(kw_only=True)
class BiGRU(Stage):
    """VSE-infinity BiGRU text encoder (Chen et al. 2021): directions averaged, no word norm, caption augmentation."""

    name = "gpo.bigru"
    kind = "encoder"
    paper = ("Chen et al. 2021 (VSE-infinity), bigru branch EncoderText and its caption augmentation"
             " (process_caption); Sec. 3.3 size augmentation")

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim)", ge=1)
    word_dim: int = param(300, "word embedding size (official: 300)", ge=1)
    num_layers: int = param(1, "stacked GRU layers (official: 1)", ge=1)
    bidirectional: bool = param(True, "run a bi-GRU and average the two directions (official: always)")
    normalize: bool = param(False, "l2-normalise each word vector (official: no; the pooled vector is)")
    augment_prob: float = param(0.2, "in training each token (<start> and <end> too) is augmented with this"
                                     " probability (official: 0.2; 0 = off)", ge=0.0, le=1.0)
    mask_share: float = param(0.5, "of the augmented tokens, the share replaced by <mask> (official: 0.5)",
                              ge=0.0, le=1.0)
    replace_share: float = param(0.1, "of the augmented tokens, the share replaced by a random word (official: 0.1);"
                                      " the rest are deleted", ge=0.0, le=1.0)

    def __attrs_post_init__(self) -> None:
        _check_shares(self.mask_share, self.replace_share)

    def ports(self, x: TokensPort) -> LocalPort:
        return LocalPort(self.embed_dim or 1024)

    def build(self, x: TokensPort) -> nn.Module:
        return AugmentedGRUTextEncoder(
            vocab_size=x.dim, word_dim=self.word_dim, embed_dim=self.embed_dim or 1024, num_layers=self.num_layers,
            bidirectional=self.bidirectional, normalize=self.normalize, mask_id=x.mask_id,
            augment_prob=self.augment_prob, mask_share=self.mask_share, replace_share=self.replace_share)

    def vocabulary(self, words: Any) -> Any:
        """The data's words with <mask> appended, as the official code appends it (V + 1 words)."""
        vocab = words()
        if not isinstance(vocab, Vocabulary) or vocab.mask_id is not None:
            return vocab
        extended = Vocabulary(list(vocab.idx2word))
        extended.add_word(Vocabulary.MASK)
        return extended


class AugmentedBertTextEncoder(BertTextEncoder):
    """BERT text encoder with GPO's word augmentation ([MASK] / random pieces / deletion) in training."""

    def __init__(self, *, continuation: torch.Tensor, mask_id: int, augment_prob: float = 0.2,
                 mask_share: float = 0.5, replace_share: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.register_buffer("continuation", continuation, persistent=False)  # derived from the tokenizer
        self.mask_id = mask_id
        self.augment_prob = augment_prob
        self.mask_share = mask_share
        self.replace_share = replace_share

    def forward(self, x: Tokens) -> Local:
        if self.training and self.augment_prob > 0:
            ids, lengths = augment_tokens(x.ids, x.lengths, prob=self.augment_prob, mask_share=self.mask_share,
                                          replace_share=self.replace_share, mask_id=self.mask_id,
                                          vocab_size=len(self.continuation), continuation=self.continuation,
                                          protect_ends=True)
            x = Tokens(ids, lengths)
        return super().forward(x)


@attrs.frozen(kw_only=True)
class Bert(BertEncoder):
    """VSE-infinity BERT text encoder (Chen et al. 2021): BERT + linear, with word-level caption augmentation."""

    name = "gpo.bert"
    paper = ("Chen et al. 2021 (VSE-infinity), master branch EncoderText (bert-base-uncased + Linear(768, D)) and"
             " its caption augmentation (process_caption)")

    augment_prob: float = param(0.2, "in training each word of the caption ([CLS] and [SEP] never) is augmented"
                                     " with this probability (official: 0.2; 0 = off)", ge=0.0, le=1.0)
    mask_share: float = param(0.5, "of the augmented words, the share whose pieces become [MASK] (official: 0.5)",
                              ge=0.0, le=1.0)
    replace_share: float = param(0.1, "of the augmented words, the share whose pieces become random tokens"
                                      " (official: 0.1); the rest are deleted", ge=0.0, le=1.0)

    def __attrs_post_init__(self) -> None:
        _check_shares(self.mask_share, self.replace_share)

    def build(self, x: TokensPort) -> nn.Module:
        tokenizer = WordPieceVocabulary.load(self.path)
        if tokenizer.mask_id is None:
            raise PortError(f"the tokenizer of {self.path} has no [MASK] token, which caption augmentation needs")
        return AugmentedBertTextEncoder(
            bert=load_bert(self.path, pretrained=self.pretrained), embed_dim=self.embed_dim or 1024,
            freeze=self.freeze, lr_scale=self.lr_scale, normalize=self.normalize,
            continuation=torch.tensor(tokenizer.continuation(), dtype=torch.bool), mask_id=tokenizer.mask_id,
            augment_prob=self.augment_prob, mask_share=self.mask_share, replace_share=self.replace_share)
