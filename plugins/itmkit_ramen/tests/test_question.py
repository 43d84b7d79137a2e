"""ramen.question + ramen.question_vector against the code's QuestionEmbedding (tests/official.py)."""

from __future__ import annotations

import pytest
import torch

from itmkit.testing import check_stage
from itmkit.types import Local, Tokens, lengths_to_mask
from itmkit_ramen.question import QuestionEncoder, QuestionVector
from itmkit_ramen.stages import Question, QuestionVectorPool

from . import official

TOL = dict(rtol=0, atol=1e-10)


def encoder(pad_to: int = 0) -> tuple[QuestionEncoder, official.QuestionEmbedding]:
    torch.manual_seed(0)
    ours = QuestionEncoder(vocab_size=20, word_dim=5, hidden=3, pad_to=pad_to).double()
    theirs = official.QuestionEmbedding(5, 6).double()
    theirs.rnn.load_state_dict(ours.rnn.state_dict())
    return ours, theirs


def captions(lengths=(7, 3, 5, 1), width=7, seed=1) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(4, 20, (len(lengths), width), generator=g)
    return Tokens(ids.masked_fill(~lengths_to_mask(lengths, width), 0), lengths)


def test_packed_q_is_the_code_on_each_caption_at_its_true_length():
    ours, theirs = encoder()
    tokens = captions()
    with torch.no_grad():
        q = QuestionVector()(ours(tokens))
        for b, n in enumerate(tokens.lengths.tolist()):
            expected = theirs(ours.embed(tokens.ids[b:b + 1, :n]))
            torch.testing.assert_close(q[b], expected[0], **TOL)


def test_pad_to_reads_the_zero_padding_as_the_vqa_code():
    """pad_to = 6: cut to 6 words, zero vectors to 6 (the code's zero padding row), GRU unpacked."""
    ours, theirs = encoder(pad_to=6)
    tokens = captions()
    with torch.no_grad():
        local = ours(tokens)
        q = QuestionVector()(local)
        assert local.feats.shape[1] == 6 and bool(local.mask.all())
        for b, n in enumerate(tokens.lengths.clamp(max=6).tolist()):
            words = torch.zeros(1, 6, 5, dtype=torch.float64)
            words[0, :n] = ours.embed(tokens.ids[b, :n])
            torch.testing.assert_close(q[b], theirs(words)[0], **TOL)


def test_the_vector_takes_forward_at_the_last_valid_word_and_backward_at_the_first():
    feats = torch.arange(2 * 4 * 6, dtype=torch.float64).view(2, 4, 6)
    q = QuestionVector()(Local(feats, lengths_to_mask(torch.tensor([4, 2]), 4)))
    torch.testing.assert_close(q[1], torch.cat([feats[1, 1, :3], feats[1, 0, 3:]]), **TOL)
    torch.testing.assert_close(q[0], torch.cat([feats[0, 3, :3], feats[0, 0, 3:]]), **TOL)


@pytest.mark.parametrize("cls", [Question, QuestionVectorPool])
def test_conformance(cls):
    check_stage(cls)
