"""DP-RNN's recurrent visual embedding alone, as a [[match]] ``pair`` stage (Chen & Luo, AAAI 2020, eq. 14-15).

    [[match]]
    pair  = dprnn.recurrent    o^new per pair: each image's objects reordered by their most related
                               word in the caption, a bi-GRU over them (PairLocal, image side)
    cross = scan.i2t           SCAN's attention from those per-pair objects over the words
    ...

This is the paper's "SCAN-based" variant (Table 3: the object RNN inserted into SCAN), which any
cross stage that reads a PairLocal can take. ``dprnn.macm`` keeps its own copy of the same
computation because it runs it only on the pairs its early selection keeps.

The relatedness P(i, j) = a^w_j <o_i, w_j> needs MACM's word attention a^w, which this stage does
not have: here a^w is uniform (ASSUMPTION), so p_i = argmax_j <o_i, w_j>, and nothing in the stage is
trained but the GRU. The switch ``recurrent`` (a [[train.phase]] may turn it off, as DP-RNN's first
phase does) passes the encoder's objects through unchanged.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from itmkit.attention import context_major_dots
from itmkit.ops import l2norm
from itmkit.stage import PortError, Stage, param
from itmkit.types import Local, LocalPort, PairLocal, PairLocalPort, lengths_to_mask

from itmkit_dprnn.rnn import input_gates, pair_bigru

FLOAT = 4


class RecurrentObjects(nn.Module):
    """image: Local (Ni, R, D) objects, text: Local (Nt, L, D) words -> PairLocal (Ni, Nt, R, D), image side.

    Pair (i, t)'s objects are sorted by p_k = argmax over t's valid words of <o_k, w_j> (stable: detector
    order among objects of one word, padding last), then a bi-GRU (directions averaged) runs over them.
    """

    def __init__(self, *, dim: int, bidirectional: bool = True, normalize: bool = True, recurrent: bool = True):
        super().__init__()
        self.normalize = normalize
        self.object_rnn = nn.GRU(dim, dim, batch_first=True, bidirectional=bidirectional)
        self.register_buffer("recurrent", torch.tensor(bool(recurrent)))

    def forward(self, *, image: Local, text: Local) -> PairLocal:
        ni, nt = image.feats.shape[0], text.feats.shape[0]
        if not bool(self.recurrent):
            objects = image.feats * image.mask[..., None]
            return PairLocal(objects[:, None].expand(ni, nt, *objects.shape[1:]), image.mask[:, None], "image")
        rows = torch.arange(ni, device=image.feats.device).repeat_interleave(nt)  # pair p = (rows[p], cols[p])
        cols = torch.arange(nt, device=image.feats.device).repeat(ni)
        dots = context_major_dots(text.feats, image.feats)[rows, :, cols]  # <o_k, w_j> (P, R, L)
        related = dots.masked_fill(~text.mask[cols][:, None, :], float("-inf")).argmax(dim=-1)  # p_k (P, R)
        related = related.masked_fill(~image.mask[rows], dots.shape[-1])  # padded objects after every word
        order = torch.sort(related, dim=-1, stable=True).indices
        lengths = image.mask.sum(dim=1)
        valid = lengths_to_mask(lengths[rows], image.feats.shape[1])  # the valid objects come first now
        out = pair_bigru(self.object_rnn, input_gates(self.object_rnn, image.feats), rows, order, valid)
        if self.normalize:
            out = l2norm(out) * valid[..., None]
        mask = lengths_to_mask(lengths, image.feats.shape[1])[:, None]  # (Ni, 1, R)
        return PairLocal(out.view(ni, nt, *out.shape[1:]), mask, "image", order.view(ni, nt, -1))


@attrs.frozen(kw_only=True)
class Recurrent(Stage):
    """DP-RNN's recurrent visual embedding (eq. 14-15): objects reordered per caption, a bi-GRU, per pair."""

    name = "dprnn.recurrent"
    kind = "pair"
    paper = "Chen & Luo 2020 (DP-RNN, AAAI), eq. 14-15 (recurrent visual embedding); Table 3's SCAN-based variant"

    bidirectional: bool = param(True, "bi-GRU over the reordered objects, directions averaged (eq. 15)")
    normalize: bool = param(True, "l2-normalise o^new (ASSUMPTION, as dprnn.macm's normalize_rnn)")
    recurrent: bool = param(True, "run the object RNN (the initial value of the switch `recurrent`; off, the"
                                  " encoder's objects pass through)")

    def ports(self, image: LocalPort, text: LocalPort) -> PairLocalPort:
        if image.dim != text.dim:
            raise PortError(f"dprnn.recurrent orders objects by their dot products with the words: both need one"
                            f" width, got image {image.dim} and text {text.dim}")
        return PairLocalPort(image.dim, "image")

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return RecurrentObjects(dim=image.dim, bidirectional=self.bidirectional, normalize=self.normalize,
                                recurrent=self.recurrent)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict | None = None) -> int:
        """Per pair at the GRU's peak: the gathered input gates of both directions (2 x 3 R D), the states of
        both directions and their average (3 R D), the output (R D), the (R, L) products and their order."""
        dim = ports["image"].dim if ports and "image" in ports else 1024
        return FLOAT * (10 * image_len * dim + 3 * image_len * text_len) + 64
