"""CAAN's recipes: the paper's configuration, the model's score, and a trained model through the scoring engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit.types import Regions, Tokens

ROOT = Path(__file__).parents[3]
RECIPES = sorted((ROOT / "recipes").glob("caan_*.toml"))
PAPER = {"caan_f30k": (30, 2e-4, 15), "caan_coco": (20, 5e-4, 10)}  # epochs, lr, epochs before lr / 10 (Sec. 4.2)


def test_there_are_three_recipes():
    assert [p.stem for p in RECIPES] == ["caan_coco", "caan_f30k", "caan_shapes"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_one_caan_branch_over_unnormalised_towers(path):
    recipe = load_recipe(path)
    model = build_model(recipe, DataPorts(256 if "shapes" in path.stem else 2048, 64, 36))
    assert len(recipe.match) == 1 and recipe.match[0].similarity.spec.name == "caan.attention"
    assert not model.image.encoder.normalize and not model.text.encoder.normalize  # eq. 1 and eq. 4 add no norm
    assert model.text.encoder.bidirectional


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem in PAPER], ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_paper_configuration(path):
    r = load_recipe(path)
    caan = r.match[0].similarity.spec
    assert (caan.intra_modal, caan.inter_modal) == ("semantic", True)  # CAAN = SA + IA (Table 4)
    assert (caan.width, caan.normalize, caan.normalize_h_inputs) == (256, True, False)  # ASSUMPTIONs
    assert r.info.embed_dim == 1024 and r.text.encoder.spec.word_dim == 300
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 0)
    t = r.train
    assert (t.epochs, t.lr, t.lr_update) == PAPER[path.stem]
    assert (t.lr_decay, t.optimizer, t.batch_size, t.grad_clip) == (0.1, "adam", 128, 2.0)


def test_the_shapes_recipe_is_sized_for_the_built_in_data():
    r = load_recipe(ROOT / "recipes" / "caan_shapes.toml")
    assert r.data.path == "shapes" and r.data.dev_images == 200
    assert r.info.embed_dim == 256 and r.text.encoder.spec.word_dim == 128
    assert (r.train.epochs, r.train.batch_size, r.train.lr, r.loss.spec.warmup_epochs) == (3, 64, 2e-3, 1)


def test_the_model_score_is_the_cosine_of_the_attended_vectors():
    recipe = load_recipe(ROOT / "recipes" / "caan_f30k.toml", ["recipe.embed_dim=16", "match.0.similarity.width=8",
                                                               "text.encoder.word_dim=12"])
    torch.manual_seed(0)
    model = build_model(recipe, DataPorts(20, 64, 36)).double().eval()
    g = torch.Generator().manual_seed(1)
    regions = Regions(torch.randn(3, 36, 20, generator=g, dtype=torch.float64), torch.tensor([36, 20, 36]))
    lengths = torch.tensor([9, 4, 7, 9])
    ids = torch.randint(5, 64, (4, 9), generator=g)
    ids = torch.where(torch.arange(9)[None] < lengths[:, None], ids, 0)
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(Tokens(ids, lengths))
        caan = model.branches[0].stages[0]
        f, g_ = caan.attention(image.local, text.local)
        v_hat = torch.einsum("itn,ind->itd", f, image.local.feats * image.local.mask[..., None])
        u_hat = torch.einsum("itm,tmd->itd", g_, text.local.feats * text.local.mask[..., None])
        expected = torch.nn.functional.cosine_similarity(v_hat, u_hat, dim=-1)
        torch.testing.assert_close(model.score(image, text), expected, rtol=0, atol=1e-7)
        assert image.local.feats.norm(dim=-1).std() > 0  # the regions enter unnormalised


def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path):
    """One tiny epoch, then the scoring engine (length-sorted caption batches, blocks) gives each
    caption the scores it gets when scored alone against all the images."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(ROOT / "recipes" / "caan_shapes.toml", [
        f"data.path={data}", "recipe.embed_dim=16", "match.0.similarity.width=8", "text.encoder.word_dim=8",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3", "loss.warmup_epochs=0"])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)
