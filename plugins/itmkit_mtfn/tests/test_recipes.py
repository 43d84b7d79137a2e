"""MTFN's recipes: the official configuration and schedule, and a trained model through the scoring engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit_mtfn.importer import schedule
from itmkit_mtfn.tests import official

ROOT = Path(__file__).parents[3]
RECIPES = sorted((ROOT / "recipes").glob("mtfn_*.toml"))


def test_the_recipes():
    assert [p.stem for p in RECIPES] == ["mtfn_coco", "mtfn_f30k", "mtfn_gpo", "mtfn_shapes"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds(path):
    recipe = load_recipe(path)
    paper = path.stem in ("mtfn_f30k", "mtfn_coco")
    model = build_model(recipe, DataPorts(2048 if paper else 256, 64, 36))
    assert recipe.match[0].similarity.spec.name == "mtfn.fusion"
    assert model.loss is not None


@pytest.mark.parametrize("name", ["mtfn_f30k", "mtfn_coco"])
def test_the_paper_recipes_have_the_official_configuration(name):
    r = load_recipe(ROOT / "recipes" / f"{name}.toml")
    assert (r.image.encoder.spec.name, r.image.pool.spec.name, r.text.pool.spec.name) == ("core.raw", "core.mean",
                                                                                          "core.last")
    text = r.text.encoder.spec
    assert (text.word_dim, text.hidden_dim, text.dropout, text.freeze_embedding) == (620, 2400, 0.25, False)
    f = r.match[0].similarity.spec
    assert (f.rank, f.dim_hv, f.dim_ht, f.dim_mm, f.dropout_v, f.dropout_t, f.dropout_hv, f.dropout_ht) == (
        20, 1024, 1024, 1024, 0.25, 0.25, 0.0, 0.0)
    assert (f.activation_v, f.activation_t, f.activation_hv, f.activation_ht, f.activation_mm,
            f.classif_activation, f.classif_dropout) == ("tanh", "tanh", "none", "none", "none", "none", 0.0)
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 0)
    t = r.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_decay, t.optimizer, t.grad_clip) == (120, 128, 1e-4, 1.0, "adam", 0.0)
    expected = schedule(1e-4, 120)
    assert [(p.epochs, p.lr) for p in r.phases[:-1]] == [(p["epochs"], pytest.approx(p["lr"])) for p in expected[:-1]]
    assert r.phases[-1].lr == pytest.approx(1e-5)


def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path):
    """One tiny epoch (sequential dropout on), then the scoring engine gives each caption the scores it gets alone."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(ROOT / "recipes" / "mtfn_shapes.toml", [
        f"data.path={data}", "text.encoder.word_dim=6", "text.encoder.hidden_dim=10", "match.0.similarity.rank=3",
        "match.0.similarity.dim_hv=5", "match.0.similarity.dim_ht=6", "match.0.similarity.dim_mm=4",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3", "train.phase=[]"])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)


def test_the_paper_loss_is_calcul_loss():
    import torch

    recipe = load_recipe(ROOT / "recipes" / "mtfn_f30k.toml")
    loss = build_model(recipe, DataPorts(2048, 64, 36)).loss
    scores = torch.rand(9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    positives = torch.eye(9, dtype=torch.bool)
    torch.testing.assert_close(loss(scores, positives=positives, epoch=0), official.calcul_loss(scores), rtol=0,
                               atol=1e-12)
