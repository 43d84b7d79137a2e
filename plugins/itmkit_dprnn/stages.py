"""DP-RNN (Chen & Luo, AAAI 2020): Expressing Objects just like Words, the dual-path RNN matcher.

A DP-RNN model in a recipe is

    [image] encoder = dprnn.objects    o_i = (W_f f_i + b_f) * sigmoid(W_p pos_i + b_p)       Sec. 3.1
    [text]  encoder = core.bigru       w_j = (h->_j + h<-_j) / 2                              eq. 1-3
    [[match]] similarity = dprnn.macm  the object RNN over the objects reordered by their most
                                       related word (eq. 14-15), then MACM's score (eq. 4-12):
                                       S_w (model-W, orientation "word") or S_o (model-O, "object")

The paper's figures average a model-W and a model-O: two checkpoints given to ``itmkit eval``.

``dprnn.macm`` is pair-dependent when its object RNN runs: each image's objects are reordered by
the caption (p_i = argmax_j a^w_j <o_i, w_j>), so every image x caption pair runs its own
bi-GRU. A block runs them as ONE packed GRU batch of its pairs. During a training step the pair
early-selection (eq. 16) keeps, per caption, the positives and the top-d other images of the
block by S_em = sum_ij P(i, j), and only those pairs run the model; the rest get a finite score
below every real one, so the hinge loss never picks them.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import nn

from itmkit.attention import context_major_dots, masked_softmax
from itmkit import explain
from itmkit.errors import DataError
from itmkit.ops import EPS, l2norm, xavier_linear_
from itmkit.stage import BoxLayout, DataNeeds, PortError, Stage, param
from itmkit.types import BlockContext, Local, LocalPort, Regions, RegionsPort, ScorePort, lengths_to_mask

from itmkit_dprnn.macm import CLIPS, object_oriented, word_oriented
from itmkit_dprnn.rnn import input_gates, pair_bigru

FLOAT = 4  # bytes of a float32

# ============================================================================ object encoder


def box_descriptor(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """pos_i = (w / W, h / H, cx / W, cy / H) from x1, y1, x2, y2 pixel boxes (B, R, 4) and (B, 2) width, height."""
    size = image_sizes.to(boxes.dtype)[:, None, :].clamp(min=1.0)  # (B, 1, 2) = W, H
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(high - low) / size, (low + high) / 2 / size], dim=-1)


class ObjectEncoder(nn.Module):
    """o_i = (W_f f_i + b_f) * sigmoid(W_p pos_i + b_p) for each region (element-wise), optionally l2-normalised."""

    def __init__(self, *, in_dim: int, embed_dim: int, position: bool = True, normalize: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.position = nn.Linear(4, embed_dim) if position else None
        self.normalize = normalize
        xavier_linear_(self.fc)  # SCAN's init of the region FC; the position FC keeps PyTorch's default

    def positions(self, x: Regions) -> torch.Tensor:
        """The (B, R, 4) box descriptors; a DataError that names the files when the data has no boxes."""
        if x.boxes is None or x.image_sizes is None:
            missing = "region boxes" if x.boxes is None else "image sizes"
            raise DataError(
                f"dprnn.objects needs {missing}: its position branch reads each region's box as"
                " Regions.boxes (B, R, 4) x1, y1, x2, y2 in pixels and Regions.image_sizes (B, 2) width, height;"
                " the data folder needs {split}_boxes.npy (N_img, R, 4) and {split}_sizes.npy (N_img, 2)"
                " (see docs/data.md), or set image.encoder.position = false to drop the position branch")
        boxes = x.boxes
        if boxes.dim() != 3 or tuple(boxes.shape[:2]) != tuple(x.feats.shape[:2]) or boxes.shape[-1] != 4:
            raise DataError(f"dprnn.objects reads boxes (B, R, 4) x1, y1, x2, y2 in pixels matching the features"
                            f" {tuple(x.feats.shape)}; got Regions.boxes of shape {tuple(boxes.shape)}"
                            " (PFAN's 30-column block layout is not a box)")
        return box_descriptor(boxes.to(x.feats.dtype), x.image_sizes)

    def forward(self, x: Regions) -> Local:
        feats = self.fc(x.feats)  # fo_i (B, R, h)
        if self.position is not None:
            feats = feats * torch.sigmoid(self.position(self.positions(x)))  # fo_i * po_i
        if self.normalize:
            feats = l2norm(feats)
        extras = {"boxes": x.boxes} if x.boxes is not None else {}
        return Local(feats, x.mask, extras)


@attrs.frozen(kw_only=True)
class Objects(Stage):
    """DP-RNN object encoder: o_i = (W_f f_i + b_f) * sigmoid(W_p pos_i + b_p), pos_i = box (w, h, cx, cy) / image size."""

    name = "dprnn.objects"
    kind = "encoder"
    paper = "Chen & Luo 2020 (DP-RNN, AAAI), Sec. 3.1 image encoder with the object position branch"

    embed_dim: int | None = param(None, "joint embedding size h (default: [recipe].embed_dim; DP-RNN: 1024)", ge=1)
    position: bool = param(True, "multiply each object by sigmoid(W_p pos_i + b_p) from its box (the paper);"
                                 " false: the plain FC, and no boxes are needed")
    normalize: bool = param(True, "l2-normalise each object vector (ASSUMPTION: the paper does not say; SCAN"
                                  " does, and P(i, j) is a raw dot product that depends on it)")

    def ports(self, x: RegionsPort) -> LocalPort:
        return LocalPort(self.embed_dim or 1024)

    def data_needs(self) -> DataNeeds:
        if not self.position:
            return DataNeeds()
        return DataNeeds(boxes=(BoxLayout(4, "x1, y1, x2, y2 in pixels", needs_sizes=True),))

    def build(self, x: RegionsPort) -> nn.Module:
        return ObjectEncoder(in_dim=x.dim, embed_dim=self.embed_dim or 1024, position=self.position,
                             normalize=self.normalize)


# ============================================================================ the matcher

UNSELECTED = -3.0  # unselected pairs score UNSELECTED + S_em / (1 + |S_em|), in (-4, -2): below every
#                    MACM score (a weighted mean of cosines, in [-1, 1]) and still ordered by S_em


class DualPathMatch(nn.Module):
    """Score every image x caption pair of a block with DP-RNN (eq. 4-16); see the module docstring.

    image: Local (Ni, R, h) objects o; text: Local (Nt, L, h) words w. Returns (Ni, Nt).
    """

    def __init__(self, *, dim: int, orientation: str = "word", lambda_object: float = 9.0,
                 lambda_word: float = 4.0, beta_word: float = 0.3, beta_object: float = 0.3, clip: str = "relu",
                 recurrent: bool = True, bidirectional: bool = True, normalize_rnn: bool = True,
                 preselect_train: int = 10, preselect: int = 0, preselect_without_rnn: bool = True,
                 object_word_attention: str = "uniform", eps: float = EPS):
        super().__init__()
        self.orientation = orientation
        self.lambda_object, self.lambda_word = lambda_object, lambda_word
        self.beta_word, self.beta_object = beta_word, beta_object
        self.clip, self.eps = clip, eps
        self.bidirectional, self.normalize_rnn = bidirectional, normalize_rnn
        self.preselect_train, self.preselect, self.preselect_without_rnn = preselect_train, preselect, preselect_without_rnn
        # W_w (1 x h): a^w weighs S_w and P(i, j). In model-O it only feeds the argmax reorder and the
        # early selection, so nothing trains it there: it is frozen, zero (uniform a^w) or as initialised.
        self.word_attention = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax
        if orientation == "object":
            self.word_attention.weight.requires_grad_(False)
            if object_word_attention == "uniform":
                nn.init.zeros_(self.word_attention.weight)
            self.object_attention = nn.Linear(dim, 1, bias=False)
        self.object_rnn = nn.GRU(dim, dim, batch_first=True, bidirectional=bidirectional)
        # A switch (see itmkit.phases): phase 1 of DP-RNN's schedule trains MACM without the RNN.
        self.register_buffer("recurrent", torch.tensor(bool(recurrent)))

    # -------------------------------------------------------------- pieces of the paper

    def word_weights(self, text: Local) -> torch.Tensor:
        """a^w_j = softmax_j(beta_w W_w w_j) over the valid words (Nt, L), 0 on padding (eq. 10)."""
        logits = self.beta_word * self.word_attention(text.feats).squeeze(-1)
        return masked_softmax(logits, text.mask, dim=-1)

    def object_weights(self, objects: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """a~^o_i = softmax_i(beta_o W_o o_i) over the valid objects (..., R), 0 on padding (eq. 11)."""
        logits = self.beta_object * self.object_attention(objects).squeeze(-1)
        return masked_softmax(logits, mask.expand_as(logits), dim=-1)

    def early_scores(self, image: Local, text: Local, word_weights: torch.Tensor) -> torch.Tensor:
        """S_em(I, T) = sum_i sum_j a^w_j <o_i, w_j> over the valid objects and words (Ni, Nt) (eq. 16).

        The double sum factors: sum_j a^w_j <sum_i o_i, w_j>, one (Ni, D) x (D, Nt L) product.
        """
        summed = (image.feats * image.mask[..., None]).sum(dim=1)  # (Ni, D)
        nt, length, dim = text.feats.shape
        per_word = (summed @ text.feats.reshape(nt * length, dim).T).view(-1, nt, length)  # (Ni, Nt, L)
        return (per_word * word_weights[None]).sum(dim=-1)

    def select(self, early: torch.Tensor, positives: torch.Tensor, d: int) -> torch.Tensor:
        """(Ni, Nt) bool: per caption its positives and its top-d other images by S_em (eq. 16)."""
        ni = early.shape[0]
        if d >= ni:
            return torch.ones_like(positives)
        others = early.detach().masked_fill(positives, float("-inf"))
        top = others.topk(d, dim=0).indices  # (d, Nt)
        return torch.zeros_like(positives).scatter_(0, top, True) | positives

    def reorder(self, object_mask: torch.Tensor, dots: torch.Tensor, word_weights: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        """Each pair's object order (P, R): by the position of each object's most related word (eq. 14).

        dots <o_i, w_j> (P, R, L), word_weights a^w (P, L), masks (P, R), (P, L). p_i = argmax over the
        valid words of a^w_j <o_i, w_j>; a stable sort by p_i keeps detector order among objects with the
        same word (ASSUMPTION) and puts padded objects last.
        """
        relatedness = (word_weights[:, None, :] * dots).masked_fill(~word_mask[:, None, :], float("-inf"))
        word = relatedness.argmax(dim=-1)  # p_i (P, R)
        word = word.masked_fill(~object_mask, dots.shape[-1])  # padding after every word
        return torch.sort(word, dim=-1, stable=True).indices

    def run_rnn(self, objects: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """o^new_i = (h->_i + h<-_i) / 2 over each pair's reordered valid objects (P, R, D) (eq. 15).

        objects (Ni, R, D) the block's images; pair p reads image rows[p] in order[p]; valid (P, R) prefix.
        """
        out = pair_bigru(self.object_rnn, input_gates(self.object_rnn, objects), rows, order, valid)
        return l2norm(out) if self.normalize_rnn else out

    def macm(self, dots, object_gram, word_gram, object_mask, word_mask, word_weights, objects,
             report=None) -> torch.Tensor:
        """MACM's score of the pairs laid out on the leading axes (eq. 4-12), as the orientation asks.

        ``report``: None, or a function given MACM's attention weights (..., R, L) (see ``_reporter``).
        """
        if self.orientation == "word":
            return word_oriented(dots, object_gram, torch.diagonal(word_gram, dim1=-2, dim2=-1), object_mask,
                                 word_mask, word_weights, lambda_softmax=self.lambda_word, clip=self.clip, eps=self.eps,
                                 report=report)
        return object_oriented(dots, word_gram, torch.diagonal(object_gram, dim1=-2, dim2=-1), object_mask, word_mask,
                               self.object_weights(objects, object_mask), lambda_softmax=self.lambda_object,
                               clip=self.clip, eps=self.eps, report=report)

    def _reporter(self, order: torch.Tensor | None = None):
        """While ``itmkit explain`` records: a function reporting MACM's attention (pair 0 first), else None.

        Model-W reports each word's softmax over the objects ("word->object", query side "text"), model-O
        each object's over the words ("object->word", "image"). With the object RNN the objects of pair p
        are o^new in ``order[p]`` (position s holds the state of the step that read object order[p, s]):
        the weights are put back in the image's object order, so that column r is the image's region r.
        """
        if explain.active() is None:
            return None

        def report(alpha: torch.Tensor) -> None:  # (..., R, L)
            if self.orientation == "word":
                explain.note_attention(alpha.transpose(-1, -2), "text", "word->object", region_order=order)
            else:
                explain.note_attention(alpha, "image", "object->word", region_order=order)

        return report

    # -------------------------------------------------------------- the block

    def forward(self, *, image: Local, text: Local, context: BlockContext | None = None) -> torch.Tensor:
        recurrent = bool(self.recurrent)
        word_weights = self.word_weights(text)  # a^w (Nt, L)
        ni, nt = image.feats.shape[0], text.feats.shape[0]
        d = self.preselect_train if context is not None else self.preselect
        if context is not None and not recurrent and not self.preselect_without_rnn:
            d = 0
        selected = early = None
        if d > 0:
            early = self.early_scores(image, text, word_weights)
            positives = context.positives if context is not None else torch.zeros(ni, nt, dtype=torch.bool,
                                                                                     device=early.device)
            selected = self.select(early, positives.to(early.device), d)
        if selected is None and not recurrent:
            return self._flat_block(image, text, word_weights)
        if selected is None:
            selected = torch.ones(ni, nt, dtype=torch.bool, device=image.feats.device)
        rows, cols = selected.nonzero(as_tuple=True)
        scores = self._pairs(image, text, word_weights, rows, cols, recurrent)
        if early is None:
            return scores.view(ni, nt)
        floor = (UNSELECTED + early / (1 + early.abs())).detach().to(scores.dtype)
        return floor.index_put((rows, cols), scores)

    def _flat_block(self, image: Local, text: Local, word_weights: torch.Tensor) -> torch.Tensor:
        """MACM on the encoder's objects for the whole block, without per-pair copies of either side."""
        objects = image.feats * image.mask[..., None]  # padded rows 0: finite products whatever they held
        dots = context_major_dots(text.feats, objects).permute(0, 2, 1, 3)  # (Ni, Nt, R, L) view
        object_gram = (objects @ objects.transpose(1, 2))[:, None]  # (Ni, 1, R, R)
        word_gram = (text.feats @ text.feats.transpose(1, 2))[None]  # (1, Nt, L, L)
        return self.macm(dots, object_gram, word_gram, image.mask[:, None], text.mask[None], word_weights[None],
                         objects[:, None], self._reporter())

    def _pairs(self, image: Local, text: Local, word_weights: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               recurrent: bool) -> torch.Tensor:
        """The scores (P,) of the pairs (rows[p], cols[p]), running the object RNN per pair when ``recurrent``."""
        words, word_mask, weights = text.feats[cols], text.mask[cols], word_weights[cols]  # (P, L, D), (P, L)
        object_mask = image.mask[rows]  # (P, R)
        order = None
        if recurrent:
            # <o_i, w_j> of the encoder's objects: one GEMM for the block, each pair's (R, L) picked from it
            dots = context_major_dots(text.feats, image.feats)[rows, :, cols]  # (P, R, L)
            order = self.reorder(object_mask, dots, weights, word_mask)
            lengths = object_mask.sum(dim=1)
            object_mask = lengths_to_mask(lengths, image.feats.shape[1])  # valid objects come first now
            objects = self.run_rnn(image.feats, rows, order, object_mask)
        else:
            objects = image.feats[rows]  # (P, R, D)
        objects = objects * object_mask[..., None]
        dots = objects @ words.transpose(1, 2)
        object_gram = objects @ objects.transpose(1, 2)
        word_gram = words @ words.transpose(1, 2)
        # explain keeps the first pair's map: report only when that pair is (0, 0) (the pairs run in row order)
        report = self._reporter(order) if explain.active() is not None and int(rows[0]) == int(cols[0]) == 0 else None
        return self.macm(dots, object_gram, word_gram, object_mask, word_mask, weights, objects, report)


@attrs.frozen(kw_only=True)
class Macm(Stage):
    """DP-RNN matcher: the object RNN over objects reordered by their most related word, then MACM's S_w or S_o."""

    name = "dprnn.macm"
    kind = "similarity"
    paper = ("Chen & Luo 2020 (DP-RNN, AAAI), eq. 4-12 (MACM), eq. 14-15 (recurrent visual embedding),"
             " eq. 16 (pair early-selection)")

    orientation: Literal["word", "object"] = param(
        "word", "the score: 'word' S_w = sum_j a^w_j cos(w_j, m_j) (model-W), 'object' S_o = sum_i a~^o_i"
                " cos(o_i, t_i) (model-O); the paper averages one model of each", choices=("word", "object"))
    lambda_object: float = param(9.0, "lambda_1, inverse temperature of the object-queried softmax over words"
                                      " (DP-RNN: 9; used by orientation 'object')", gt=0.0)
    lambda_word: float = param(4.0, "lambda_2, inverse temperature of the word-queried softmax over objects"
                                    " (DP-RNN: 4; used by orientation 'word')", gt=0.0)
    beta_word: float = param(0.3, "beta_w of the word self-attention a^w = softmax(beta_w W_w w) (DP-RNN: 0.3)",
                             ge=0.0)
    beta_object: float = param(0.3, "beta_o of the object self-attention a~^o = softmax(beta_o W_o o) (DP-RNN:"
                                    " 0.3 on Flickr30K, 0 on COCO = plain mean)", ge=0.0)
    clip: str = param("relu", "clip of the cosines before the query-axis norm: 'relu' max(x, 0) as the paper"
                              " writes, 'leaky_relu' LeakyReLU(0.1) as SCAN's code", choices=CLIPS)
    recurrent: bool = param(True, "run the object RNN (the initial value of the switch `recurrent`, which a"
                                  " [[train.phase]] may turn off; false throughout: the paper's 'Multi-ATT')")
    bidirectional: bool = param(True, "bi-GRU over the reordered objects, directions averaged (eq. 15)")
    normalize_rnn: bool = param(True, "l2-normalise o^new (ASSUMPTION: the paper does not say; the attended"
                                      " vectors m_j depend on the objects' norms)")
    preselect_train: int = param(10, "pair early-selection in training: per caption the positives plus the top-d"
                                     " other images of the block by S_em run the model (DP-RNN: d = 10); 0 ="
                                     " every pair", ge=0)
    preselect: int = param(0, "the same when scoring (ASSUMPTION, the paper scores every pair): top-d images per"
                              " caption *within each scoring block*, the rest ranked below by S_em; 0 = off",
                           ge=0)
    preselect_without_rnn: bool = param(True, "early-select also while the object RNN is switched off (phase"
                                              " 1; ASSUMPTION: the paper describes one training procedure)")
    object_word_attention: Literal["uniform", "random"] = param(
        "uniform", "model-O's W_w, which no loss term reaches (it feeds only the reorder and S_em): 'uniform'"
                   " zero, a^w = 1/n; 'random' frozen at its initialisation (the spec's ASSUMPTION, a copy of"
                   " model-W's, needs a checkpoint-initialisation the core does not have)",
        choices=("uniform", "random"))
    eps: float = param(EPS, "floor of the norm products of the cosines and of the query-axis norms (SCAN: 1e-8)",
                       gt=0.0)

    def ports(self, image: LocalPort, text: LocalPort) -> ScorePort:
        if image.dim != text.dim:
            raise PortError(f"dprnn.macm compares objects and words directly: their widths must be equal, got"
                            f" image {image.dim} and text {text.dim}; give both encoders the same embed_dim")
        return ScorePort()

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return DualPathMatch(dim=image.dim, orientation=self.orientation, lambda_object=self.lambda_object,
                             lambda_word=self.lambda_word, beta_word=self.beta_word, beta_object=self.beta_object,
                             clip=self.clip, recurrent=self.recurrent, bidirectional=self.bidirectional,
                             normalize_rnn=self.normalize_rnn, preselect_train=self.preselect_train,
                             preselect=self.preselect, preselect_without_rnn=self.preselect_without_rnn,
                             object_word_attention=self.object_word_attention, eps=self.eps)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict | None = None) -> int:
        """Per pair at the peak of a no-grad forward with the RNN on (the scoring default).

        Live together at the RNN: one direction's gathered input gates (3 R D), its hidden states and
        their stacked copy (2 R D), the other direction's output (R D), o^new and its normalised copy
        (2 R D), the gathered words (L D); then MACM's (R, L) products, cosines, norms and weights
        (~ 8 R L) and the object Gram (R R). Measured as the growth of peak resident memory over one
        block (D 32 to 1024, 64 to 4096 pairs, 36 objects, 12 to 30 words), the real peak is 0.5 (small
        D, where the (R, L) terms are overcounted) to 0.9 of this.
        """
        dim = ports["image"].dim if ports and "image" in ports else 1024
        r, length = image_len, text_len
        return FLOAT * (9 * r * dim + length * dim + 8 * r * length + 2 * r * r) + 64
