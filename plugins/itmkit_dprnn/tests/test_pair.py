"""dprnn.recurrent (the recurrent visual embedding as a pair stage) against a per-pair loop with nn.GRU."""

from __future__ import annotations

import pytest
import torch

from itmkit.testing import check_stage
from itmkit.types import Local
from itmkit_dprnn.pair import Recurrent, RecurrentObjects


def reference(module: RecurrentObjects, objects: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """One pair, from eq. 14-15: sort the valid objects by their most related valid word (stable), run the
    bi-GRU over them as a sequence, average the directions, l2-normalise."""
    related = (objects @ words.T).argmax(dim=1)
    ordered = objects[sorted(range(len(objects)), key=lambda k: (int(related[k]), k))]
    out, _ = module.object_rnn(ordered[None])
    half = out.shape[-1] // 2
    averaged = (out[0, :, :half] + out[0, :, half:]) / 2
    return averaged / (averaged.norm(dim=-1, keepdim=True) + 1e-8)  # SCAN's l2norm, as itmkit.ops.l2norm


def test_every_pair_equals_the_loop():
    torch.manual_seed(0)
    module = RecurrentObjects(dim=6).double()
    objects = torch.randn(3, 5, 6, dtype=torch.float64)
    words = torch.randn(4, 7, 6, dtype=torch.float64)
    regions, lengths = torch.tensor([5, 2, 4]), torch.tensor([7, 1, 3, 5])
    image = Local(objects, torch.arange(5)[None] < regions[:, None])
    text = Local(words, torch.arange(7)[None] < lengths[:, None])
    with torch.no_grad():
        out = module(image=image, text=text)
    assert out.side == "image" and out.feats.shape == (3, 4, 5, 6)
    for i in range(3):
        for t in range(4):
            r, n = int(regions[i]), int(lengths[t])
            with torch.no_grad():
                expected = reference(module, objects[i, :r], words[t, :n])
            torch.testing.assert_close(out.feats[i, t, :r], expected, rtol=0, atol=1e-10)
            assert out.mask.expand(3, 4, 5)[i, t].tolist() == [k < r for k in range(5)]
            assert not out.feats[i, t, r:].any()


def test_switched_off_it_passes_the_objects_through():
    module = RecurrentObjects(dim=4, recurrent=False)
    objects = torch.randn(2, 3, 4)
    image = Local(objects, torch.tensor([[True, True, True], [True, False, False]]))
    text = Local(torch.randn(5, 2, 4), torch.ones(5, 2, dtype=torch.bool))
    out = module(image=image, text=text)
    assert out.feats.shape == (2, 5, 3, 4)
    torch.testing.assert_close(out.feats[1, 3, 0], objects[1, 0])
    assert not out.feats[1, :, 1:].any()


@pytest.mark.parametrize("cls", [Recurrent])
def test_conformance(cls):
    check_stage(cls)
