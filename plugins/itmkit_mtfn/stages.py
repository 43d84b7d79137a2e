"""MTFN (Wang, Xu, Yang, Hanjalic, Shen, Song, ACM MM 2019): Multi-modal Tensor Fusion Network.

An MTFN model in a recipe (the official Wangt-CN/MTFN-RR-PyTorch-Code, FusionNoattn_baseline.yaml):

    [image] encoder = core.raw, pool = core.mean       v = mean of the raw region features    (B, 2048)
    [text]  encoder = mtfn.skipthoughts                 the uni-skip GRU states, word by word (B, L, 2400)
            pool    = core.last                         t = the state at the caption's last word
    [[match]] similarity = mtfn.fusion                  s(v, t) = sigmoid(w . z + b),
                                                        z = act_mm( sum_r hv_r(v) (.) ht_r(t) )   Sec. 3.2 eq. 3-5

``mtfn.fusion`` is pair-dependent (a rank-R bilinear fusion and a classifier per pair) but is
scored for a whole Ni x Nt block with batched products. When nothing non-linear follows the sum
over r (no activation_mm, no classifier activation, no classifier dropout: the official
configuration), the logit is bilinear in the two projected vectors,

    w . z + b = sum_r (w (.) hv_r(i)) . ht_r(t) + b = [w hv_1 .. w hv_R](i) . [ht_1 .. ht_R](t) + b,

one matrix product of width R * dim_mm; when hv_r and ht_r are affine too (no activation_hv/ht,
no dropout_hv/ht: again the official configuration) the R terms fold further into one
(dim_hv + 1) x (dim_ht + 1) matrix M = sum_r [W_r b_r]^T diag(w) [U_r c_r], and the logit is
[x_v 1] M [x_t 1]^T + b. Each block takes whichever of the two costs fewer multiplications.
The text encoder is the skip-thoughts BayesianUniSkip GRU as the official checkpoint stores it,
with its per-gate sequential dropout in training; its tokenisation is MTFN's (``MTFNVocabulary``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.data.vocab import Vocabulary, tokenize
from itmkit.ops import float32
from itmkit.stage import PortError, Stage, param
from itmkit.types import GlobalPort, Local, LocalPort, ScorePort, Tokens, TokensPort

FLOAT = 4  # bytes of a float32

# ============================================================================ vocabulary

# data.py drops these tokens from every caption before looking the words up
PUNCTUATION = frozenset([",", ".", ":", ";", "?", "(", ")", "[", "]", "&", "!", "*", "@", "#", "$", "%"])


class MTFNVocabulary:
    """The itmkit word vocabulary with MTFN's tokenisation (the official data.py's __getitem__).

    A caption is lower-cased, split into NLTK tokens, the 16 punctuation tokens above are dropped,
    and each word becomes its id, an unknown one <unk>; there is no <start> and no <end>. The ids
    are the itmkit vocabulary's (<pad> = 0 = the official padding row; the <start> / <end> rows of
    the embedding are never read), so checkpoints store the usual vocabulary JSON.

    ASSUMPTION: a caption with no word left (only punctuation, or empty) is the single id <pad>: one
    GRU step on the zero padding embedding. The official code gives such a caption length 0, and
    `_select_last` then reads index -1, the state after the batch's longest caption's number of steps
    over zero embeddings: its vector depends on the batch it is in. Ours is the official vector in a
    batch whose longest caption has one word.
    """

    def __init__(self, words: Vocabulary):
        self.words = words

    def tokens(self, caption: str) -> list[str]:
        """The caption's words as MTFN keeps them (lower case, NLTK tokens, no punctuation)."""
        return [token for token in tokenize(caption) if token not in PUNCTUATION]

    def encode(self, caption: str) -> list[int]:
        unk = Vocabulary.UNK_ID
        ids = [self.words.word2idx.get(token, unk) for token in self.tokens(caption)]
        return ids or [Vocabulary.PAD_ID]

    def decode(self, ids: Iterable[int]) -> str:
        return self.words.decode(ids)

    def token(self, i: int) -> str:
        return self.words.token(i)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.words

    def __repr__(self) -> str:
        return f"MTFNVocabulary({len(self)} words)"

    @property
    def idx2word(self) -> list[str]:
        return self.words.idx2word

    @property
    def word2idx(self) -> dict[str, int]:
        return self.words.word2idx

    @property
    def mask_id(self) -> int | None:
        return None

    def to_json(self) -> dict[str, Any]:
        return self.words.to_json()

    def sha256(self) -> str:
        return self.words.sha256()


# ============================================================================ text encoder


class SkipThoughtsGRU(nn.Module):
    """The skip-thoughts uni-skip GRU (BayesianUniSkip): embedding (V, 620), GRU 620 -> 2400.

    Tokens (B, L) -> Local (B, L, H): the state after each word. The cell is the official one,

        r = sigmoid(W_ir x + b_ir + W_hr h),  i = sigmoid(W_ii x + b_ii + W_hi h),
        n = tanh(W_in x + b_in + r * (W_hn h)),  h' = (1 - i) * n + i * h,

    i.e. nn.GRU's with a zero hidden bias: the weights live in an nn.GRU (gates r, i, n stacked in
    its r, z, n order) whose bias_hh is zero and frozen, so scoring runs PyTorch's fused GRU. In
    training with dropout > 0 the official BayesianGRUCell drops the input and the state with a
    separate mask per gate (r, i, n on x; r, i, n on h), each drawn once per sequence and reused at
    every step (SequentialDropout); that path runs the cell step by step with those six masks.
    """

    def __init__(self, *, vocab_size: int, word_dim: int = 620, hidden_dim: int = 2400, dropout: float = 0.25,
                 freeze_embedding: bool = False):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)  # official: row 0 = zeros
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # ASSUMPTION (from scratch; official: utable.npy)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.embedding.weight.requires_grad_(not freeze_embedding)
        self.gru = nn.GRU(word_dim, hidden_dim, batch_first=True)
        with torch.no_grad():
            self.gru.bias_hh_l0.zero_()
        self.gru.bias_hh_l0.requires_grad_(False)  # the official hidden Linears have no bias

    def sample_masks(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The six sequential dropout masks: (3, B, word_dim) on x and (3, B, H) on h, gates r, i, n, scaled."""
        keep = 1.0 - self.dropout
        shape_x = (3, batch, self.embedding.embedding_dim)
        shape_h = (3, batch, self.hidden_dim)
        if keep == 0.0:  # SequentialDropout with p = 1 drops everything
            return like.new_zeros(shape_x), like.new_zeros(shape_h)
        mask_x = torch.bernoulli(like.new_full(shape_x, keep)) / keep
        mask_h = torch.bernoulli(like.new_full(shape_h, keep)) / keep
        return mask_x, mask_h

    def forward(self, x: Tokens) -> Local:
        words = self.embedding(x.ids)  # (B, L, W)
        mask = x.mask
        if self.training and self.dropout > 0:
            states = self.dropped_states(words, *self.sample_masks(words.shape[0], words))
        else:
            # a caption of length 0 does not come from MTFNVocabulary; packing needs 1
            lengths = x.lengths.clamp(min=1).cpu()
            packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            states, _ = pad_packed_sequence(out, batch_first=True, total_length=x.ids.shape[1])
        return Local(states * mask[..., None], mask)

    def dropped_states(self, words: torch.Tensor, mask_x: torch.Tensor, mask_h: torch.Tensor) -> torch.Tensor:
        """The states (B, L, H) of the cell with the per-gate masks applied at every step (BayesianGRU)."""
        batch, length, _ = words.shape
        w_ih = self.gru.weight_ih_l0.view(3, self.hidden_dim, -1)  # gates r, i, n
        b_ih = self.gru.bias_ih_l0.view(3, 1, 1, self.hidden_dim)
        w_hh = self.gru.weight_hh_l0.view(3, self.hidden_dim, self.hidden_dim)
        # The input masks are constant in time, so every step's input terms come from one product per gate.
        inputs = torch.einsum("gbw,blw,ghw->gblh", mask_x, words, w_ih) + b_ih  # (3, B, L, H)
        h = words.new_zeros(batch, self.hidden_dim)
        states = []
        for t in range(length):
            hidden = torch.bmm(mask_h * h, w_hh.transpose(1, 2))  # (3, B, H): W_h* (m_h* (.) h) per gate
            r = torch.sigmoid(inputs[0, :, t] + hidden[0])
            i = torch.sigmoid(inputs[1, :, t] + hidden[1])
            n = torch.tanh(inputs[2, :, t] + r * hidden[2])
            h = (1 - i) * n + i * h
            states.append(h)
        return torch.stack(states, dim=1)


@attrs.frozen(kw_only=True)
class SkipThoughts(Stage):
    """MTFN's sentence encoder: the skip-thoughts uni-skip GRU (Kiros et al. 2015) as BayesianUniSkip.

    Tokens -> Local (B, L, hidden_dim), the state after every word; pool it with core.last for the
    sentence vector the official model fuses. Tokenisation is MTFN's (``vocabulary``).
    """

    name = "mtfn.skipthoughts"
    kind = "encoder"
    paper = ("Wang et al. 2019 (MTFN), Sec. 3.1 (skip-thoughts sentence vector); Kiros et al. 2015 uni-skip;"
             " the official BayesianUniSkip / BayesianGRUCell")

    word_dim: int = param(620, "word embedding size (skip-thoughts: 620)", ge=1)
    hidden_dim: int = param(2400, "GRU state size = the sentence vector's width (skip-thoughts: 2400)", ge=1)
    dropout: float = param(0.25, "sequential dropout in training, one mask per caption and gate on the word and on"
                                 " the state (official seq2vec.dropout: 0.25)", ge=0.0, le=1.0)
    freeze_embedding: bool = param(False, "keep the word embedding fixed in training (official seq2vec.fixed_emb)")

    def ports(self, x: TokensPort) -> LocalPort:
        if x.dim < 5:
            raise PortError(f"the vocabulary has {x.dim} entries: no words beyond <pad>, <start>, <end>, <unk>")
        return LocalPort(self.hidden_dim)

    def build(self, x: TokensPort) -> nn.Module:
        return SkipThoughtsGRU(vocab_size=x.dim, word_dim=self.word_dim, hidden_dim=self.hidden_dim,
                               dropout=self.dropout, freeze_embedding=self.freeze_embedding)

    def vocabulary(self, words: Any) -> Any:
        """The data's words, read with MTFN's tokenisation (no <start>/<end>, punctuation dropped)."""
        vocab = words()
        return MTFNVocabulary(vocab) if isinstance(vocab, Vocabulary) else vocab


# ============================================================================ fusion head

# Element-wise functions of torch.nn.functional the official getattr(F, name) can name
ACTIVATIONS = ("none", "tanh", "relu", "sigmoid", "elu", "selu", "celu", "gelu", "silu", "mish", "leaky_relu",
               "relu6", "softplus", "softsign", "tanhshrink", "hardtanh", "hardswish", "hardsigmoid", "logsigmoid")


def activation(name: str):
    """F.<name>, or the identity for 'none' (the official code applies it only when the option is set)."""
    return (lambda x: x) if name == "none" else getattr(F, name)


class TensorFusion(nn.Module):
    """Score every image x caption pair of a block: (Ni, Dv), (Nt, Dt) -> (Ni, Nt) in (0, 1). MTFN eq. 3-5.

        x_v = act_v(W_v drop(v) + b_v),  x_t = act_t(W_t drop(t) + b_t)
        hv_r = act_hv(W_r drop(x_v) + b_r),  ht_r = act_ht(U_r drop(x_t) + c_r),    r = 1..R
        z = act_mm(sum_r hv_r (.) ht_r),  s = sigmoid(w . drop(act_c(z)) + b)

    The R projections of each side are one Linear of width R * dim_mm (rows r*dim_mm.. = the
    official list_linear_hv[r]). Dropout on x_v / x_t before them draws a fresh mask per r, as the
    official loop does.
    """

    def __init__(self, *, dim_v: int, dim_t: int, dim_hv: int = 1024, dim_ht: int = 1024, dim_mm: int = 1024,
                 rank: int = 20, dropout_v: float = 0.25, dropout_t: float = 0.25, dropout_hv: float = 0.0,
                 dropout_ht: float = 0.0, activation_v: str = "tanh", activation_t: str = "tanh",
                 activation_hv: str = "none", activation_ht: str = "none", activation_mm: str = "none",
                 classif_activation: str = "none", classif_dropout: float = 0.0):
        super().__init__()
        self.rank, self.dim_mm = rank, dim_mm
        self.dropout_v, self.dropout_t, self.dropout_hv, self.dropout_ht = dropout_v, dropout_t, dropout_hv, dropout_ht
        self.names = {"v": activation_v, "t": activation_t, "hv": activation_hv, "ht": activation_ht,
                      "mm": activation_mm, "classif": classif_activation}
        self.act = {k: activation(v) for k, v in self.names.items()}
        self.classif_dropout = classif_dropout
        self.linear_v = nn.Linear(dim_v, dim_hv)
        self.linear_t = nn.Linear(dim_t, dim_ht)
        self.linear_hv = nn.Linear(dim_hv, rank * dim_mm)
        self.linear_ht = nn.Linear(dim_ht, rank * dim_mm)
        self.linear_classif = nn.Linear(dim_mm, 1)

    def _dropping(self, p: float) -> bool:
        return self.training and p > 0

    def bilinear(self) -> bool:
        """Whether the logit is a bilinear form of hv and ht (nothing non-linear after the sum over r)."""
        return (self.names["mm"] == "none" and self.names["classif"] == "none"
                and not self._dropping(self.classif_dropout))

    def affine(self) -> bool:
        """Whether hv_r and ht_r are affine in x_v and x_t (then the R terms fold into one matrix)."""
        return (self.bilinear() and self.names["hv"] == "none" and self.names["ht"] == "none"
                and not self._dropping(self.dropout_hv) and not self._dropping(self.dropout_ht))

    def embed(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_v = self.act["v"](self.linear_v(F.dropout(v, self.dropout_v, self.training)))
        x_t = self.act["t"](self.linear_t(F.dropout(t, self.dropout_t, self.training)))
        return x_v, x_t

    def project(self, x: torch.Tensor, linear: nn.Linear, p: float, act) -> torch.Tensor:
        """(N, d) -> (N, R, dim_mm): the R projections, each on its own dropout of x in training."""
        n, d = x.shape
        if self._dropping(p):
            dropped = F.dropout(x.expand(self.rank, n, d), p, True)  # a fresh mask per r
            weight = linear.weight.view(self.rank, self.dim_mm, d)
            out = torch.baddbmm(linear.bias.view(self.rank, 1, self.dim_mm), dropped, weight.transpose(1, 2))
            return act(out.transpose(0, 1))
        return act(linear(x).view(n, self.rank, self.dim_mm))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x_v, x_t = self.embed(image, text)
        ni, nt = len(x_v), len(x_t)
        w, b = self.linear_classif.weight[0], self.linear_classif.bias[0]
        if self.affine() and self.folded_is_cheaper(ni, nt, x_v.shape[1], x_t.shape[1]):
            return torch.sigmoid(float32(self.folded_logits(x_v, x_t)) + b)  # float32 scores under mixed precision
        hv = self.project(x_v, self.linear_hv, self.dropout_hv, self.act["hv"])  # (Ni, R, D)
        ht = self.project(x_t, self.linear_ht, self.dropout_ht, self.act["ht"])  # (Nt, R, D)
        if self.bilinear():
            # w . sum_r hv_r (.) ht_r = sum_{r,d} (w_d hv_rd) ht_rd: one product of width R * D
            logits = (hv * w).reshape(ni, -1) @ ht.reshape(nt, -1).T
            return torch.sigmoid(float32(logits) + b)
        # General: z per pair (Ni, Nt, D), the sum over r as one batched product per channel d.
        z = self.act["mm"](torch.einsum("ird,trd->itd", hv, ht))
        z = F.dropout(self.act["classif"](z), self.classif_dropout, self.training)
        return torch.sigmoid(float32(self.linear_classif(z).squeeze(-1)))

    def folded_is_cheaper(self, ni: int, nt: int, dim_hv: int, dim_ht: int) -> bool:
        """Multiplications of the folded form (M, then [x_v 1] M [x_t 1]^T) against the width-R*D product."""
        width = self.rank * self.dim_mm
        wide = (ni * dim_hv + nt * dim_ht) * width + ni * nt * width
        folded = width * (dim_hv + 1) * (dim_ht + 1) + ni * (dim_hv + 1) * (dim_ht + 1) + ni * nt * (dim_ht + 1)
        return folded < wide

    def folded_logits(self, x_v: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """sum_r (w hv_r) . ht_r with hv_r = W_r x_v + b_r, ht_r = U_r x_t + c_r, as [x_v 1] M [x_t 1]^T."""
        w = self.linear_classif.weight[0]
        a = torch.cat([self.linear_hv.weight, self.linear_hv.bias[:, None]], 1)  # (R*D, dim_hv + 1)
        c = torch.cat([self.linear_ht.weight, self.linear_ht.bias[:, None]], 1)  # (R*D, dim_ht + 1)
        m = (a * w.repeat(self.rank)[:, None]).T @ c  # (dim_hv + 1, dim_ht + 1): sum_r A_r^T diag(w) C_r
        ones_v = x_v.new_ones(len(x_v), 1)
        ones_t = x_t.new_ones(len(x_t), 1)
        return (torch.cat([x_v, ones_v], 1) @ m) @ torch.cat([x_t, ones_t], 1).T


@attrs.frozen(kw_only=True)
class Fusion(Stage):
    """MTFN's tensor-fusion similarity (Sec. 3.2 eq. 3-5, the official Core_Fusion + _classif): a rank-R
    bilinear fusion of the image and sentence vectors, read out by a Linear and a sigmoid.

    Defaults are the official option/FusionNoattn_baseline.yaml ('none' = the option absent).
    """

    name = "mtfn.fusion"
    kind = "similarity"
    paper = "Wang et al. 2019 (MTFN), Sec. 3.2 eq. 3-5; official model.py Core_Fusion and _classif"

    rank: int = param(20, "R, the number of projection pairs whose products are summed (official fusion.R)", ge=1)
    dim_hv: int = param(1024, "width of x_v = act_v(linear_v(v)) (official fusion.dim_hv)", ge=1)
    dim_ht: int = param(1024, "width of x_t = act_t(linear_t(t)) (official fusion.dim_ht)", ge=1)
    dim_mm: int = param(1024, "width of each projection and of the fused vector z (official fusion.dim_mm)", ge=1)
    dropout_v: float = param(0.25, "dropout on the image vector before linear_v (official)", ge=0.0, le=1.0)
    dropout_t: float = param(0.25, "dropout on the sentence vector before linear_t (official)", ge=0.0, le=1.0)
    dropout_hv: float = param(0.0, "dropout on x_v before each of the R image projections (official 0)",
                              ge=0.0, le=1.0)
    dropout_ht: float = param(0.0, "dropout on x_t before each of the R text projections (official 0)",
                              ge=0.0, le=1.0)
    activation_v: str = param("tanh", "activation after linear_v (official tanh)", choices=ACTIVATIONS)
    activation_t: str = param("tanh", "activation after linear_t (official tanh)", choices=ACTIVATIONS)
    activation_hv: str = param("none", "activation after each image projection (official: none)",
                               choices=ACTIVATIONS)
    activation_ht: str = param("none", "activation after each text projection (official: none)",
                               choices=ACTIVATIONS)
    activation_mm: str = param("none", "activation on the fused vector z (official: none)", choices=ACTIVATIONS)
    classif_activation: str = param("none", "activation before the classifier (official classif.activation: none)",
                                    choices=ACTIVATIONS)
    classif_dropout: float = param(0.0, "dropout before the classifier (official classif.dropout 0)", ge=0.0, le=1.0)

    def ports(self, image: GlobalPort, text: GlobalPort) -> ScorePort:
        return ScorePort()

    def build(self, image: GlobalPort, text: GlobalPort) -> nn.Module:
        return TensorFusion(dim_v=image.dim, dim_t=text.dim, dim_hv=self.dim_hv, dim_ht=self.dim_ht,
                            dim_mm=self.dim_mm, rank=self.rank, dropout_v=self.dropout_v, dropout_t=self.dropout_t,
                            dropout_hv=self.dropout_hv, dropout_ht=self.dropout_ht, activation_v=self.activation_v,
                            activation_t=self.activation_t, activation_hv=self.activation_hv,
                            activation_ht=self.activation_ht, activation_mm=self.activation_mm,
                            classif_activation=self.classif_activation, classif_dropout=self.classif_dropout)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        """Scoring (no grad, eval): the bilinear forms keep a logit and a score per pair; the general
        form the fused vector z (the einsum's result, a contiguous copy for the classifier, one per activation)."""
        if self.activation_mm == "none" and self.classif_activation == "none":
            return 4 * FLOAT
        copies = 2 + (self.activation_mm != "none") + (self.classif_activation != "none")
        return copies * self.dim_mm * FLOAT + 4 * FLOAT

