"""[[match]] pair stages: one side's fragments rebuilt for every pair (PairLocal), read by SCAN's attention.

A test pair stage shifts each image's regions by the caption's mean word (a stand-in for DP-RNN's
reordered objects or DIME's refined regions); SCAN i-t attention then runs from those per-pair regions.
The block result is checked against a loop over pairs written from SCAN's func_attention.
"""

from __future__ import annotations

import types

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from itmkit import hookimpl
from itmkit.build import DataPorts, build_model
from itmkit.plugins import load_registry
from itmkit.recipe import RecipeError, parse_recipe
from itmkit.stage import Stage, param
from itmkit.testing import check_stage
from itmkit.types import Local, LocalPort, PairLocal, PairLocalPort, Regions, Tokens


class ShiftModule(nn.Module):
    def __init__(self, side: str):
        super().__init__()
        self.side = side

    def forward(self, image: Local, text: Local) -> PairLocal:
        if self.side == "image":  # each image's regions plus the caption's mean word
            words = (text.feats * text.mask[..., None]).sum(1) / text.mask.sum(1, keepdim=True)
            return PairLocal(image.feats[:, None] + words[None, :, None], image.mask[:, None], "image")
        regions = (image.feats * image.mask[..., None]).sum(1) / image.mask.sum(1, keepdim=True)
        return PairLocal(text.feats[None] + regions[:, None, None], text.mask[None], "text")


@attrs.frozen(kw_only=True)
class Shift(Stage):
    """A test pair stage: one side's fragments plus the other side's mean fragment, per pair."""

    name = "testkit.shift"
    kind = "pair"
    paper = "none (a test stage)"
    side: str = param("image", "whose fragments are rebuilt", choices=("image", "text"))

    def ports(self, image: LocalPort, text: LocalPort) -> PairLocalPort:
        return PairLocalPort(image.dim, self.side)

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return ShiftModule(self.side)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict) -> int:
        return 4 * ports["image"].dim * (image_len if self.side == "image" else text_len)


RECIPE = """
[recipe]
name = "pair"
embed_dim = 16
[image]
encoder = { stage = "core.precomp" }
[text]
encoder = { stage = "core.bigru", word_dim = 8 }
[[match]]
pair = { stage = "testkit.shift", side = "SIDE" }
cross = { stage = "CROSS", lambda_softmax = 4.0 }
similarity = { stage = "core.cosine" }
aggregate = { stage = "core.mean" }
[loss]
stage = "core.triplet"
"""


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", "scan")
    module = types.ModuleType("testkit")
    module.register_stages = hookimpl(lambda: [Shift])
    return load_registry([module])


def _recipe(registry, side="image", cross="scan.i2t"):
    return parse_recipe(RECIPE.replace("SIDE", side).replace("CROSS", cross), registry=registry)


def reference(queries: torch.Tensor, context: torch.Tensor, lam: float) -> float:
    """SCAN's attention and mean cosine for one pair, from the official func_attention: (Lq, D), (Lc, D)."""
    attn = F.leaky_relu(context @ queries.T, 0.1)  # (Lc, Lq)
    attn = attn / (attn.norm(dim=1, keepdim=True) + 1e-8)  # over the queries
    weights = torch.softmax(lam * attn.T, dim=1)  # (Lq, Lc), over the context
    attended = weights @ context
    cos = (queries * attended).sum(1) / (queries.norm(dim=1) * attended.norm(dim=1)).clamp(min=1e-8)
    return float(cos.mean())


@pytest.mark.parametrize("side,cross", [("image", "scan.i2t"), ("text", "scan.t2i")])
def test_scan_attention_from_pair_fragments_matches_a_loop_over_pairs(registry, side, cross):
    model = build_model(_recipe(registry, side, cross), DataPorts(feature_dim=12, vocab_size=30), seed=0).double()
    g = torch.Generator().manual_seed(0)
    regions = Regions(torch.rand(3, 5, 12, generator=g, dtype=torch.float64), torch.tensor([5, 3, 4]))
    lengths = torch.tensor([4, 2, 6, 3])
    tokens = Tokens(torch.randint(1, 30, (4, 6), generator=g) * (torch.arange(6) < lengths[:, None]), lengths)
    with torch.no_grad():
        image, text = model.encode_images(regions).local, model.encode_texts(tokens).local
        scores = model.score(model.encode_images(regions), model.encode_texts(tokens))
    for i in range(3):
        for t in range(4):
            r = image.feats[i, : int(regions.lengths[i])]
            w = text.feats[t, : int(lengths[t])]
            if side == "image":
                expected = reference(r + w.mean(0), w, 4.0)
            else:
                expected = reference(w + r.mean(0), r, 4.0)
            assert scores[i, t].item() == pytest.approx(expected, abs=1e-10), (i, t)


def test_a_pair_stage_on_the_other_side_of_the_attention_is_a_port_error(registry):
    with pytest.raises(RecipeError) as info:
        build_model(_recipe(registry, "text", "scan.i2t"), DataPorts(feature_dim=12, vocab_size=30))
    assert "scan.i2t attends from the image fragments, but the pair stage before it rebuilds the text side's:" \
           " use scan.t2i" in str(info.value)
    assert "@ match[0].cross" in str(info.value)


def test_the_pair_slot_takes_only_pair_stages_and_round_trips(registry):
    recipe = _recipe(registry)
    assert [s.path for s in recipe.match[0].slots()] == ["match[0].pair", "match[0].cross", "match[0].similarity",
                                                         "match[0].aggregate"]
    again = parse_recipe(recipe.to_toml(), registry=registry)
    assert again.to_dict() == recipe.to_dict() and again.match[0].pair.spec == recipe.match[0].pair.spec
    bad = RECIPE.replace('{ stage = "testkit.shift", side = "SIDE" }', '{ stage = "scan.i2t" }').replace("CROSS", "scan.i2t")
    with pytest.raises(RecipeError, match=r"stage .scan.i2t. is a cross, but this slot takes a pair @ match\[0\].pair.stage"):
        parse_recipe(bad, registry=registry)


def test_the_test_pair_stage_passes_the_conformance_kit():
    check_stage(Shift)
