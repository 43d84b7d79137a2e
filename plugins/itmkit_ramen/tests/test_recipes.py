"""RAMEN's recipes: the official code's configuration and schedule, and trained models through the scoring engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from itmkit.build import DataPorts, build_model
from itmkit.phases import resolve_schedule
from itmkit.recipe import load_recipe
from itmkit.testing import recipe_plugins

ROOT = Path(__file__).parents[3]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("ramen_*.toml") if "ramen" in recipe_plugins(p))
TINY = ["recipe.embed_dim=8", "match.0.similarity.mmc_sizes=[6,6]", "match.0.similarity.aggregator_dim=4",
        "match.0.similarity.readout_sizes=[5]", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3",
        "loss.warmup_epochs=0"]


def test_there_are_four_recipes():
    assert [p.stem for p in RECIPES] == ["ramen_coco", "ramen_f30k", "ramen_scan", "ramen_shapes"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds(path):
    recipe = load_recipe(path)
    model = build_model(recipe, DataPorts(256 if path.stem in ("ramen_shapes", "ramen_scan") else 2048, 64, 36))
    assert model.pair_bytes(12, 36) > 0


@pytest.mark.parametrize("name", ["ramen_f30k", "ramen_coco"])
def test_the_paper_recipes_have_the_code_defaults_and_schedule(name):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml")
    fusion, question = recipe.match[0].similarity.spec, recipe.text.encoder.spec
    assert (fusion.mmc_sizes, fusion.nonlinearity, fusion.connection, fusion.aggregator_dim) == ([1024] * 4, "swish",
                                                                                               "residual", 1024)
    assert (fusion.early_fusion, fusion.late_fusion, fusion.late_batch_norm) == (True, True, True)
    assert (fusion.input_dropout, fusion.mmc_dropout, fusion.readout_sizes, fusion.readout_dropout) == (0, 0, [2048], 0.5)
    assert (question.width, question.word_dim, question.dropout_after_rnn) == (1024, 300, 0.5)
    assert recipe.image.encoder.spec.name == "core.raw" and not recipe.image.encoder.spec.normalize
    t = recipe.train
    assert (t.optimizer, t.batch_size, t.epochs, t.grad_clip, t.seed) == ("adamax", 64, 25, 50.0, 7)
    model = build_model(recipe, DataPorts(2048, 64, 36))
    schedule = resolve_schedule(model)
    lrs = [schedule.lr(recipe, e) for e in range(25)]
    # train.py: lr x linspace(0.5, 2, 7) for epochs 0-6; x 0.25 at epochs 14, 16, ..., 22; else the base lr
    expected = [5e-4 * (0.5 + 0.25 * e) for e in range(7)] + [5e-4] * 7
    expected += [1.25e-4 if e % 2 == 0 else 5e-4 for e in range(14, 23)] + [5e-4] * 2
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["ramen_shapes", "ramen_scan"])
def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path, name):
    """One tiny epoch (BatchNorm running statistics updated), then the scoring engine's blocks give each
    caption the scores it gets alone: at evaluation a pair's score depends on nothing else in its block."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml", [f"data.path={data}", *TINY])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)


def test_any_pooled_text_vector_can_be_q():
    """The fusion reads a text Global: SCAN's averaged bi-GRU words, mean-pooled, will do."""
    recipe = load_recipe(ROOT / "recipes" / "ramen_shapes.toml", ["text.encoder.stage=core.bigru",
                                                                   "text.pool.stage=core.mean"])
    model = build_model(recipe, DataPorts(256, 64, 36))
    assert recipe.text.encoder.spec.name == "core.bigru" and recipe.text.pool.spec.name == "core.mean"
    assert model.branches[0].stages[0].batch_norm_fusion.num_features == 256 + 64
