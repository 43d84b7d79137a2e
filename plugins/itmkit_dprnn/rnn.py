"""The object bi-GRU of DP-RNN (eq. 15) over many reordered copies of few images, from per-image input gates.

Every pair (i, t) of a block runs the GRU over image i's objects in the order caption t gives them.
The input half of each GRU step, W_ih o + b_ih, depends only on the object, not on the order, so it
is computed once per image and each pair *gathers* its rows in its own order; only the recurrent half
h W_hh runs per pair. That halves the products against ``nn.GRU`` on gathered objects, and a loop
over the R positions with a validity mask replaces packing (no sorting of the pairs by length, no
re-padding). The weights are those of the ``nn.GRU`` passed in (gate order r, z, n as PyTorch's), so
its parameters, checkpoints and the phase path ``object_rnn`` are unchanged; a test pins this to
``nn.GRU`` on each unpadded sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def input_gates(gru: nn.GRU, objects: torch.Tensor) -> list[torch.Tensor]:
    """W_ih o + b_ih of each direction for every object of every image: [(Ni, R, 3H)] per direction."""
    suffixes = ["", "_reverse"] if gru.bidirectional else [""]
    return [F.linear(objects, getattr(gru, f"weight_ih_l0{s}"), getattr(gru, f"bias_ih_l0{s}")) for s in suffixes]


def _direction(gates: torch.Tensor, valid: torch.Tensor, weight_hh: torch.Tensor, bias_hh: torch.Tensor,
               reverse: bool) -> torch.Tensor:
    """One direction over (P, R, 3H) input gates with a (P, R) prefix mask: hidden states (P, R, H).

    h_k = (1 - z) * n + z * h_{k-1}, r, z = sigmoid(gi + gh), n = tanh(gi_n + r * gh_n), gh = W_hh h + b_hh.
    A padded position keeps the state it has: forward, past the sequence (read by nothing); backward,
    the zero state until the last valid object, where the reverse pass must start.
    """
    p, length, three = gates.shape
    hidden = three // 3
    h = gates.new_zeros(p, hidden)
    states: list[torch.Tensor] = [h] * length
    for k in (range(length - 1, -1, -1) if reverse else range(length)):
        gi = gates[:, k]
        gh = torch.addmm(bias_hh, h, weight_hh.T)
        r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        n = torch.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
        h = torch.where(valid[:, k:k + 1], n + z * (h - n), h)
        states[k] = h
    return torch.stack(states, dim=1)


def pair_bigru(gru: nn.GRU, gates: list[torch.Tensor], rows: torch.Tensor, order: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
    """The GRU's outputs (P, R, H), directions averaged, over image rows[p]'s objects in order[p].

    ``gates``: ``input_gates`` of the block's images; ``order`` (P, R) each pair's object order (valid
    objects first); ``valid`` (P, R) bool prefix mask. Padded positions of the result are 0.
    """
    index = rows[:, None], order
    out = _direction(gates[0][index], valid, gru.weight_hh_l0, gru.bias_hh_l0, reverse=False)
    if gru.bidirectional:
        backward = _direction(gates[1][index], valid, gru.weight_hh_l0_reverse, gru.bias_hh_l0_reverse, reverse=True)
        out = (out + backward) / 2
    return out * valid[..., None]
