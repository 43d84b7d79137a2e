"""SHAN's recipes: the paper's configuration, the model score, the GPO cross-paper recipe, and a trained model
through the scoring engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit.testing import recipe_plugins
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_shan.hierarchy import GlobalToLocal, StepwiseHierarchy

ROOT = Path(__file__).parents[3]
# this paper's recipes; shan_gpo.toml (GPO towers) is tested at the end
RECIPES = [p for p in sorted((ROOT / "recipes").glob("shan_*.toml")) if recipe_plugins(p) <= {"shan"}]
PAPER = [p for p in RECIPES if "shapes" not in p.stem]
TOL = dict(rtol=0, atol=1e-6)


def test_there_are_the_six_paper_recipes_and_one_for_the_built_in_data():
    assert [p.stem for p in RECIPES] == ["shan_coco_full", "shan_coco_i2t", "shan_coco_t2i", "shan_f30k_full",
                                         "shan_f30k_i2t", "shan_f30k_t2i", "shan_shapes"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds(path):
    recipe = load_recipe(path)
    model = build_model(recipe, DataPorts(256 if "shapes" in path.stem else 2048, 64, 36))
    assert isinstance(model.branches[0].stages[0], StepwiseHierarchy)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_paper_configuration(path):
    r = load_recipe(path)
    assert r.info.embed_dim == 1024  # Sec. 4.2: joint space and GRU hidden 1024
    text = r.text.encoder.spec
    assert (text.word_dim, text.bidirectional, text.num_layers) == (300, True, 1)
    assert len(r.match) == 1 and r.match[0].weight == 1.0
    shan = r.match[0].similarity.spec
    assert shan.variant == path.stem.split("_")[-1]  # shan_f30k_t2i -> SHAN-T2I
    assert (shan.steps, shan.lambda_softmax, shan.mu1, shan.mu2) == ("l2l+g2l+g2g", 15.0, 0.3, 0.5)
    assert (shan.l2l_pool, shan.g2l_temperature, shan.gate, shan.normalize_affinity) == ("sum", 1.0, "scalar", True)
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 0)
    t = r.train
    assert (t.epochs, t.optimizer) == (30, "adam")  # stated
    assert (t.lr, t.lr_update, t.lr_decay, t.batch_size, t.grad_clip) == (2e-4, 15, 0.1, 128, 2.0)  # SCAN's
    assert r.data.protocol == ("f30k-1k" if "f30k" in path.stem else "coco-1k-5fold")


def _batch(n: int = 5, seed: int = 0, features: int = 12, vocab: int = 30):
    g = torch.Generator().manual_seed(seed)
    regions = Regions(torch.rand(n, 36, features, generator=g), torch.tensor([36, 20, 36, 7, 36, 36][:n]))
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids = torch.randint(4, vocab - 1, (n, 8), generator=g).masked_fill(~lengths_to_mask(lengths, 8), 0)
    return regions, Tokens(ids, lengths)


def test_the_model_score_is_the_hierarchy_on_the_encoded_fragments():
    recipe = load_recipe(ROOT / "recipes" / "shan_f30k_full.toml", ["recipe.embed_dim=16", "text.encoder.word_dim=8"])
    model = build_model(recipe, DataPorts(12, 30, 36), seed=0).eval()
    regions, tokens = _batch()
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        shan = model.branches[0].stages[0]
        torch.testing.assert_close(model.score(image, text), shan(image=image.local, text=text.local), **TOL)
        # the encoders l2-normalise each fragment (SCAN's default, kept: ASSUMPTION)
        norms = image.local.feats.norm(dim=-1)[image.local.mask]
        torch.testing.assert_close(norms, torch.ones_like(norms), **TOL)


# --------------------------------------------------------------------------- cross-paper: shan_gpo


def _gpo_model():
    recipe = load_recipe(ROOT / "recipes" / "shan_gpo.toml", ["recipe.embed_dim=16", "text.encoder.word_dim=8"])
    return build_model(recipe, DataPorts(feature_dim=12, vocab_size=30, num_regions=36, mask_id=29), seed=0)


def test_shan_gpo_combines_gpo_and_shan():
    assert recipe_plugins(ROOT / "recipes" / "shan_gpo.toml") == {"gpo", "shan"}


def test_shan_gpo_is_the_gpo_cosine_plus_shan_steps_2_and_3_on_the_gpo_pools():
    model = _gpo_model().eval()
    regions, tokens = _batch()
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        glob = F.normalize(image.global_, dim=-1) @ F.normalize(text.global_, dim=-1).T
        g2l = model.branches[1].stages[0]
        assert isinstance(g2l, GlobalToLocal) and (g2l.image_queries, g2l.text_queries) == (True, True)
        context = g2l(image=image.local, text=text.local, image_global=image.global_, text_global=text.global_)
        torch.testing.assert_close(model.score(image, text), glob + context, **TOL)


def test_shan_gpo_one_training_step_reaches_every_parameter():
    model = _gpo_model().train()
    regions, tokens = _batch(n=6, seed=1)
    loss, scores = model(regions, tokens, torch.arange(6), epoch=1)
    assert torch.isfinite(loss) and scores.shape == (6, 6)
    loss.backward()
    untouched = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not untouched, f"no gradient reaches {untouched}"


# --------------------------------------------------------------------------- trained, through the scoring engine


@pytest.mark.parametrize("variant", ["full", "t2i"])
def test_a_trained_model_scores_a_split_as_each_caption_alone(tmp_path, variant):
    """One tiny epoch, then the scoring engine (length-sorted caption batches, blocks) gives each
    caption the scores it gets when scored alone against all the images."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinydata import write_tiny

    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(ROOT / "recipes" / "shan_shapes.toml", [
        f"data.path={data}", "recipe.embed_dim=16", "text.encoder.word_dim=8", f"match.0.similarity.variant={variant}",
        "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=3", "loss.warmup_epochs=0"
    ])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)
