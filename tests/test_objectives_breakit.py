"""Objectives fed a misbehaving stage: the recipe error or run-time error names the objective, never a traceback.

A local stage file (``--stages``) is never run through the conformance kit, so the model itself
must catch an objective whose ports() promise something other than a LossPort, and an objective
module that returns something other than a scalar tensor.
"""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from torch import nn

from itmkit.build import DataPorts, build_model
from itmkit.errors import ItmkitError
from itmkit.hookspecs import hookimpl
from itmkit.plugins import load_registry
from itmkit.recipe import RecipeError, parse_recipe
from itmkit.stage import Stage, param
from itmkit.types import GlobalPort, LossPort, Regions, ScorePort, Tokens

F, V, R = 12, 20, 4
DATA = DataPorts(feature_dim=F, vocab_size=V, num_regions=R)

RECIPE = """\
[recipe]
name = "breakit"
embed_dim = 8

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 6 }
pool = { stage = "core.mean" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"

[[objective]]
stage = "STAGE"
"""


@attrs.frozen(kw_only=True)
class GlobalOut(Stage):
    """An 'objective' whose ports() promise a Global vector, not a loss."""

    name = "breakit.global_out"
    kind = "objective"
    paper = "test"

    def ports(self, image: GlobalPort) -> GlobalPort:
        return GlobalPort(image.dim)

    def build(self, image: GlobalPort) -> nn.Module:
        return IdentityObjective()


class IdentityObjective(nn.Module):
    def forward(self, *, image: torch.Tensor, positives: torch.Tensor, epoch: int) -> torch.Tensor:
        return image


class Returns(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, *, x: torch.Tensor, positives: torch.Tensor, epoch: int):
        if self.mode == "vector":
            return x.diagonal()
        if self.mode == "number":
            return 3.0
        return x.diagonal().mean()


@attrs.frozen(kw_only=True)
class ReturnsWhat(Stage):
    """A well-wired objective whose module returns a vector or a Python number (mode) instead of a scalar tensor."""

    name = "breakit.returns"
    kind = "objective"
    paper = "test"

    mode: str = param("scalar", "what the module returns", choices=("scalar", "vector", "number"))

    def ports(self, x: ScorePort) -> LossPort:
        return LossPort()

    def build(self, x: ScorePort) -> nn.Module:
        return Returns(self.mode)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", "")
    module = types.ModuleType("breakit")
    module.register_stages = hookimpl(lambda: [GlobalOut, ReturnsWhat])
    return load_registry([module])


def batch(n: int = 6) -> tuple[Regions, Tokens, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 6, (n,), generator=g)
    ids = torch.randint(4, V, (n, int(lengths.max())), generator=g) * (torch.arange(int(lengths.max())) < lengths[:, None])
    return Regions(torch.rand(n, R, F, generator=g), torch.full((n,), R)), Tokens(ids, lengths), torch.arange(n) // 2


def test_an_objective_that_does_not_produce_a_loss_is_a_recipe_error(registry):
    recipe = parse_recipe(RECIPE.replace("STAGE", "breakit.global_out"), registry=registry)
    with pytest.raises(RecipeError) as caught:
        build_model(recipe, DATA)
    message = str(caught.value)
    assert "objective[0]" in message and "LossPort" in message and "Global[8]" in message


@pytest.mark.parametrize("mode", ["vector", "number"])
def test_an_objective_returning_no_scalar_tensor_is_named(registry, mode):
    recipe = parse_recipe(RECIPE.replace("STAGE", "breakit.returns") + f'mode = "{mode}"\n', registry=registry)
    model = build_model(recipe, DATA, seed=0).train()
    with pytest.raises(ItmkitError, match=r"objective\[0\] \(breakit.returns\) returned .*expected a scalar"):
        model.training_step(*batch())


def test_a_scalar_objective_still_trains(registry):
    recipe = parse_recipe(RECIPE.replace("STAGE", "breakit.returns"), registry=registry)
    step = build_model(recipe, DATA, seed=0).train().training_step(*batch())
    assert step.loss.dim() == 0 and set(step.terms) == {"loss", "objective[0]"}
