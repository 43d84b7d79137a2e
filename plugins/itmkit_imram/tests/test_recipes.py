"""IMRAM's recipes: the official scripts' configuration, the cross-paper recipe, and a trained model through the engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import load_checkpoint
from itmkit.importing import get_importers, import_checkpoint
from itmkit.recipe import load_recipe
from itmkit.testing import recipe_plugins
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_imram.tests.test_importer import WORDS, official_weights, options, save_official

ROOT = Path(__file__).parents[3]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("imram_*.toml") if recipe_plugins(p) == {"imram"})
PAPER = [p for p in RECIPES if "data/" in p.read_text()]


def test_the_recipes():
    assert [p.stem for p in RECIPES] == ["imram_bfan", "imram_coco", "imram_coco_full", "imram_f30k",
                                         "imram_f30k_full", "imram_shapes"]
    assert [p.stem for p in PAPER] == ["imram_coco", "imram_coco_full", "imram_f30k", "imram_f30k_full"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds(path):
    paper = path in PAPER
    model = build_model(load_recipe(path), DataPorts(2048 if paper else 256, 100, 36))
    assert all(b.stages[1].__class__.__name__ == "StepSum" for b in model.branches)


SCRIPTS = {  # recipe -> the official script's options (script/tune_*.sh; full: the same with model_mode full)
    "imram_f30k": dict(model_mode="image_IMRAM", iteration_step=1, lambda_softmax=9.0),
    "imram_coco": dict(model_mode="text_IMRAM", iteration_step=3, lambda_softmax=11.0, data_name="coco_precomp",
                       num_epochs=20, lr_update=10, learning_rate=5e-4),
    "imram_f30k_full": dict(model_mode="full_IMRAM", iteration_step=3, lambda_softmax=9.0),
    "imram_coco_full": dict(model_mode="full_IMRAM", iteration_step=3, lambda_softmax=11.0, data_name="coco_precomp",
                            num_epochs=20, lr_update=10, learning_rate=5e-4),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_paper_recipe_is_what_the_importer_makes_of_its_script(tmp_path, name):
    """The recipe and a checkpoint trained with the script's flags (bi_gru, max_violation, agg_func=Mean,
    no_IMRAM_norm, sizes 2048 / 300 / 1024) convert to the same model: stages, parameters, schedule."""
    opt = options(embed_size=1024, word_dim=300, img_dim=2048, **SCRIPTS[name])
    vocab = tmp_path / "vocab.json"
    from itmkit.data.vocab import Vocabulary

    Vocabulary([*Vocabulary.SPECIALS, *WORDS]).save(vocab)
    save_official(tmp_path / "model_best.pth.tar", opt, model=official_weights(opt))
    out = import_checkpoint("imram", tmp_path / "model_best.pth.tar", vocab, tmp_path / "imram.safetensors",
                            get_importers())
    imported, ours = load_checkpoint(out).model.recipe.to_dict(), load_recipe(ROOT / "recipes" / f"{name}.toml").to_dict()
    for key in ("image", "text", "match", "loss", "train"):
        assert imported[key] == ours[key], key
    assert {k: imported["data"][k] for k in ("protocol", "test_split")} == {k: ours["data"][k] for k in ("protocol", "test_split")}
    assert imported["recipe"]["embed_dim"] == ours["recipe"]["embed_dim"] == 1024


def test_imram_bfan_runs_focal_attention_in_every_step_of_both_directions():
    recipe = load_recipe(ROOT / "recipes" / "imram_bfan.toml")
    shapes = load_recipe(ROOT / "recipes" / "imram_shapes.toml")
    assert [(m.similarity.spec.name, m.similarity.spec.focal, m.similarity.spec.lambda_softmax) for m in recipe.match] \
        == [("imram.t2i", "equal", 20.0), ("imram.i2t", "equal", 20.0)]
    # the same model as imram_shapes but for the attention
    assert recipe.to_dict()["train"] == shapes.to_dict()["train"] and recipe.info.embed_dim == shapes.info.embed_dim
    model = build_model(recipe, DataPorts(12, 30, 36), seed=0)
    g = torch.Generator().manual_seed(0)
    regions = Regions(torch.rand(3, 36, 12, generator=g), torch.tensor([36, 20, 7]))
    lengths = torch.tensor([5, 8, 3])
    ids = torch.randint(4, 30, (3, 8), generator=g).masked_fill(~lengths_to_mask(lengths, 8), 0)
    loss, _ = model(regions, Tokens(ids, lengths), torch.arange(3))
    loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("branches"))


def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path):
    """One tiny epoch of full IMRAM (K = 3, so a pair's memory is projected), then the scoring engine
    (length-sorted caption batches, blocks) gives each caption the scores it gets when scored alone."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(ROOT / "recipes" / "imram_shapes.toml", [
        f"data.path={data}", "recipe.embed_dim=16", "text.encoder.word_dim=8", "match.0.similarity.steps=3",
        "match.1.similarity.steps=3", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3",
        "loss.warmup_epochs=0"])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)


def test_scripts_options_are_the_real_flags():
    """The options() of the importer tests are opts.py's flags (no invented one): a sanity check of the fixture."""
    opt = options()
    assert isinstance(opt, argparse.Namespace)
    for flag in ("model_mode", "iteration_step", "no_IMRAM_norm", "lambda_softmax", "agg_func", "bi_gru"):
        assert hasattr(opt, flag)
