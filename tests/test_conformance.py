"""Every registered stage passes every check of the conformance kit; the kit catches broken stages."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch
from torch import nn

from itmkit.ops import masked_mean
from itmkit.plugins import get_registry
from itmkit.stage import Stage, param
from itmkit.testing import (
    CHECKS,
    DIM,
    NI,
    NT,
    REGIONS,
    WORDS,
    cases,
    check_defaults,
    check_definition,
    check_documentation,
    check_forward,
    check_padding,
    check_ports,
    check_region_padding,
    check_recipe_roundtrip,
    check_safetensors_roundtrip,
    check_stage,
    random_input,
    random_positives,
)
from itmkit.types import (
    Aligned,
    AlignedPort,
    GlobalPort,
    Local,
    LocalPort,
    PairSims,
    PairSimsPort,
    Regions,
    RegionsPort,
    ScorePort,
    Tokens,
    TokensPort,
)

REGISTRY = get_registry()
STAGE_NAMES = sorted(REGISTRY.stages)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_registered_stage_conforms(name, check):
    check(REGISTRY.stages[name])


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_registered_under_its_own_name(name):
    cls = REGISTRY.stages[name]
    assert cls.name == name
    check_stage(cls, registry=REGISTRY)


def test_the_registry_holds_the_core_stages():
    # The parametrisation above is only worth something if the registry is not empty.
    assert {"core.precomp", "core.bigru", "core.mean", "core.cosine", "core.triplet"} <= set(STAGE_NAMES)


# ------------------------------------------------------------------------- random inputs


def test_random_tokens_are_padded_ids_above_the_special_tokens():
    tokens = random_input(TokensPort(30), batch=6)
    assert isinstance(tokens, Tokens) and tokens.ids.shape == (6, WORDS)
    valid = tokens.ids[tokens.mask]
    assert int(valid.min()) >= 4 and int(valid.max()) < 30
    assert (tokens.ids[~tokens.mask] == 0).all()
    assert int(tokens.lengths.max()) == WORDS  # one full row
    assert len(set(tokens.lengths.tolist())) > 1  # varied lengths


def test_random_regions_and_local_have_padding_and_a_full_row():
    regions = random_input(RegionsPort(12), batch=5)
    assert isinstance(regions, Regions) and regions.feats.shape == (5, REGIONS, 12)
    assert regions.boxes.shape == (5, REGIONS, 4) and (regions.boxes[..., 2:] > regions.boxes[..., :2]).all()
    text = random_input(LocalPort(8), batch=5, side="text")
    assert isinstance(text, Local) and text.feats.shape == (5, WORDS, 8) and text.extras == {}
    assert text.mask.all(dim=1).any() and not text.mask.all()
    image = random_input(LocalPort(8), batch=5, side="image")
    assert image.feats.shape == (5, REGIONS, 8) and image.extras["boxes"].shape == (5, REGIONS, 4)


def test_random_block_values_cover_images_by_captions():
    assert random_input(GlobalPort(7), batch=3).shape == (3, 7)
    scores = random_input(ScorePort(), ni=2, nt=9)
    assert scores.shape == (2, 9) and scores.min() >= -1 and scores.max() < 1
    sims = random_input(PairSimsPort(3), ni=2, nt=4)
    assert isinstance(sims, PairSims) and sims.sims.shape == (2, 4, WORDS, 3) and sims.mask.shape == (2, 4, WORDS)
    assert not sims.mask.all()


@pytest.mark.parametrize("side", ["text", "image"])
def test_random_aligned_attends_only_to_valid_context(side):
    aligned = random_input(AlignedPort(8), ni=2, nt=3, query_side=side)
    assert isinstance(aligned, Aligned) and aligned.query_side == side
    queries, contexts = (WORDS, REGIONS) if side == "text" else (REGIONS, WORDS)
    assert aligned.attended().shape == (2, 3, queries, 8)
    assert aligned.weights.shape == (2, 3, queries, contexts)
    torch.testing.assert_close(aligned.weights.sum(-1), torch.ones(2, 3, queries))
    # Some context fragment is padding, and no weight falls on it.
    assert (aligned.weights == 0).any()
    assert aligned.query_mask.expand(2, 3, queries).any(-1).all() and not aligned.query_mask.all()


def test_random_input_is_reproducible_from_a_generator():
    a = random_input(LocalPort(4), generator=torch.Generator().manual_seed(3))
    b = random_input(LocalPort(4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.feats, b.feats) and torch.equal(a.mask, b.mask)


def test_random_positives_pair_captions_of_one_image():
    positives = random_positives(4)
    assert positives.tolist() == [[True, True, False, False], [True, True, False, False],
                                  [False, False, True, True], [False, False, True, True]]


def test_cases_offer_global_or_local_per_annotation():
    described = [c.describe() for c in cases(REGISTRY.stages["core.cosine"])]
    assert "ports(image=Global[32], text=Global[32]) -> Score[1]" in described
    assert "ports(x=Aligned[32]) -> PairSims[1], image queries" in described
    # core.mean pools Local and scalar PairSims; vector PairSims is rejected with PortError.
    assert [c.describe() for c in cases(REGISTRY.stages["core.mean"])] == [
        "ports(x=Local[32]) -> Global[32]", "ports(x=PairSims[1]) -> Score[1]"]


# --------------------------------------------------------------- the kit catches mistakes


class GatedPool(nn.Module):
    """A correct small pool: masked mean of sigmoid-gated fragments."""

    def __init__(self, *, dim: int, honour_mask: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, 1)
        self.honour_mask = honour_mask

    def forward(self, x: Local) -> torch.Tensor:
        gated = torch.sigmoid(self.gate(x.feats)) * x.feats
        mask = x.mask if self.honour_mask else torch.ones_like(x.mask)
        return masked_mean(gated, mask, dim=1)


@attrs.frozen(kw_only=True)
class GoodPool(Stage):
    """Mean of sigmoid-gated fragments."""

    name = "test.good_pool"
    kind = "aggregator"
    paper = "test stage; no paper"

    scale: float = param(1.0, "multiplies the output", gt=0.0)

    def ports(self, x: LocalPort) -> GlobalPort:
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return GatedPool(dim=x.dim)


def variant(base: type[Stage], **overrides) -> type[Stage]:
    """A subclass of a test stage with some class attributes or methods replaced."""
    cls = type(base.__name__ + "Variant", (base,), {"__doc__": base.__doc__, **overrides})
    return attrs.frozen(kw_only=True)(cls)


def test_a_correct_stage_passes_every_check():
    check_stage(GoodPool)


def test_an_unregistered_stage_fails_the_registry_check():
    with pytest.raises(AssertionError, match="test.good_pool: not registered under its name"):
        check_stage(GoodPool, registry=REGISTRY)


def test_missing_help_paper_and_docstring_are_reported():
    @attrs.frozen(kw_only=True)
    class Undocumented(Stage):
        name = "test.undocumented"
        kind = "aggregator"

        scale: float = param(1.0)

        def ports(self, x: LocalPort) -> GlobalPort:
            return GlobalPort(x.dim)

    with pytest.raises(AssertionError) as failure:
        check_documentation(Undocumented)
    message = str(failure.value)
    assert "docstring" in message and "paper is empty" in message and "without help text: ['scale']" in message


def test_required_parameters_need_an_example():
    @attrs.frozen(kw_only=True)
    class Required(GoodPool):
        """Needs a width."""

        width: int = param(help="a required width", ge=1)

    with pytest.raises(AssertionError, match=r"required parameters \['width'\].*example"):
        check_defaults(Required)
    check_defaults(variant(Required, example={"width": 3}))
    with pytest.raises(AssertionError, match="example names unknown parameters"):
        check_definition(variant(Required, example={"widht": 3}))


def test_a_port_outside_the_return_annotation_is_reported():
    def ports(self, x: LocalPort) -> GlobalPort:
        return LocalPort(x.dim)

    with pytest.raises(AssertionError, match="returns a LocalPort, the annotation says GlobalPort"):
        check_ports(variant(GoodPool, ports=ports))


def test_a_wrong_output_shape_is_reported():
    class Wider(GatedPool):
        def forward(self, x: Local) -> torch.Tensor:
            return torch.cat([super().forward(x), x.feats[:, 0, :1]], dim=-1)

    def build(self, x: LocalPort) -> nn.Module:
        return Wider(dim=x.dim)

    with pytest.raises(AssertionError, match=rf"returned Tensor \(4, {DIM + 1}\), expected a tensor \(4, {DIM}\)"):
        check_forward(variant(GoodPool, build=build))


def test_non_finite_outputs_are_reported():
    class Broken(GatedPool):
        def forward(self, x: Local) -> torch.Tensor:
            return super().forward(x) / 0.0

    with pytest.raises(AssertionError, match="non-finite values"):
        check_forward(variant(GoodPool, build=lambda self, x: Broken(dim=x.dim)))


def test_a_detached_parameter_is_reported():
    class Detached(GatedPool):
        def forward(self, x: Local) -> torch.Tensor:
            gate = torch.sigmoid(x.feats @ self.gate.weight.detach().T)
            return masked_mean(gate * x.feats, x.mask, dim=1)

    with pytest.raises(AssertionError, match=r"no gradient reaches parameters \['gate.weight', 'gate.bias'\]"):
        check_forward(variant(GoodPool, build=lambda self, x: Detached(dim=x.dim)))


def test_an_in_place_change_of_the_input_is_reported():
    class Scribbler(GatedPool):
        def forward(self, x: Local) -> torch.Tensor:
            out = super().forward(x)
            with torch.no_grad():
                x.feats.mul_(2)
            return out

    with pytest.raises(AssertionError, match="modified its input tensors in place"):
        check_forward(variant(GoodPool, build=lambda self, x: Scribbler(dim=x.dim)))


def test_ignoring_the_mask_is_reported():
    with pytest.raises(AssertionError, match="padded input positions change the valid outputs"):
        check_padding(variant(GoodPool, build=lambda self, x: GatedPool(dim=x.dim, honour_mask=False)))


def test_a_pool_that_divides_by_the_stored_width_is_reported():
    # Masks the padded values (check_padding passes) but averages over the array's width: the
    # same image stored zero-padded to more rows would score differently.
    class WidthMean(GatedPool):
        def forward(self, x: Local) -> torch.Tensor:
            gated = torch.sigmoid(self.gate(x.feats)) * x.feats * x.mask[..., None]
            return gated.sum(dim=1) / x.feats.shape[1]

    stage = variant(GoodPool, build=lambda self, x: WidthMean(dim=x.dim))
    check_padding(stage)
    with pytest.raises(AssertionError, match=r"5 more padded rows \(zeros\) past each image's region count change"):
        check_region_padding(stage)


def test_an_encoder_that_ignores_region_lengths_is_reported():
    # An image encoder that marks every stored row as a region: zero-padded rows become regions.
    class Unmasked(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.fc = nn.Linear(dim, DIM)

        def forward(self, x: Regions) -> Local:
            return Local(self.fc(x.feats), torch.ones(x.feats.shape[:2], dtype=torch.bool))

    @attrs.frozen(kw_only=True)
    class Encoder(Stage):
        """A linear map of every stored row."""

        name = "test.unmasked"
        kind = "encoder"
        paper = "test stage; no paper"

        def ports(self, x: RegionsPort) -> LocalPort:
            return LocalPort(DIM)

        def build(self, x: RegionsPort) -> nn.Module:
            return Unmasked(x.dim)

    with pytest.raises(AssertionError, match="padded rows"):
        check_region_padding(Encoder)


def test_state_outside_the_state_dict_is_reported():
    class Hidden(GatedPool):
        def __init__(self, *, dim: int):
            super().__init__(dim=dim)
            self.offset = torch.randn(dim)  # a plain attribute: not saved, differs per build

        def forward(self, x: Local) -> torch.Tensor:
            return super().forward(x) + self.offset

    with pytest.raises(AssertionError, match="outputs differ after the safetensors round trip"):
        check_safetensors_roundtrip(variant(GoodPool, build=lambda self, x: Hidden(dim=x.dim)))


def test_tied_weights_that_safetensors_refuses_are_reported():
    class Tied(GatedPool):
        def __init__(self, *, dim: int):
            super().__init__(dim=dim)
            self.other = nn.Linear(dim, 1)
            self.other.weight = self.gate.weight

    with pytest.raises(AssertionError, match="cannot be saved with safetensors"):
        check_safetensors_roundtrip(variant(GoodPool, build=lambda self, x: Tied(dim=x.dim)))


def test_a_value_lost_in_the_recipe_round_trip_is_reported():
    @attrs.frozen(kw_only=True)
    class Optional_(GoodPool):
        """A pool with an optional cap."""

        cap: float | None = param(2.0, "clip the output at this value (None: no clip)")
        example: ClassVar[dict] = {"cap": None}

    # None cannot be written to TOML, so the cap comes back as its default 2.0.
    with pytest.raises(AssertionError, match="recipe round trip changed the spec"):
        check_recipe_roundtrip(Optional_)


def test_block_outputs_are_checked_against_ni_by_nt():
    class Transposed(nn.Module):
        def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return text @ image.T  # (Nt, Ni): the wrong way round

    @attrs.frozen(kw_only=True)
    class Dot(Stage):
        """Dot product of global vectors."""

        name = "test.dot"
        kind = "similarity"
        paper = "test stage; no paper"

        def ports(self, image: GlobalPort, text: GlobalPort) -> ScorePort:
            return ScorePort()

        def build(self, **inputs) -> nn.Module:
            return Transposed()

    with pytest.raises(AssertionError, match=rf"\({NT}, {NI}\), expected a \({NI}, {NT}\) tensor"):
        check_forward(Dot)
