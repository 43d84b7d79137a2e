"""Objectives (core): extra weighted training terms declared as [[objective]] stages.

Two small test objectives read what the B x B score matrix cannot give: the image fragments with
the raw captions (a stand-in for caption generation), and the model's parameters (a weight-norm
penalty). The model's loss must be the [loss] stage's value plus each objective times its weight,
objectives must wire through ports like every other stage (mismatches named with key paths),
their weights train and are saved, and the conformance kit must run on them.
"""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from torch import nn

from itmkit.build import DataPorts, build_model, stage_tree
from itmkit.hookspecs import hookimpl
from itmkit.plugins import load_registry
from itmkit.recipe import RecipeError, parse_recipe
from itmkit.stage import Stage, check_stage_class, param
from itmkit.testing import CHECKS
from itmkit.types import (
    Aligned,
    AlignedPort,
    GlobalPort,
    Local,
    LocalPort,
    LossPort,
    ParametersPort,
    Regions,
    Tokens,
    TokensPort,
)

F, V, R = 24, 30, 5
DATA = DataPorts(feature_dim=F, vocab_size=V, num_regions=R)

SMALL = """\
[recipe]
name = "small"
embed_dim = 16

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 8 }
pool = { stage = "core.mean" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"
"""

OBJECTIVES = SMALL + """
[[objective]]
stage = "testkit.predict_words"
weight = 0.5

[[objective]]
stage = "testkit.weight_norm"
weight = 0.01
prefix = "image."
"""


class PredictWordsModule(nn.Module):
    """Cross-entropy of predicting every caption word from the mean of the image's valid fragments."""

    def __init__(self, *, dim: int, vocab: int):
        super().__init__()
        self.out = nn.Linear(dim, vocab)

    def forward(self, *, image: Local, tokens: Tokens, positives: torch.Tensor, epoch: int) -> torch.Tensor:
        pooled = (image.feats * image.mask[..., None]).sum(1) / image.mask.sum(1, keepdim=True)
        logits = self.out(pooled)[:, None].expand(-1, tokens.ids.shape[1], -1)
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), tokens.ids, reduction="none")
        return (losses * tokens.mask).sum() / tokens.mask.sum()


@attrs.frozen(kw_only=True)
class PredictWords(Stage):
    """Predict the caption's words from the image fragments (a test stand-in for caption generation)."""

    name = "testkit.predict_words"
    kind = "objective"
    paper = "test stage"

    def ports(self, image: LocalPort, tokens: TokensPort) -> LossPort:
        return LossPort()

    def build(self, image: LocalPort, tokens: TokensPort) -> nn.Module:
        return PredictWordsModule(dim=image.dim, vocab=tokens.dim)


class WeightNormModule(nn.Module):
    def __init__(self, *, prefix: str):
        super().__init__()
        self.prefix = prefix

    def forward(self, *, parameters: dict[str, nn.Parameter], positives: torch.Tensor, epoch: int) -> torch.Tensor:
        chosen = [p for name, p in parameters.items() if name.startswith(self.prefix)]
        return sum((p.norm() for p in chosen), torch.zeros(()))


@attrs.frozen(kw_only=True)
class WeightNorm(Stage):
    """Sum of the L2 norms of the parameters whose names start with ``prefix``."""

    name = "testkit.weight_norm"
    kind = "objective"
    paper = "test stage"

    prefix: str = param("image.", "parameter-name prefix")

    def ports(self, parameters: ParametersPort) -> LossPort:
        return LossPort()

    def build(self, parameters: ParametersPort) -> nn.Module:
        return WeightNormModule(prefix=self.prefix)


@attrs.frozen(kw_only=True)
class PooledNorm(Stage):
    """Mean squared norm of the pooled image vectors."""

    name = "testkit.pooled_norm"
    kind = "objective"
    paper = "test stage"

    def ports(self, image: GlobalPort) -> LossPort:
        return LossPort()

    def build(self, image: GlobalPort) -> nn.Module:
        return PooledNormModule()


class PooledNormModule(nn.Module):
    def forward(self, *, image: torch.Tensor, positives: torch.Tensor, epoch: int) -> torch.Tensor:
        return image.pow(2).sum(1).mean()


@attrs.frozen(kw_only=True)
class AttendMean(Stage):
    """Each caption word attends over the regions by dot product (SCAN-like, no temperature)."""

    name = "testkit.attend_mean"
    kind = "cross"
    paper = "test stage"

    def ports(self, image: LocalPort, text: LocalPort) -> AlignedPort:
        return AlignedPort(text.dim)

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return AttendModule()


class AttendModule(nn.Module):
    def forward(self, image: Local, text: Local) -> Aligned:
        query, context = text.feats[None], image.feats[:, None]
        logits = (query @ context.transpose(-1, -2)).masked_fill(~image.mask[:, None, None, :], float("-inf"))
        return Aligned(query, logits.softmax(-1), context, text.mask[None], "text")


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", "")
    module = types.ModuleType("testkit")
    module.register_stages = hookimpl(lambda: [PredictWords, WeightNorm, PooledNorm, AttendMean])
    return load_registry([module])


def batch(n: int = 6, seed: int = 0) -> tuple[Regions, Tokens, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (n,), generator=g)
    ids = torch.randint(4, V, (n, int(lengths.max())), generator=g) * (torch.arange(int(lengths.max())) < lengths[:, None])
    regions = Regions(torch.rand(n, R, F, generator=g), torch.randint(2, R + 1, (n,), generator=g))
    return regions, Tokens(ids, lengths), torch.arange(n) // 2


def test_loss_is_the_loss_stage_plus_weighted_objectives(registry):
    recipe = parse_recipe(OBJECTIVES, registry=registry)
    model = build_model(recipe, DATA, seed=0).train()
    regions, tokens, image_ids = batch()
    torch.manual_seed(1)
    step = model.training_step(regions, tokens, image_ids, epoch=2)
    assert set(step.terms) == {"loss", "objective[0]", "objective[1]"}

    # The same terms computed by hand from the model's parts.
    image, text = model.encode_images(regions), model.encode_texts(tokens)
    scores = model.score(image, text)
    positives = image_ids[:, None] == image_ids[None, :]
    by_hand_loss = model.loss(scores, positives=positives, epoch=2)
    by_hand_words = model.objectives[0](image=image.local, tokens=tokens, positives=positives, epoch=2)
    norms = sum(p.norm() for name, p in model.named_parameters() if name.startswith("image."))
    assert torch.allclose(step.terms["loss"], by_hand_loss)
    assert torch.allclose(step.terms["objective[0]"], by_hand_words)
    assert torch.allclose(step.terms["objective[1]"], norms)
    assert torch.allclose(step.loss, by_hand_loss + 0.5 * by_hand_words + 0.01 * norms)
    # forward() keeps its (loss, scores) contract.
    loss, scores_again = model(regions, tokens, image_ids, epoch=2)
    assert torch.allclose(loss, step.loss) and torch.allclose(scores_again, scores)


def test_objective_weights_train_and_are_part_of_the_state_dict(registry):
    model = build_model(parse_recipe(OBJECTIVES, registry=registry), DATA, seed=0)
    assert "objectives.0.out.weight" in model.state_dict()
    model.training_step(*batch()).loss.backward()
    assert model.objectives[0].out.weight.grad is not None and model.objectives[0].out.weight.grad.abs().sum() > 0
    # The parameters port carries the towers' and branches' parameters, never the objectives' own.
    names = set(model.trained_parameters())
    assert "image.encoder.fc.weight" in names and not any(n.startswith("objectives.") for n in names)


def test_scoring_never_runs_objectives(registry):
    model = build_model(parse_recipe(OBJECTIVES, registry=registry), DATA, seed=0).eval()
    model.objectives[0].forward = None  # calling it would fail
    regions, tokens, _ = batch()
    assert model.score(model.encode_images(regions), model.encode_texts(tokens)).shape == (6, 6)


def test_recipe_round_trip_and_stage_tree(registry):
    recipe = parse_recipe(OBJECTIVES, registry=registry)
    again = parse_recipe(recipe.to_toml(), registry=registry)
    assert again.to_dict() == recipe.to_dict()
    assert [(o.slot.spec.name, o.weight) for o in again.objectives] == [("testkit.predict_words", 0.5),
                                                                         ("testkit.weight_norm", 0.01)]
    rows = stage_tree(build_model(recipe, DATA, seed=0))
    assert [r["path"] for r in rows[-2:]] == ["objective[0]", "objective[1]"]
    assert rows[-2]["consumes"] == "image: Local[16], tokens: Tokens[30]"
    # A recipe without objectives resolves exactly as before they existed.
    assert "objective" not in parse_recipe(SMALL, registry=registry).to_dict()


def test_recipe_problems_name_the_objective(registry):
    bad = [
        (OBJECTIVES.replace('weight = 0.5', 'weight = "half"'), "objective[0].weight"),
        (OBJECTIVES.replace('weight = 0.5', 'weight = -0.5'), "expected a value >= 0.0, got -0.5 @ objective[0].weight"),
        (OBJECTIVES.replace('stage = "testkit.weight_norm"\n', ''), "missing key 'stage' (the registered name of an objective stage)"),
        (OBJECTIVES.replace('"testkit.predict_words"', '"testkit.predict_word"'), "did you mean"),
        (OBJECTIVES.replace('"testkit.predict_words"', '"core.triplet"'), "is a loss, but this slot takes an objective"),
        (OBJECTIVES.replace('prefix = "image."', 'prefx = "image."'), "objective[1]"),
        (SMALL + "\n[objective]\nstage = \"testkit.weight_norm\"\n", "expected [[objective]] tables"),
    ]
    for text, expected in bad:
        with pytest.raises(RecipeError) as caught:
            parse_recipe(text, registry=registry)
        assert expected in str(caught.value)


def test_port_mismatch_in_an_objective_is_a_wiring_error(registry):
    # testkit.pooled_norm reads the image tower's pooled vector; without an image pool there is none.
    text = SMALL.replace('encoder = { stage = "core.precomp" }\npool = { stage = "core.mean" }',
                         'encoder = { stage = "core.precomp" }')
    text = text.replace('similarity = { stage = "core.cosine" }',
                        'cross = { stage = "testkit.attend_mean" }\nsimilarity = { stage = "core.cosine" }')
    text = text.replace('similarity = { stage = "core.cosine" }\n', 'similarity = { stage = "core.cosine" }\n'
                        'aggregate = { stage = "core.mean" }\n') + '\n[[objective]]\nstage = "testkit.pooled_norm"\n'
    recipe = parse_recipe(text, registry=registry)
    with pytest.raises(RecipeError) as caught:
        build_model(recipe, DATA)
    message = str(caught.value)
    assert "objective[0]" in message and "input 'image' expects GlobalPort" in message
    assert "Local[16] from [image] fragments" in message


def test_only_objectives_may_read_the_batch_or_parameters():
    @attrs.frozen
    class Sneaky(Stage):
        """A similarity head that wants the raw captions."""

        name = "testkit.sneaky"
        kind = "similarity"
        paper = "test"

        def ports(self, tokens: TokensPort) -> LossPort:
            return LossPort()

        def build(self, tokens: TokensPort) -> nn.Module:
            return nn.Identity()

    problems = check_stage_class(Sneaky)
    assert any("'tokens' must be one of" in p and "for objectives" in p for p in problems)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", [PredictWords, WeightNorm, PooledNorm], ids=lambda c: c.name)
def test_conformance_kit_runs_on_objectives(cls, check):
    check(cls)


def test_training_with_objectives_logs_each_term_saves_and_resumes(registry, tmp_path):
    from itmkit.checkpoint import load_checkpoint
    from itmkit.plugins import reset_registry
    from itmkit.train import read_metrics, train
    from tinydata import RECIPE, write_tiny

    data = write_tiny(tmp_path / "data")
    text = RECIPE.replace("DATA", str(data)).replace("epochs = 1", "epochs = 2") + OBJECTIVES[OBJECTIVES.index("[[objective]]"):]
    reset_registry(registry)  # checkpoints are read back through the registry that knows the test stages
    try:
        recipe = parse_recipe(text, registry=registry)
        train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
        dev = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "dev"]
        assert len(dev) == 2
        for record in dev:  # the mean total loss is the weighted sum of the terms' means
            terms = record["train_terms"]
            assert set(terms) == {"loss", "objective[0]", "objective[1]"} and min(terms.values()) > 0
            weighted = terms["loss"] + 0.5 * terms["objective[0]"] + 0.01 * terms["objective[1]"]
            assert record["train_loss"] == pytest.approx(weighted, rel=1e-5)
        best = load_checkpoint(tmp_path / "run" / "model_best.safetensors")
        assert [o.slot.spec.name for o in best.model.recipe.objectives] == ["testkit.predict_words", "testkit.weight_norm"]
        assert "objectives.0.out.weight" in best.model.state_dict()

        # Killed after epoch 1 and resumed: the same final weights as the uninterrupted run.
        short = parse_recipe(text.replace("epochs = 2", "epochs = 1"), registry=registry)
        train(short, out_dir=tmp_path / "resumed", log=lambda *a: None)
        train(recipe, out_dir=tmp_path / "resumed", resume=True, log=lambda *a: None)
        a = load_checkpoint(tmp_path / "run" / "last.safetensors").model.state_dict()
        b = load_checkpoint(tmp_path / "resumed" / "last.safetensors").model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        reset_registry()
