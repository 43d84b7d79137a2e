"""The cross-paper recipes: each composes other papers' stages as its comment says, and trains.

Each stage is tested against its paper's reference in its own plugin; here the point is the
composition: that the recipe wires the stages it claims, that its score is the composition of
those stages, and that one training step reaches every parameter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit.testing import recipe_plugins
from itmkit.types import Regions, Tokens, lengths_to_mask

RECIPES = Path(__file__).parents[1] / "recipes"
SMALL = ["recipe.embed_dim=16", "text.encoder.word_dim=8"]
CROSS = {  # recipe -> the plugins whose stages it combines
    "gpo_sgraf": {"gpo", "sgraf"},
    "mtfn_gpo": {"gpo", "mtfn"},
    "ramen_scan": {"ramen", "scan"},
    "scan_gpo": {"gpo", "scan"},
    "sgraf_bfan": {"bfan", "sgraf"},
}


def _model(name: str, overrides=()):
    recipe = load_recipe(RECIPES / f"{name}.toml", [*SMALL, *overrides])
    return build_model(recipe, DataPorts(feature_dim=12, vocab_size=30, num_regions=36), seed=0)


def _batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    regions = Regions(torch.rand(n, 36, 12, generator=g), torch.full((n,), 36))
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids = torch.randint(4, 30, (n, 8), generator=g).masked_fill(~lengths_to_mask(lengths, 8), 0)
    return regions, Tokens(ids, lengths)


@pytest.mark.parametrize("name", sorted(CROSS))
def test_the_recipe_combines_the_papers_it_names(name):
    assert recipe_plugins(RECIPES / f"{name}.toml") == CROSS[name]


def test_gpo_sgraf_feeds_gpo_pools_into_the_global_node():
    model = _model("gpo_sgraf", ["match[0].similarity.sim_dim=6"]).eval()
    regions, tokens = _batch()
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        vector, aggregate = model.branches[0].stages[1], model.branches[0].stages[2]
        aligned = model.branches[0].stages[0](image=image.local, text=text.local)
        # the global node is s_g = l2norm(W_g (v - e)^2) of the GPO-pooled vectors
        sims = vector(x=aligned, image=model.image.pool(image.local), text=model.text.pool(text.local))
        expected_global = vector.global_node(image.global_, text.global_)
        torch.testing.assert_close(sims.sims[:, :, 0], expected_global)
        torch.testing.assert_close(model.score(image, text), aggregate(x=sims))


def test_scan_gpo_is_the_sum_of_a_scan_branch_and_a_gpo_cosine():
    model = _model("scan_gpo").eval()
    regions, tokens = _batch()
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        local = model.branches[0](image, text)
        glob = torch.nn.functional.normalize(image.global_, dim=-1) @ torch.nn.functional.normalize(text.global_, dim=-1).T
        torch.testing.assert_close(model.branches[1](image, text), glob, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.score(image, text), local + glob, rtol=0, atol=1e-6)


def test_sgraf_bfan_attends_with_focal_weights():
    """The weights reaching sgraf.vector are BFAN's: each word keeps only regions above its mean weight."""
    model = _model("sgraf_bfan", ["match[0].similarity.sim_dim=6"]).eval()
    regions, tokens = _batch()
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        aligned = model.branches[0].stages[0](image=image.local, text=text.local)
    w = aligned.weights[aligned.query_mask]  # (pairs x valid words, 36)
    assert (w == 0).any(dim=-1).all(), "focal attention drops some region for every word"
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))


@pytest.mark.parametrize("name", sorted(CROSS))
def test_one_training_step_reaches_every_parameter(name):
    overrides = {"scan_gpo": [], "mtfn_gpo": ["match[0].similarity.dim_mm=6", "text.encoder.augment_prob=0"],
                 "ramen_scan": ["match[0].similarity.mmc_sizes=[6, 6]"]}.get(name, ["match[0].similarity.sim_dim=6"])
    model = _model(name, overrides).train()
    regions, tokens = _batch(n=6, seed=1)
    loss, scores = model(regions, tokens, torch.arange(6), epoch=1)
    assert torch.isfinite(loss) and scores.shape == (6, 6)
    loss.backward()
    # RAMEN's readout ends in a bias added to every score alike: the hinge loss cannot see it (its gradient is 0)
    shift_only = {"ramen_scan": "branches.0.stages.1.readout.out.bias"}.get(name)
    untouched = [n for n, p in model.named_parameters()
                 if p.requires_grad and n != shift_only and (p.grad is None or not p.grad.any())]
    assert not untouched, f"{name}: no gradient reaches {untouched}"
