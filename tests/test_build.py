"""Wiring and building (itmkit/build.py): the stage tree, weighted branches, forward/backward, determinism."""

from __future__ import annotations

import tomllib
import types
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

from itmkit.build import DataPorts, ITMModel, build_model, count_parameters, stage_tree, wire
from itmkit.hookspecs import hookimpl
from itmkit.ops import l2norm
from itmkit.plugins import load_registry
from itmkit.recipe import RecipeError, load_recipe, parse_recipe
from itmkit.stage import PortError, Stage, param
from itmkit.types import Aligned, AlignedPort, GlobalPort, Local, LocalPort, Regions, ScorePort, Tokens

ROOT = Path(__file__).resolve().parents[1]
VSEPP_PATH = ROOT / "recipes" / "vsepp.toml"

F, V, R = 48, 60, 7  # feature dim, vocabulary size, regions per image of the test data
DATA = DataPorts(feature_dim=F, vocab_size=V, num_regions=R)

SMALL = """\
[recipe]
name = "small"
embed_dim = 32

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 16 }
pool = { stage = "core.mean" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"
"""

# SMALL with a cross-attention branch in place of the global one.
SCAN_LIKE = SMALL.replace(
    'similarity = { stage = "core.cosine" }',
    'cross = { stage = "testkit.attend" }\nsimilarity = { stage = "core.cosine" }\naggregate = { stage = "core.mean" }',
)

# ------------------------------------------------------------------------------ test stages


@attrs.frozen(kw_only=True)
class Dot(Stage):
    """Raw inner product of the two global vectors (a second, different global head)."""

    name = "testkit.dot"
    kind = "similarity"
    paper = "none (a test stage)"

    scale: float = param(1.0, "factor on the inner product", gt=0.0)

    def ports(self, image: GlobalPort, text: GlobalPort) -> ScorePort:
        if image.dim != text.dim:
            raise PortError(f"dims {image.dim} and {text.dim} differ")
        return ScorePort()

    def build(self, image: GlobalPort, text: GlobalPort) -> nn.Module:
        return DotHead(scale=self.scale)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        return 8 * text_len


class DotHead(nn.Module):
    def __init__(self, *, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.scale * image @ text.T


@attrs.frozen(kw_only=True)
class Attend(Stage):
    """Each word attends over the image's regions: softmax(lambda <w, r>) (a minimal SCAN t2i)."""

    name = "testkit.attend"
    kind = "cross"
    paper = "none (a test stage)"

    smooth: float = param(4.0, "inverse temperature lambda", gt=0.0)

    def ports(self, image: LocalPort, text: LocalPort) -> AlignedPort:
        return AlignedPort(image.dim)

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return AttendModule(smooth=self.smooth)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        return 4 * text_len * image_len


class AttendModule(nn.Module):
    def __init__(self, *, smooth: float):
        super().__init__()
        self.smooth = smooth

    def forward(self, image: Local, text: Local) -> Aligned:
        query = text.feats[None]  # (1, Nt, Lq, D)
        context = image.feats[:, None]  # (Ni, 1, Lc, D)
        logits = self.smooth * query @ context.transpose(-1, -2)  # (Ni, Nt, Lq, Lc)
        logits = logits.masked_fill(~image.mask[:, None, None, :], float("-inf"))
        return Aligned(query, logits.softmax(-1), context, text.mask[None], "text")


@attrs.frozen(kw_only=True)
class GlobalToWords(Stage):
    """The image's pooled vector against the caption's words and pooled vector: <v, mean_t w_t> + <v, t>."""

    name = "testkit.global_to_words"
    kind = "similarity"
    paper = "none (a test stage)"

    def ports(self, text: LocalPort, image_global: GlobalPort, text_global: GlobalPort) -> ScorePort:
        return ScorePort()

    def build(self, **inputs) -> nn.Module:
        return GlobalToWordsModule()

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict) -> int:
        return 4 * text_len * ports["text"].dim  # one word vector per pair: sized by the wired width


class GlobalToWordsModule(nn.Module):
    def forward(self, text: Local, image_global: torch.Tensor, text_global: torch.Tensor) -> torch.Tensor:
        words = (text.feats * text.mask[..., None]).sum(1) / text.mask.sum(1, keepdim=True)
        return image_global @ words.T + image_global @ text_global.T


@pytest.fixture
def registry(monkeypatch):
    """The built-ins plus the test stages above (entry-point plugins left out)."""
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", "")
    module = types.ModuleType("testkit")
    module.register_stages = hookimpl(lambda: [Dot, Attend, GlobalToWords])
    return load_registry([module])


def random_batch(n: int, seed: int = 0) -> tuple[Regions, Tokens, torch.Tensor]:
    """n captions with their images: region features, token ids, image ids (two captions per image)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(n, R, F, generator=g)
    region_lengths = torch.randint(3, R + 1, (n,), generator=g)
    lengths = torch.randint(2, 9, (n,), generator=g)
    ids = torch.randint(1, V, (n, int(lengths.max())), generator=g)
    ids = ids * (torch.arange(ids.shape[1])[None] < lengths[:, None])
    return Regions(feats, region_lengths), Tokens(ids, lengths), torch.arange(n) // 2


def gru_params(input_size: int, hidden: int, directions: int = 1) -> int:
    """nn.GRU parameters of one layer: W_ih (3H x I), W_hh (3H x H), b_ih and b_hh (3H each)."""
    return directions * 3 * hidden * (input_size + hidden + 2)


# ------------------------------------------------------------------------------- stage tree


def test_vsepp_stage_tree_rows_and_parameter_counts():
    raw = tomllib.loads(VSEPP_PATH.read_text())
    recipe = load_recipe(VSEPP_PATH)
    d = raw["recipe"]["embed_dim"]
    w = raw["text"]["encoder"].get("word_dim", 300)
    directions = 2 if raw["text"]["encoder"].get("bidirectional", True) else 1
    model = build_model(recipe, DATA)
    rows = stage_tree(model)
    assert [(r["path"], r["stage"]) for r in rows] == [
        ("image.encoder", "core.precomp"),
        ("image.pool", "core.mean"),
        ("text.encoder", "core.bigru"),
        ("text.pool", "core.last"),
        ("match[0].similarity", "core.cosine"),
        ("loss", "core.triplet"),
    ]
    assert [(r["consumes"], r["produces"]) for r in rows] == [
        (f"x: Regions[{F}]", f"Local[{d}]"),
        (f"x: Local[{d}]", f"Global[{d}]"),
        (f"x: Tokens[{V}]", f"Local[{d}]"),
        (f"x: Local[{d}]", f"Global[{d}]"),
        (f"image: Global[{d}], text: Global[{d}]", "Score[1]"),
        ("x: Score[1]", "Loss[1]"),
    ]
    expected = [F * d + d, 0, V * w + gru_params(w, d, directions), 0, 0, 0]
    assert [r["params"] for r in rows] == expected
    assert sum(expected) == count_parameters(model)


def test_parameter_counts_of_a_two_layer_bigru():
    recipe = parse_recipe(SMALL, overrides=["text.encoder.num_layers=2", "recipe.embed_dim=20"])
    rows = {r["path"]: r["params"] for r in stage_tree(build_model(recipe, DATA))}
    # layer 2 reads both directions of layer 1 (2H); the directions are averaged only at the end
    assert rows["text.encoder"] == V * 16 + gru_params(16, 20, 2) + gru_params(2 * 20, 20, 2)
    assert rows["image.encoder"] == F * 20 + 20


def test_stage_tree_of_a_cross_attention_branch(registry):
    text = SCAN_LIKE.replace('pool = { stage = "core.mean" }\n', "")  # SCAN has no pools
    model = build_model(parse_recipe(text, registry=registry), DATA)
    rows = {r["path"]: (r["stage"], r["consumes"], r["produces"]) for r in stage_tree(model)}
    assert rows["match[0].cross"] == ("testkit.attend", "image: Local[32], text: Local[32]", "Aligned[32]")
    assert rows["match[0].similarity"] == ("core.cosine", "x: Aligned[32]", "PairSims[1]")
    assert rows["match[0].aggregate"] == ("core.mean", "x: PairSims[1]", "Score[1]")
    assert list(rows) == ["image.encoder", "text.encoder", "match[0].cross", "match[0].similarity",
                          "match[0].aggregate", "loss"]


# ---------------------------------------------------------------------------------- wiring


def test_wiring_records_where_each_input_comes_from(registry):
    text = SMALL + '\n[[match]]\nsimilarity = { stage = "testkit.dot" }\nweight = 0.5\n'
    wiring = wire(parse_recipe(text, registry=registry), DATA)
    assert wiring.image_global and wiring.text_global
    assert wiring.image[0].sources == {"x": "the image data"}
    assert wiring.image[1].sources == {"x": "image.encoder (core.precomp)"}
    assert [w.sources for w in wiring.branches[1]] == [{"image": "[image] pool", "text": "[text] pool"}]
    assert wiring.loss.sources == {"x": "the summed branch scores"}
    assert [w.slot.path for w in wiring.all()] == [
        "image.encoder", "image.pool", "text.encoder", "text.pool",
        "match[0].similarity", "match[1].similarity", "loss",
    ]


def test_a_stage_reads_a_towers_fragments_and_its_pooled_vectors(registry):
    text = SMALL.replace('similarity = { stage = "core.cosine" }', 'similarity = { stage = "testkit.global_to_words" }')
    model = build_model(parse_recipe(text, registry=registry), DATA)
    assert model.wiring.branches[0][0].sources == {"text": "[text] fragments", "image_global": "[image] pool",
                                                   "text_global": "[text] pool"}
    assert model.reads("image") == (False, True) and model.reads("text") == (True, True)
    images, texts, _ = random_batch(3)
    image, caption = model.encode_images(images), model.encode_texts(texts)
    words = (caption.local.feats * caption.local.mask[..., None]).sum(1) / caption.local.lengths[:, None]
    expected = image.global_ @ words.T + image.global_ @ caption.global_.T
    torch.testing.assert_close(model.score(image, caption), expected, rtol=0, atol=1e-6)


def test_image_global_needs_a_pool(registry):
    text = SMALL.replace('similarity = { stage = "testkit.global_to_words" }', "").replace(
        'similarity = { stage = "core.cosine" }', 'similarity = { stage = "testkit.global_to_words" }').replace(
        '[image]\nencoder = { stage = "core.precomp" }\npool = { stage = "core.mean" }',
        '[image]\nencoder = { stage = "core.precomp" }')
    with pytest.raises(RecipeError, match="image_global.*expects GlobalPort, but nothing is available"):
        wire(parse_recipe(text, registry=registry), DATA)


def test_a_branch_must_end_in_a_score(registry):
    text = SMALL.replace('similarity = { stage = "core.cosine" }',
                         'cross = { stage = "testkit.attend" }\nsimilarity = { stage = "core.cosine" }')
    with pytest.raises(RecipeError) as info:
        wire(parse_recipe(text, registry=registry), DATA)
    (problem,) = info.value.problems
    assert problem.path == "match[0]"
    assert "must end in a score" in problem.message and "PairSims[1]" in problem.message
    assert "add an `aggregate` stage" in problem.message


def test_every_wiring_problem_is_reported(registry):
    text = SMALL.replace('[image]\nencoder = { stage = "core.precomp" }',
                         '[image]\nencoder = { stage = "core.precomp", embed_dim = 16 }')
    text += '\n[[match]]\nsimilarity = { stage = "testkit.dot" }\n'
    text += '\n[[match]]\ncross = { stage = "testkit.attend" }\nsimilarity = { stage = "core.cosine" }\n'
    with pytest.raises(RecipeError) as info:
        wire(parse_recipe(text, "r.toml", registry=registry), DATA)
    by_path = {p.path: p.message for p in info.value.problems}
    assert set(by_path) == {"match[0].similarity", "match[1].similarity", "match[2]"}
    assert "image global dim 16 differs from text global dim 32" in by_path["match[0].similarity"]
    assert "dims 16 and 32 differ" in by_path["match[1].similarity"]
    assert str(info.value).startswith("r.toml: 3 problems")


def test_a_pool_on_one_side_only_is_a_port_mismatch():
    text = SMALL.replace('pool = { stage = "core.mean" }\n\n[[match]]', '\n[[match]]')
    with pytest.raises(RecipeError) as info:
        build_model(parse_recipe(text), DATA)
    (problem,) = info.value.problems
    assert problem.path == "match[0].similarity" and "port mismatch" in problem.message


# ------------------------------------------------------------------------------ the model


def test_two_branches_sum_with_their_weights(registry):
    text = SMALL + '\n[[match]]\nsimilarity = { stage = "testkit.dot", scale = 3.0 }\nweight = 0.5\n'
    model = build_model(parse_recipe(text, registry=registry), DATA, seed=0).eval()
    assert [b.weight for b in model.branches] == [1.0, 0.5]
    images, texts, _ = random_batch(6)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
        s1 = model.branches[0](img, txt)
        s2 = model.branches[1](img, txt)
        scores = model.score(img, txt)
    assert scores.shape == (6, 6)
    assert torch.equal(scores, 1.0 * s1 + 0.5 * s2)
    # and each branch is the head it names, on the pooled vectors
    torch.testing.assert_close(s1, l2norm(img.global_) @ l2norm(txt.global_).T)
    torch.testing.assert_close(s2, 3.0 * img.global_ @ txt.global_.T)
    assert not torch.allclose(s1, s2)


def test_cross_attention_branch_scores_every_pair(registry):
    model = build_model(parse_recipe(SCAN_LIKE, registry=registry), DATA, seed=0).eval()
    images, texts, _ = random_batch(5, seed=1)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
        scores = model.score(img, txt)
    expected = torch.empty(5, 5)
    for i in range(5):
        regions = img.local.feats[i, : int(images.lengths[i])]
        for t in range(5):
            words = txt.local.feats[t, : int(texts.lengths[t])]
            attended = (4.0 * words @ regions.T).softmax(-1) @ regions
            expected[i, t] = torch.cosine_similarity(words, attended, dim=-1).mean()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_forward_gives_a_finite_loss_and_gradients():
    model = build_model(parse_recipe(SMALL), DATA, seed=0)
    images, texts, image_ids = random_batch(8)
    loss, scores = model(images, texts, image_ids)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    assert scores.shape == (8, 8)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_forward_passes_the_epoch_to_the_loss():
    """Warm-up: the summed hinge before warmup_epochs, the hardest negative after (never larger)."""
    model = build_model(parse_recipe(SMALL, overrides=["loss.warmup_epochs=1"]), DATA, seed=0)
    images, texts, image_ids = random_batch(8)
    with torch.no_grad():
        summed, _ = model(images, texts, image_ids, epoch=0)
        hardest, _ = model(images, texts, image_ids, epoch=1)
    assert hardest < summed


def test_pair_bytes_sums_over_every_stage_of_every_branch(registry):
    vsepp = build_model(load_recipe(VSEPP_PATH), DATA)
    assert vsepp.pair_bytes(12, 36) == 64  # one core.cosine, the Stage default
    text = SCAN_LIKE + '\n[[match]]\nsimilarity = { stage = "testkit.dot" }\nweight = 0.5\n'
    model = build_model(parse_recipe(text, registry=registry), DATA)
    assert model.pair_bytes(12, 36) == (4 * 12 * 36 + 64 + 64) + 8 * 12
    assert model.pair_bytes(3, 5) == (4 * 3 * 5 + 64 + 64) + 8 * 3


def test_pair_bytes_may_read_the_wired_ports(registry):
    text = SMALL.replace('similarity = { stage = "core.cosine" }', 'similarity = { stage = "testkit.global_to_words" }')
    assert build_model(parse_recipe(text, registry=registry), DATA).pair_bytes(12, 36) == 4 * 12 * 32
    wide = text.replace("embed_dim = 32", "embed_dim = 48")
    assert build_model(parse_recipe(wide, registry=registry), DATA).pair_bytes(12, 36) == 4 * 12 * 48


def test_build_is_deterministic_with_a_seed():
    recipe = parse_recipe(SMALL)
    a = build_model(recipe, DATA, seed=7).state_dict()
    b = build_model(recipe, DATA, seed=7).state_dict()
    c = build_model(recipe, DATA, seed=8).state_dict()
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_model_is_sized_from_the_data_ports():
    model = build_model(parse_recipe(SMALL), DataPorts(feature_dim=10, vocab_size=13))
    assert isinstance(model, ITMModel)
    assert model.image.encoder.fc.in_features == 10
    assert model.text.encoder.embed.num_embeddings == 13
    assert model.data_ports == DataPorts(10, 13)
