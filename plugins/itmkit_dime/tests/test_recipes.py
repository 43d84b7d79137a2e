"""DIME's recipes: the README configuration per direction, and trained tiny models through the scoring engine."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe

ROOT = Path(__file__).parents[3]
# the DIME paper's own recipes (cross-paper ones such as dime_sgraf.toml are tested with the lead's recipes)
NAMES = ["dime_coco_i2t", "dime_coco_t2i", "dime_f30k_i2t", "dime_f30k_t2i", "dime_shapes", "dime_shapes_t2i"]
RECIPES = [ROOT / "recipes" / f"{name}.toml" for name in NAMES]


def tiny_bert() -> list[str]:
    from itmkit_bert.stages import TINY

    return [f"text.encoder.path={TINY}", "text.encoder.pretrained=false"]


def test_the_recipes_exist():
    assert all(p.is_file() for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds(path):
    recipe = load_recipe(path, tiny_bert())
    model = build_model(recipe, DataPorts(256 if "shapes" in path.stem else 2048, 64, 36))
    assert model.text.encoder.bert.embeddings.word_embeddings.weight.requires_grad is False  # frozen BERT
    spec = recipe.match[0].similarity.spec
    assert spec.name == "dime.interaction"
    t2i = spec.direction == "t2i"
    assert (recipe.image.pool is not None and recipe.image.pool.spec.batchnorm) == t2i  # BN only for t-i
    assert spec.lambda_softmax == (9.0 if t2i else 4.0)


@pytest.mark.parametrize("path", [p for p in RECIPES if "shapes" not in p.stem], ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_readme_configuration(path):
    r = load_recipe(path, tiny_bert())
    spec = r.match[0].similarity.spec
    assert r.info.embed_dim == 256 and r.text.encoder.spec.max_words == 32
    assert (spec.heads, spec.hid_imrc, spec.hid_router, spec.path_hid, spec.path_weight, spec.raw_feature_norm) == (
        16, 512, 512, 128, 0.5, "clipped_l2norm")
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 0)
    t = r.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_update, t.lr_decay, t.grad_clip, t.optimizer) == (
        30, 32, 2e-4, 15, 0.1, 2.0, "adam")
    assert (t.extra_captions, t.extra_images) == ((0, 1) if spec.direction == "t2i" else (1, 0))
    assert r.data.protocol == ("coco-1k-5fold" if "coco" in path.stem else "f30k-1k")


@pytest.mark.parametrize("recipe_name", ["dime_shapes", "dime_shapes_t2i"])
def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path, recipe_name):
    """One tiny epoch (with the path term and extra negatives), then the scoring engine (length-sorted caption
    batches, blocks) gives each caption the scores it gets when scored alone against all the images."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    extra = "train.extra_captions=1" if recipe_name == "dime_shapes" else "train.extra_images=1"
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.toml", [
        *tiny_bert(), f"data.path={data}", "recipe.embed_dim=8", "match.0.similarity.heads=2",
        "match.0.similarity.hid_imrc=8", "match.0.similarity.hid_router=8", "text.encoder.max_words=12",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3", extra])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "match[0].path" in lines  # the path term was added and logged
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)


def test_the_i2t_and_t2i_ensemble_averages_the_two_matrices(tmp_path):
    """`itmkit eval a b` (DIME*): the mean of the two models' matrices."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cliutil import invoke
    from tinydata import write_tiny

    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    for name in ("dime_shapes", "dime_shapes_t2i"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.toml", [
            *tiny_bert(), f"data.path={data}", "recipe.embed_dim=8", "match.0.similarity.heads=2",
            "match.0.similarity.hid_imrc=8", "match.0.similarity.hid_router=8", "text.encoder.max_words=12",
            "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3"])
        train(recipe, out_dir=tmp_path / name, log=lambda *a: None)
    sims = []
    for args in (["dime_shapes"], ["dime_shapes_t2i"], ["dime_shapes", "dime_shapes_t2i"]):
        out = tmp_path / f"{'+'.join(args)}.npy"
        code, _, err = invoke("eval", *(str(tmp_path / a / "model_best.safetensors") for a in args), "--data",
                              str(data), "--save-sims", str(out), "--device", "cpu")
        assert code == 0, err
        sims.append(np.load(out))
    np.testing.assert_allclose(sims[2], (sims[0] + sims[1]) / 2, rtol=0, atol=1e-6)
