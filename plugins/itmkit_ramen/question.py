"""RAMEN's question embedding (components/language_model.py, QuestionEmbedding) as a caption encoder.

Words -> 300-d embedding -> bi-GRU with half the question width per direction; the question
vector is q = [forward state at the last step ; backward state at the first step].

The VQA code pads questions at the end to a fixed length (14) and runs the GRU unpacked, so both
directions read the padding (zero vectors: the padding row of the embedding is zero). Captions
vary far more in length than VQA questions, so by default the GRU here is packed: it reads each
caption's words only, and q's forward half is the state at the caption's true last word
(ASSUMPTION of the adaptation). ``pad_to = N`` restores the code's reading: captions cut to N
words and padded with zero vectors to N, every step of both directions run, the padded steps
counted as part of the sequence.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.ops import masked_last
from itmkit.types import Local, Tokens, lengths_to_mask


class QuestionEncoder(nn.Module):
    """Tokens (B, L) -> Local (B, L, 2h): every word's [forward state ; backward state]."""

    def __init__(self, *, vocab_size: int, word_dim: int, hidden: int, pad_to: int = 0,
                 dropout_before_rnn: float = 0.0, dropout_after_rnn: float = 0.0):
        super().__init__()
        self.pad_to = pad_to
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # no GloVe here: the init of itmkit's other word embeddings
        self.dropout_before_rnn = nn.Dropout(dropout_before_rnn)
        self.rnn = nn.GRU(word_dim, hidden, batch_first=True, bidirectional=True)
        self.dropout_after_rnn = nn.Dropout(dropout_after_rnn)

    def forward(self, x: Tokens) -> Local:
        if self.pad_to:
            return self._unpacked(x)
        words = self.dropout_before_rnn(self.embed(x.ids))
        packed = pack_padded_sequence(words, x.lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        feats, _ = pad_packed_sequence(out, batch_first=True, total_length=x.ids.shape[1])
        return Local(self.dropout_after_rnn(feats), x.mask)

    def _unpacked(self, x: Tokens) -> Local:
        """The VQA code's reading: N steps, words then zero vectors, no packing."""
        n = self.pad_to
        ids = x.ids[:, :n]
        lengths = x.lengths.clamp(max=n)
        words = self.embed(ids) * lengths_to_mask(lengths, ids.shape[1])[..., None]
        words = nn.functional.pad(words, (0, 0, 0, n - ids.shape[1]))
        out, _ = self.rnn(self.dropout_before_rnn(words))
        every = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        return Local(self.dropout_after_rnn(out), every)


class QuestionVector(nn.Module):
    """Local (B, L, 2h) of [forward ; backward] states -> (B, 2h): forward at the last valid step, backward at the first."""

    def forward(self, x: Local) -> torch.Tensor:
        half = x.feats.shape[-1] // 2
        forward = masked_last(x.feats[..., :half], x.mask, dim=1)
        return torch.cat([forward, x.feats[:, 0, half:]], dim=-1)
