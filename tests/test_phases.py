"""Staged training ([[train.phase]]): what trains in which epochs, switches, resume, and the block context.

The stage below (a local stage file, as ``itmkit --stages`` loads one) has a submodule ``head`` that
only adds to the score while its switch ``head_on`` is on, a BatchNorm whose running statistics must
stay put while its part is frozen, and a training-only term added through the BlockContext.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from itmkit.build import DataPorts, build_model
from itmkit.phases import resolve_schedule, schedule_rows
from itmkit.plugins import load_registry
from itmkit.recipe import RecipeError, load_recipe, parse_recipe
from itmkit.types import BlockContext, Regions, Tokens

from cliutil import paused_itmkit

ITMKIT = [sys.executable, "-m", "itmkit"]

STAGE_FILE = '''
import attrs
import torch
from torch import nn

import itmkit
from itmkit.stage import Stage, param
from itmkit.types import GlobalPort, ScorePort


class SwitchedModule(nn.Module):
    def __init__(self, dim, term_weight):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, dim)
        self.term_weight = term_weight
        self.register_buffer("head_on", torch.tensor(True))

    def forward(self, *, image_global, text_global, context=None):
        img = self.norm(image_global)
        if bool(self.head_on):
            img = img + self.head(img)
        img = nn.functional.normalize(img, dim=-1)
        txt = nn.functional.normalize(text_global, dim=-1)
        scores = img @ txt.T
        if context is not None and self.term_weight > 0:
            # a training-only term: pulls each image's positives up (mean over the block's positives)
            context.add_term("pull", self.term_weight * (1 - scores[context.positives]).mean())
        return scores


@attrs.frozen(kw_only=True)
class Switched(Stage):
    """A test stage: BatchNorm, then a head behind a switch, cosine with the caption's pooled vector."""

    name = "testkit.switched"
    kind = "similarity"
    paper = "none (a test stage)"
    term_weight: float = param(0.0, "weight of the training-only term", ge=0.0)

    def ports(self, image_global: GlobalPort, text_global: GlobalPort) -> ScorePort:
        return ScorePort()

    def build(self, image_global, text_global):
        return SwitchedModule(image_global.dim, self.term_weight)

    def pair_bytes(self, *, text_len, image_len):
        return 4


@itmkit.hookimpl
def register_stages():
    return [Switched]
'''

PHASED = """
[recipe]
name = "phased"
embed_dim = 32

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 16, bidirectional = false }
pool = { stage = "core.last" }

[[match]]
similarity = { stage = "testkit.switched", term_weight = 0.1 }

[loss]
stage = "core.triplet"
max_violation = true

[data]
path = "DATA"

[train]
epochs = 4
batch_size = 32
lr = 3e-3
seed = 0

[[train.phase]]
name = "towers"
epochs = 1
train = ["image", "text"]
off = ["match[0].similarity.head_on"]

[[train.phase]]
name = "head alone"
epochs = 2
train = ["match[0].similarity.head"]
lr = 1e-2

[[train.phase]]
name = "all"
"""


@pytest.fixture
def stage_file(tmp_path):
    path = tmp_path / "switched.py"
    path.write_text(STAGE_FILE)
    return path


@pytest.fixture
def registry(monkeypatch, stage_file):
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", "")
    from itmkit.plugins import load_stage_file

    return load_registry([load_stage_file(str(stage_file))])


@pytest.fixture
def phased(tmp_path, tiny_data):
    path = tmp_path / "phased.toml"
    path.write_text(PHASED.replace("DATA", str(tiny_data)))
    return path


def _model(registry, text=PHASED, overrides=()):
    recipe = parse_recipe(text.replace("DATA", "shapes"), overrides=list(overrides), registry=registry)
    return build_model(recipe, DataPorts(feature_dim=8, vocab_size=20, num_regions=5), seed=0)


def _run(args, env=None):
    return subprocess.run(ITMKIT + args, capture_output=True, text=True, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------- the recipe and the model


def test_phases_resolve_to_epochs_parameters_and_switches(registry):
    model = _model(registry)
    schedule = resolve_schedule(model)
    assert [p.label() for p in schedule.phases] == ["towers", "head alone", "all"]
    assert [(p.first, p.stop) for p in schedule.phases] == [(0, 1), (1, 3), (3, None)]
    assert [schedule.at(e).index for e in range(6)] == [0, 1, 1, 2, 2, 2]
    towers, head, everything = schedule.phases
    assert towers.trained and all(n.startswith(("image.", "text.")) for n in towers.trained)
    assert head.trained == {"branches.0.stages.0.head.weight", "branches.0.stages.0.head.bias"}
    assert everything.trained == schedule.trainable
    assert schedule.switches == {"match[0].similarity.head_on"}
    recipe = model.recipe
    assert [schedule.lr(recipe, e) for e in (0, 1, 3)] == [3e-3, 1e-2, 3e-3]
    rows = schedule_rows(schedule, model, recipe.train.epochs)
    assert [(r["epochs"], r["frozen"], r["off"]) for r in rows] == [
        ("1", "match[0]", "match[0].similarity.head_on"), ("2-3", "image, text", "-"), ("4", "-", "-")]


def test_apply_freezes_parameters_sets_switches_and_evals_frozen_parts(registry):
    model = _model(registry)
    schedule = resolve_schedule(model)
    stage = model.branches[0].stages[0]
    schedule.apply(model, 0)
    assert not bool(stage.head_on)
    assert not stage.head.weight.requires_grad and stage.head.training is False
    assert not stage.norm.training  # frozen BatchNorm keeps its running statistics
    assert model.image.encoder.training and all(p.requires_grad for p in model.text.parameters())
    schedule.apply(model, 1)
    assert bool(stage.head_on) and stage.head.weight.requires_grad and stage.head.training
    assert not stage.norm.training and not model.text.training
    assert not any(p.requires_grad for p in model.image.parameters())
    schedule.apply(model, 3)
    assert all(p.requires_grad for p in model.parameters()) and model.training and stage.norm.training


def test_a_frozen_module_stays_frozen_in_every_phase(registry):
    model = _model(registry, overrides=['train.phase[0].train=["text"]'])  # a phase may not name a frozen part
    model.image.encoder.requires_grad_(False)  # as a frozen BERT is built
    schedule = resolve_schedule(model)
    schedule.apply(model, 3)  # "everything" means everything that trains at all
    assert not any(p.requires_grad for p in model.image.encoder.parameters())


def test_bad_paths_are_recipe_errors_with_suggestions(registry):
    with pytest.raises(RecipeError) as info:
        _model(registry, overrides=['train.phase[0].train=["txet"]', 'train.phase[1].off=["match[0].similarity.hed_on"]',
                                    'train.phase[1].train=["match[0].similarity.nothere"]'])
    text = str(info.value)
    assert "'txet' names no part of the model (did you mean 'text'?) @ train.phase[0].train[0]" in text
    assert "is not a switch (the switches: match[0].similarity.head_on)" in text
    assert "@ train.phase[1].off[0]" in text and "@ train.phase[1].train[0]" in text
    with pytest.raises(RecipeError, match=r"'loss' has no trainable parameters .* @ train.phase\[0\].train\[0\]"):
        _model(registry, overrides=['train.phase[0].train=["loss"]'])
    with pytest.raises(RecipeError, match=r"train.phase\[0\].epochs"):
        _model(registry, overrides=["train.phase[0].epochs=0"])
    with pytest.raises(RecipeError, match=r"unknown parameter 'epoch' of \[\[train.phase\]\]"):
        _model(registry, overrides=["train.phase[0].epoch=2"])


def test_resolved_recipe_keeps_its_phases(registry):
    model = _model(registry)
    text = model.recipe.to_toml()
    again = parse_recipe(text, registry=registry)
    assert again.phases == model.recipe.phases and again.to_dict() == model.recipe.to_dict()
    plain = parse_recipe(text.split("[[train.phase]]")[0], registry=registry)
    assert "phase" not in plain.to_dict()["train"]  # no phases: the resolved form is what it was before


def test_context_goes_only_to_stages_that_take_it_and_its_terms_join_the_loss(registry):
    model = _model(registry)
    g = torch.Generator().manual_seed(0)
    regions = Regions(torch.rand(6, 5, 8, generator=g), torch.full((6,), 5))
    tokens = Tokens(torch.randint(1, 20, (6, 4), generator=g), torch.full((6,), 4))
    step = model.training_step(regions, tokens, torch.arange(6) // 2)
    assert set(step.terms) == {"loss", "match[0].pull"}
    assert torch.allclose(step.loss, step.terms["loss"] + step.terms["match[0].pull"])
    model.eval()
    scores = model.score(model.encode_images(regions), model.encode_texts(tokens))  # no context: no term
    assert scores.shape == (6, 6)
    context = BlockContext(torch.eye(2, dtype=torch.bool))
    context.add_term("a", torch.tensor(1.0))
    with pytest.raises(ValueError, match="added twice"):
        context.add_term("a", torch.tensor(2.0))
    with pytest.raises(ValueError, match="scalar"):
        context.add_term("b", torch.ones(2))


# ------------------------------------------------------------------------------- training


def _tensors(path):
    return load_file(str(path))


def test_parameters_outside_their_phase_do_not_change(stage_file, phased, tmp_path):
    """Epoch by epoch (a run extended one epoch at a time with --resume): only the phase's parts move."""
    run = tmp_path / "run"
    snapshots = []
    for epochs in (1, 2, 4):
        flag = ["--resume"] if epochs > 1 else []
        done = _run(["--stages", str(stage_file), "train", str(phased), "--out", str(run), "--set",
                     f"train.epochs={epochs}", *flag])
        assert done.returncode == 0, done.stderr
        snapshots.append(_tensors(run / "last.safetensors"))
    first, second, last = snapshots
    init = build_model(load_recipe(run / "recipe.toml", registry=_registry_with(stage_file)),
                       DataPorts(feature_dim=256, vocab_size=int(first["text.encoder.embed.weight"].shape[0]),
                                 num_regions=36), seed=0).state_dict()

    def moved(a, b, prefix):
        return [k for k in a if k.startswith(prefix) and a[k].dtype.is_floating_point and not torch.equal(a[k], b[k])]

    # phase 1 (epoch 1): the towers train; the head, its BatchNorm (statistics too) do not; the switch is off
    assert moved(init, first, "image.") and moved(init, first, "text.")
    assert not moved(init, first, "branches.")
    assert not bool(first["branches.0.stages.0.head_on"])
    # phase 2 (epochs 2-3): only the head moves; the switch is back on
    assert moved(first, second, "branches.0.stages.0.head.")
    assert not moved(first, second, "image.") and not moved(first, second, "text.")
    assert not moved(first, second, "branches.0.stages.0.norm.")
    assert bool(second["branches.0.stages.0.head_on"])
    # phase 3 (epoch 4): everything
    assert moved(second, last, "image.") and moved(second, last, "text.") and moved(second, last, "branches.")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dev = [m for m in metrics if m.get("split") == "dev"]
    assert [m["epoch"] for m in dev] == [0, 1, 2, 3]
    assert [m["lr"] for m in dev] == pytest.approx([3e-3, 1e-2, 1e-2, 3e-3])
    assert all("match[0].pull" in m["train_terms"] for m in dev)


def _registry_with(stage_file):
    from itmkit.plugins import load_stage_file

    return load_registry([load_stage_file(str(stage_file))])


def test_kill_in_the_middle_of_a_phase_then_resume_matches_an_uninterrupted_run(stage_file, phased, tmp_path):
    args = ["--stages", str(stage_file), "train", str(phased)]
    full = _run(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    assert "head alone (epochs 2-3)" in full.stderr
    expected = json.loads((tmp_path / "full" / "test_metrics.json").read_text())

    # SIGKILL inside the third write of last.safetensors (after epoch 3): epoch 2's survives, and the
    # resumed run starts at epoch 3, in the middle of phase "head alone" (epochs 2-3).
    marker, run = tmp_path / "paused", tmp_path / "killed"
    proc = paused_itmkit(args + ["--out", str(run)], marker, skip=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_file(str(run / "last.safetensors"))["branches.0.stages.0.head_on"].item()  # epoch 2's, in phase 2
    resumed = _run(args + ["--out", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "head alone (epochs 2-3)" in resumed.stderr
    assert json.loads((run / "test_metrics.json").read_text()) == expected
    full_dev = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    run_dev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    untimed = [[{k: v for k, v in m.items() if k != "captions_per_s"} for m in records] for records in (run_dev, full_dev)]
    assert [m for m in untimed[0] if m.get("split") == "dev"] == [m for m in untimed[1] if m.get("split") == "dev"]


def test_build_shows_the_phases(stage_file, phased):
    done = _run(["--stages", str(stage_file), "build", str(phased)], env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "training phases (4 epochs)" in done.stdout
    for text in ("towers", "head alone", "2-3", "match[0].similarity.head_on", "image, text"):
        assert text in done.stdout

