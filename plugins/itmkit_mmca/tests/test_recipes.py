"""MMCA's recipes: the paper's configuration, the two-branch score, and a trained model through the scoring engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit.types import Regions, Tokens

ROOT = Path(__file__).parents[3]
RECIPES = sorted((ROOT / "recipes").glob("mmca_*.toml"))
TOL = dict(rtol=0, atol=1e-5)


def tiny_bert() -> list[str]:
    from itmkit_bert.stages import TINY

    return [f"text.encoder.path={TINY}", "text.encoder.pretrained=false"]


def test_there_are_three_recipes():
    assert [p.stem for p in RECIPES] == ["mmca_coco", "mmca_f30k", "mmca_shapes"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds(path):
    recipe = load_recipe(path, tiny_bert())
    model = build_model(recipe, DataPorts(256 if "shapes" in path.stem else 2048, 64, 36))
    assert [b.weight for b in recipe.match] == [1.0, 0.2]
    assert model.text.encoder.bert.embeddings.word_embeddings.weight.requires_grad is False  # frozen BERT


@pytest.mark.parametrize("path", [p for p in RECIPES if "shapes" not in p.stem], ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_paper_configuration(path):
    r = load_recipe(path, tiny_bert())
    assert r.info.embed_dim == 256
    image_pool, cross = r.image.pool.spec, r.match[1].similarity.spec
    assert (image_pool.heads, image_pool.activation, image_pool.intermediate) == (16, "relu", None)
    assert (cross.heads, cross.activation, cross.intermediate, cross.channels, cross.ngrams) == (16, "relu", None, 256,
                                                                                                 [1, 2, 3])
    text_pool = r.text.pool.spec
    assert (text_pool.channels, text_pool.widths, text_pool.layer_norm) == (256, [1, 2, 3], True)
    assert r.text.encoder.spec.freeze
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 0)
    t = r.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_update, t.lr_decay, t.optimizer) == (20, 64, 2e-4, 10, 0.1, "adam")


def test_the_model_score_is_i0_c0_plus_alpha_i1_c1():
    recipe = load_recipe(ROOT / "recipes" / "mmca_f30k.toml", [*tiny_bert(), "recipe.embed_dim=32",
                                                                "image.pool.heads=4", "match.1.similarity.heads=4",
                                                                "match.1.similarity.channels=8", "text.pool.channels=8"])
    torch.manual_seed(0)
    model = build_model(recipe, DataPorts(12, 64, 36)).double().eval()
    g = torch.Generator().manual_seed(1)
    regions = Regions(torch.randn(3, 36, 12, generator=g, dtype=torch.float64), torch.tensor([36, 20, 36]))
    lengths = torch.tensor([9, 4, 7, 9])
    ids = torch.randint(5, 64, (4, 9), generator=g)
    ids = torch.where(torch.arange(9)[None] < lengths[:, None], ids, 0)
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(Tokens(ids, lengths))
        i0, c0 = image.global_, text.global_
        cross = model.branches[1].stages[0](image=image.local, text=text.local)
        torch.testing.assert_close(i0.norm(dim=1), torch.ones(3, dtype=torch.float64), **TOL)
        torch.testing.assert_close(model.score(image, text), i0 @ c0.T + 0.2 * cross, **TOL)
        assert image.local.feats.shape[-1] == 32 and text.local.feats.shape[-1] == 32  # R and E, not R_s


def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path):
    """One tiny epoch, then the scoring engine (length-sorted caption batches, blocks) gives each
    caption the scores it gets when scored alone against all the images."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(ROOT / "recipes" / "mmca_shapes.toml", [
        *tiny_bert(), f"data.path={data}", "recipe.embed_dim=16", "image.pool.heads=2", "match.1.similarity.heads=2",
        "match.1.similarity.channels=4", "text.pool.channels=4", "train.epochs=1", "train.batch_size=8",
        "train.eval_batch_size=3", "loss.warmup_epochs=0"])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)
