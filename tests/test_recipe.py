"""Unit tests of recipe parsing (itmkit/recipe.py) and parameter structuring (itmkit/structure.py)."""

from __future__ import annotations

import tomllib
import types
import typing
from pathlib import Path
from typing import Literal

import attrs
import pytest
import torch
from torch import nn

from itmkit.core_stages import BiGRU, Cosine, Last, Mean, Precomp, Triplet
from itmkit.errors import ItmkitError, did_you_mean
from itmkit.hookspecs import hookimpl
from itmkit.plugins import load_registry
from itmkit.recipe import (
    DataSpec,
    Recipe,
    RecipeError,
    TrainSpec,
    apply_overrides,
    format_path,
    load_recipe,
    parse_override,
    parse_recipe,
)
from itmkit.stage import Stage, param, stage_params
from itmkit.structure import Problem, _Mismatch, check_param, coerce, describe_value, structure, unstructure
from itmkit.types import Local, LocalPort

ROOT = Path(__file__).resolve().parents[1]
VSEPP_PATH = ROOT / "recipes" / "vsepp.toml"

MINIMAL = """\
[recipe]
name = "minimal"

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru" }
pool = { stage = "core.mean" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"
"""


def problems_of(text: str, overrides: list[str] = (), registry=None) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.toml", list(overrides), registry)
    return info.value.problems


def paths_of(text: str, overrides: list[str] = (), registry=None) -> dict[str, str]:
    return {p.path: p.message for p in problems_of(text, overrides, registry)}


# ------------------------------------------------------------------------------- the shipped recipe


def test_vsepp_recipe_parses_into_its_stage_specs():
    """Checked against the file's own values, so tuning recipes/vsepp.toml does not break this test."""
    raw = tomllib.loads(VSEPP_PATH.read_text())
    r = load_recipe(VSEPP_PATH)
    dim = raw["recipe"]["embed_dim"]
    text_encoder = {k: v for k, v in raw["text"]["encoder"].items() if k != "stage"}
    assert r.source == str(VSEPP_PATH)
    assert r.info.name == "vsepp" and r.info.embed_dim == dim
    assert r.image.encoder.spec == Precomp(embed_dim=dim)
    assert r.image.pool.spec == Mean()
    assert r.image.reasoners == ()
    assert r.text.encoder.spec == BiGRU(**{"embed_dim": dim, **text_encoder})
    assert r.text.pool.spec == Last()
    assert len(r.match) == 1
    branch = r.match[0]
    assert branch.similarity.spec == Cosine() and branch.cross is None and branch.aggregate is None
    assert branch.weight == 1.0 and branch.path == "match[0]"
    assert r.loss.spec == Triplet(**{k: v for k, v in raw["loss"].items() if k != "stage"})
    assert r.train == TrainSpec(**raw["train"]) and r.data == DataSpec(**raw["data"])
    assert [s.path for s in r.slots()] == [
        "image.encoder", "image.pool", "text.encoder", "text.pool", "match[0].similarity", "loss",
    ]
    assert [s.spec.name for s in r.slots()] == [
        "core.precomp", "core.mean", "core.bigru", "core.last", "core.cosine", "core.triplet",
    ]


def test_resolved_recipe_round_trips_through_toml():
    r = load_recipe(VSEPP_PATH)
    again = parse_recipe(r.to_toml(), str(VSEPP_PATH))
    assert again == r
    assert again.to_toml() == r.to_toml()


def test_round_trip_keeps_several_branches_and_non_default_values():
    text = MINIMAL.replace('"core.precomp" }', '"core.precomp", embed_dim = 256, normalize = false }') + """
[[match]]
similarity = { stage = "core.cosine", eps = 1e-6 }
weight = 0.25
"""
    r = parse_recipe(text, overrides=["train.optimizer=adamw", "data.protocol=coco-5k"])
    assert parse_recipe(r.to_toml()) == r


def test_resolved_form_holds_every_default():
    r = parse_recipe(MINIMAL)
    d = r.to_dict()
    assert d["train"] == {p.name: p.default for p in stage_params(TrainSpec)}
    assert d["data"] == {p.name: p.default for p in stage_params(DataSpec)}
    assert d["loss"] == {"stage": "core.triplet", "margin": 0.2, "max_violation": True,
                         "warmup_epochs": 0, "mask_same_image": False}
    assert d["text"]["encoder"]["word_dim"] == 300 and d["text"]["encoder"]["num_layers"] == 1
    assert d["match"] == [{"similarity": {"stage": "core.cosine", "eps": 1e-8}, "weight": 1.0}]
    assert d["recipe"] == {"name": "minimal", "embed_dim": 1024, "description": ""}
    assert r.train.epochs == 30 and r.train.lr == 2e-4 and r.data.path == "shapes"


# ------------------------------------------------------------------------------------ embed_dim


def test_recipe_embed_dim_flows_into_encoders_that_leave_theirs_unset():
    r = parse_recipe(MINIMAL.replace('name = "minimal"', 'name = "minimal"\nembed_dim = 256'))
    assert r.image.encoder.spec.embed_dim == 256
    assert r.text.encoder.spec.embed_dim == 256


def test_explicit_encoder_embed_dim_wins():
    text = MINIMAL.replace('name = "minimal"', 'name = "minimal"\nembed_dim = 256')
    text = text.replace('"core.bigru" }', '"core.bigru", embed_dim = 512 }')
    r = parse_recipe(text)
    assert r.image.encoder.spec.embed_dim == 256
    assert r.text.encoder.spec.embed_dim == 512
    assert r.to_dict()["text"]["encoder"]["embed_dim"] == 512


def test_default_embed_dim_is_1024():
    r = parse_recipe(MINIMAL)
    assert r.info.embed_dim == 1024 and r.image.encoder.spec.embed_dim == 1024


def test_embed_dim_set_from_the_command_line_flows_too():
    r = parse_recipe(MINIMAL, overrides=["recipe.embed_dim=64"])
    assert r.image.encoder.spec.embed_dim == 64 and r.text.encoder.spec.embed_dim == 64


# ------------------------------------------------------------------------------------- --set


@pytest.mark.parametrize(("item", "parts", "value"), [
    ("train.lr=1e-3", ["train", "lr"], 1e-3),
    ("train.epochs=2", ["train", "epochs"], 2),
    ("data.path=/some/path", ["data", "path"], "/some/path"),
    ('data.path="quoted dir"', ["data", "path"], "quoted dir"),
    ("recipe.name=my run", ["recipe", "name"], "my run"),
    ("loss.max_violation=false", ["loss", "max_violation"], False),
    ("match[0].weight=0.5", ["match", 0, "weight"], 0.5),
    ("match.0.weight=0.5", ["match", 0, "weight"], 0.5),
    ("match[1].aggregate.lambda_lse=6", ["match", 1, "aggregate", "lambda_lse"], 6),
    ("image.encoder={ stage = 'core.precomp' }", ["image", "encoder"], {"stage": "core.precomp"}),
    ("text.encoder.word_dim = 50", ["text", "encoder", "word_dim"], 50),
])
def test_parse_override(item, parts, value):
    got_parts, got_value = parse_override(item)
    assert got_parts == parts
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("item", ["train.epochs", "=3"])
def test_parse_override_rejects_malformed_items(item):
    with pytest.raises(ValueError):
        parse_override(item)


def test_format_path():
    assert format_path(["match", 0, "aggregate", "lambda_lse"]) == "match[0].aggregate.lambda_lse"
    assert format_path(["train", "lr"]) == "train.lr"


def test_overrides_apply_through_the_same_validation():
    r = parse_recipe(MINIMAL, overrides=[
        "train.lr=1e-3", "data.path=/some/path", "match[0].weight=0.5", "train.epochs=2",
        "text.encoder.word_dim=50",
    ])
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float)
    assert r.data.path == "/some/path"
    assert r.match[0].weight == 0.5
    assert r.train.epochs == 2
    assert r.text.encoder.spec.word_dim == 50


def test_override_of_a_string_key_keeps_the_text_even_when_it_reads_as_a_number():
    raw = {"data": {"path": "builtin:shapes"}, "train": {"epochs": 3}}
    new, _, problems = apply_overrides(raw, ["data.path=2024", "train.epochs=5"])
    assert new == {"data": {"path": "2024"}, "train": {"epochs": 5}} and problems == []


def test_override_by_dotted_index_is_the_same_as_brackets():
    a = parse_recipe(MINIMAL, overrides=["match.0.weight=0.25"])
    b = parse_recipe(MINIMAL, overrides=["match[0].weight=0.25"])
    assert a == b and a.match[0].weight == 0.25


def test_overrides_do_not_touch_the_raw_dict():
    raw = {"train": {"epochs": 3}}
    new, set_paths, problems = apply_overrides(raw, ["train.epochs=5"])
    assert raw == {"train": {"epochs": 3}} and new == {"train": {"epochs": 5}}
    assert set_paths == {"train.epochs": "train.epochs=5"} and problems == []


def test_int_accepted_for_a_float_param():
    r = parse_recipe(MINIMAL, overrides=["train.lr=1"])
    assert r.train.lr == 1.0 and type(r.train.lr) is float
    r = parse_recipe(MINIMAL.replace('stage = "core.triplet"', 'stage = "core.triplet"\nmargin = 1'))
    assert type(r.loss.spec.margin) is float


def test_bool_rejected_for_int_and_float_params():
    found = paths_of(MINIMAL, ["train.epochs=true", "train.lr=false"])
    assert found["train.epochs"].startswith("expected int, got bool True")
    assert found["train.lr"].startswith("expected float, got bool False")
    assert "(from --set train.epochs=true)" in found["train.epochs"]


def test_float_rejected_for_int_param():
    found = paths_of(MINIMAL, ["train.epochs=2.5"])
    assert found["train.epochs"].startswith("expected int, got float 2.5")


def test_set_into_a_list_without_an_index_is_an_error():
    found = paths_of(MINIMAL, ["match.weight=2"])
    assert "match" in found and "not a table" in found["match"]


def test_set_cannot_replace_a_list_entry():
    found = paths_of(MINIMAL, ["match[0]=2"])
    assert "cannot set a list entry" in found["match[0]"]


# ------------------------------------------------------------------------------- choices, ranges


def test_choices_accept_listed_values_and_suggest_the_closest():
    assert parse_recipe(MINIMAL, overrides=["data.protocol=coco-5k"]).data.protocol == "coco-5k"
    found = paths_of(MINIMAL, ["data.protocol=coco5k"])
    assert "expected one of 'f30k-1k', 'coco-1k-5fold', 'coco-5k', got 'coco5k'" in found["data.protocol"]
    assert "did you mean 'coco-5k'" in found["data.protocol"]


def test_literal_param_accepts_its_values_only():
    assert parse_recipe(MINIMAL, overrides=["train.optimizer=adamw"]).train.optimizer == "adamw"
    found = paths_of(MINIMAL, ["train.optimizer=sgd"])
    assert "adam" in found["train.optimizer"] and "'sgd'" in found["train.optimizer"]


@pytest.mark.parametrize(("item", "ok"), [
    ("train.lr=0", False),  # gt 0
    ("train.lr=1e-9", True),
    ("train.lr_decay=1.0", True),  # le 1
    ("train.lr_decay=1.5", False),
    ("train.batch_size=1", False),  # ge 2
    ("train.batch_size=2", True),
    ("train.grad_clip=0", True),  # ge 0
    ("train.seed=-1", False),
    ("text.encoder.embed_dropout=1.01", False),
])
def test_range_bounds(item, ok):
    if ok:
        parse_recipe(MINIMAL, overrides=[item])
    else:
        key = item.partition("=")[0]
        assert "out of range" in paths_of(MINIMAL, [item])[key]


# ------------------------------------------------------------------------------------ slots


@attrs.frozen(kw_only=True)
class Nudge(Stage):
    """A test reasoner: each fragment plus a learned vector."""

    name = "testkit.nudge"
    kind = "reasoner"
    paper = "none (a test stage)"

    scale: float = param(1.0, "size of the nudge", gt=0.0)

    def ports(self, x: LocalPort) -> LocalPort:
        return LocalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return NudgeModule(dim=x.dim)


class NudgeModule(nn.Module):
    def __init__(self, *, dim: int):
        super().__init__()
        self.bias = nn.Parameter(0.01 * torch.ones(dim))

    def forward(self, x: Local) -> Local:
        return Local(x.feats + self.bias, x.mask, x.extras)


@pytest.fixture
def registry(monkeypatch):
    """The built-ins plus a test plugin contributing testkit.nudge (and no entry-point plugins)."""
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", "")
    module = types.ModuleType("testkit")
    module.register_stages = hookimpl(lambda: [Nudge])
    return load_registry([module])


def test_reasoners_are_a_list_of_stage_tables(registry):
    text = MINIMAL.replace(
        'pool = { stage = "core.mean" }\n\n[text]',
        'pool = { stage = "core.mean" }\n'
        'reasoners = [{ stage = "testkit.nudge" }, { stage = "testkit.nudge", scale = 2 }]\n\n[text]',
    )
    r = parse_recipe(text, registry=registry)
    assert [s.path for s in r.image.reasoners] == ["image.reasoners[0]", "image.reasoners[1]"]
    assert [s.spec.scale for s in r.image.reasoners] == [1.0, 2.0]
    assert [s.path for s in r.slots()][:4] == [
        "image.encoder", "image.reasoners[0]", "image.reasoners[1]", "image.pool",
    ]
    assert parse_recipe(r.to_toml(), registry=registry) == r
    found = paths_of(text.replace("scale = 2", "scale = 0"), registry=registry)
    assert "out of range" in found["image.reasoners[1].scale"]


def test_reasoners_must_be_a_list(registry):
    text = MINIMAL.replace('[image]\n', '[image]\nreasoners = { stage = "testkit.nudge" }\n')
    found = paths_of(text, registry=registry)
    assert found["image.reasoners"] == "expected a list of stage tables"


def test_slot_rejects_a_stage_of_another_kind():
    text = MINIMAL.replace('encoder = { stage = "core.bigru" }', 'encoder = { stage = "core.mean" }')
    found = paths_of(text)
    assert "stage 'core.mean' is an aggregator" in found["text.encoder.stage"]
    assert "takes an encoder" in found["text.encoder.stage"]


def test_unknown_stage_suggests_one_of_the_slot_kind():
    found = paths_of(MINIMAL.replace('"core.triplet"', '"core.tripet"'))
    assert "unknown stage 'core.tripet' (did you mean 'core.triplet'?)" == found["loss.stage"]


def test_slot_without_stage_and_slot_that_is_not_a_table():
    text = MINIMAL.replace('pool = { stage = "core.mean" }\n\n[text]', 'pool = { normalize = true }\n\n[text]')
    text = text.replace('encoder = { stage = "core.bigru" }', 'encoder = "core.bigru"')
    found = paths_of(text)
    assert "missing key 'stage'" in found["image.pool"]
    assert "expected a table like" in found["text.encoder"] and "str 'core.bigru'" in found["text.encoder"]


def test_unknown_keys_in_tower_and_branch():
    text = MINIMAL.replace('pool = { stage = "core.mean" }\n\n[text]', 'pooling = { stage = "core.mean" }\n\n[text]')
    text = text.replace("similarity = {", "simlarity = {")
    found = paths_of(text)
    assert "did you mean 'pool'" in found["image.pooling"]
    assert "did you mean 'similarity'" in found["match[0].simlarity"]
    assert "missing required slot 'similarity'" in found["match[0].similarity"]


def test_missing_sections():
    found = paths_of('[recipe]\nname = "x"\n')
    assert set(found) == {"image", "text", "match", "loss"}
    found = paths_of(MINIMAL.replace('[recipe]\nname = "minimal"\n', ""))
    assert "missing required section [recipe]" in found["recipe"]
    found = paths_of(MINIMAL.replace('name = "minimal"', 'description = "no name"'))
    assert "missing required parameter 'name' (str)" in found["recipe.name"]


# ------------------------------------------------------------------------------- match branches


def test_several_branches_with_weights():
    text = MINIMAL + '\n[[match]]\nsimilarity = { stage = "core.cosine" }\nweight = 0.5\n'
    text += '\n[[match]]\nsimilarity = { stage = "core.cosine" }\nweight = 2\n'
    r = parse_recipe(text)
    assert [m.weight for m in r.match] == [1.0, 0.5, 2.0]
    assert all(type(m.weight) is float for m in r.match)
    assert [m.path for m in r.match] == ["match[0]", "match[1]", "match[2]"]
    assert [s.path for s in r.slots()][4:7] == ["match[0].similarity", "match[1].similarity", "match[2].similarity"]
    assert parse_recipe(text, overrides=["match[2].weight=0.125"]).match[2].weight == 0.125


@pytest.mark.parametrize("weight", ['"heavy"', "true"])
def test_branch_weight_must_be_a_number(weight):
    text = MINIMAL + f'\n[[match]]\nsimilarity = {{ stage = "core.cosine" }}\nweight = {weight}\n'
    found = paths_of(text)
    assert found["match[1].weight"].startswith("expected float, got ")


def test_match_must_be_an_array_of_tables():
    found = paths_of(MINIMAL.replace("[[match]]", "[match]"))
    assert found["match"] == "expected one or more [[match]] tables"


def test_recipe_error_counts_problems():
    one = RecipeError("r.toml", [Problem("a.b", "bad")])
    assert str(one) == "r.toml: 1 problem in the recipe:\n  - bad @ a.b"
    two = RecipeError("r.toml", [Problem("a", "x"), Problem("", "y")])
    assert str(two) == "r.toml: 2 problems in the recipe:\n  - x @ a\n  - y"
    assert isinstance(one, ItmkitError)


def test_invalid_toml_names_source_and_line():
    with pytest.raises(ItmkitError, match=r"^r\.toml: invalid TOML: .*line 2"):
        parse_recipe('[recipe]\nname = "x" y\n', "r.toml")


def test_load_recipe_errors(tmp_path):
    with pytest.raises(ItmkitError, match="recipe not found"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(ItmkitError, match="is a folder; expected a regular file"):
        load_recipe(tmp_path)


# ----------------------------------------------------------------------------- structure.py


@pytest.mark.parametrize(("value", "tp", "expected"), [
    (3, float, 3.0),
    (2.5, float, 2.5),
    (3, int, 3),
    (True, bool, True),
    ("a", str, "a"),
    (None, int | None, None),
    (4, int | None, 4),
    ("adam", Literal["adam", "adamw"], "adam"),
    ([1, 2], list[float], [1.0, 2.0]),
    ([1, 2], tuple[int, ...], (1, 2)),
    ({"k": 1}, typing.Any, {"k": 1}),
])
def test_coerce_accepts(value, tp, expected):
    got = coerce(value, tp)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("value", "tp"), [
    (True, int),
    (False, float),
    (1, bool),
    (2.5, int),
    ("1", int),
    (1, str),
    ("sgd", Literal["adam", "adamw"]),
    ("x", int | None),
    (3, list[int]),
    ([1, "a"], list[int]),
])
def test_coerce_rejects(value, tp):
    with pytest.raises(_Mismatch):
        coerce(value, tp)


@attrs.frozen(kw_only=True)
class Toy:
    size: int = param(help="required size", ge=1)
    rate: float = param(0.5, "a rate", gt=0.0, le=1.0)
    mode: str = param("a", "a mode", choices=("a", "b"))
    dims: tuple[int, ...] = param((1, 2), "some dims")
    extra: int | None = param(None, "optional")


def test_structure_builds_and_collects_every_problem():
    toy, problems = structure(Toy, {"size": 3, "rate": 1, "dims": [4]}, "toy", "the toy")
    assert problems == [] and toy == Toy(size=3, rate=1.0, dims=(4,))
    toy, problems = structure(Toy, {"rate": 0, "mode": "c", "sise": 2}, "toy", "the toy")
    assert toy is None
    rendered = [p.render() for p in problems]
    assert rendered == [
        "unknown parameter 'sise' of the toy (did you mean 'size'?) @ toy.sise",
        "missing required parameter 'size' (int) of the toy @ toy.size",
        "out of range: expected a value > 0.0, got 0.0 @ toy.rate",
        "expected one of 'a', 'b', got 'c' (choices: 'a', 'b') @ toy.mode",
    ]


def test_structure_rejects_a_non_table():
    toy, problems = structure(Toy, 3, "toy", "the toy")
    assert toy is None and problems == [Problem("toy", "expected a table for the toy, got int 3")]


def test_structure_at_top_level_has_no_leading_dot():
    _, problems = structure(Toy, {"size": 0}, "", "the toy")
    assert problems[0].path == "size"


def test_check_param_reports_type_before_range():
    info = {p.name: p for p in stage_params(Toy)}["rate"]
    value, problems = check_param(info, "x", "p")
    assert problems == [Problem("p", "expected float, got str 'x'")]


def test_unstructure_drops_none_and_lists_tuples():
    assert unstructure(Toy(size=2)) == {"size": 2, "rate": 0.5, "mode": "a", "dims": [1, 2]}
    assert unstructure(Toy(size=2, extra=5))["extra"] == 5


def test_problem_render_and_describe_value():
    assert Problem("a.b", "bad").render() == "bad @ a.b"
    assert Problem("", "bad").render() == "bad"
    assert describe_value("x") == "str 'x'"
    assert describe_value({"a": 1}) == "a table"


def test_did_you_mean():
    assert did_you_mean("margn", ["margin", "max_violation"]) == " (did you mean 'margin'?)"
    assert did_you_mean("zzz", ["b", "a"]) == " (choices: 'a', 'b')"
    assert did_you_mean("zzz", []) == ""
    assert did_you_mean("zzz", [f"n{i:02d}" for i in range(20)]).endswith(", ...)")


def test_recipe_is_frozen():
    r = parse_recipe(MINIMAL)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.info = None  # type: ignore[misc]
    assert isinstance(r, Recipe)
