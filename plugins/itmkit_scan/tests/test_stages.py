"""SCAN's stages and recipes against the official per-caption computation, padding, ports, memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itmkit.attention import RAW_NORMS
from itmkit.build import DataPorts, build_model
from itmkit.core_stages import Cosine, Max, Mean
from itmkit.plugins import get_registry
from itmkit.recipe import RecipeError, parse_recipe
from itmkit.stage import PortError
from itmkit.testing import CHECKS, LargestAllocation, check_stage, recipe_plugins
from itmkit.types import LocalPort, Local, PairSims, PairSimsPort, Regions, Tokens, lengths_to_mask
from itmkit_scan.stages import ImageToText, LogSumExp, Sum, TextToImage
from itmkit_scan.tests import official

STAGES = [TextToImage, ImageToText, LogSumExp, Sum]
# this paper's recipes; the cross-paper ones (scan_gpo.toml, ...) are tests/test_cross_paper_recipes.py's
RECIPES = [p for p in sorted((Path(__file__).parents[3] / "recipes").glob("scan_*.toml"))
           if recipe_plugins(p) <= {"scan"}]
TOL = dict(rtol=0, atol=1e-5)
AGGREGATES = {"LogSumExp": lambda lam: LogSumExp(lambda_lse=lam), "Mean": lambda lam: Mean(),
              "Max": lambda lam: Max(), "Sum": lambda lam: Sum()}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


def test_the_importer_is_registered():
    from itmkit_scan.importer import convert

    assert get_registry().importers["scan"] is convert


# ------------------------------------------------------------------------- random blocks


def block(seed: int, *, n_images=4, n_captions=5, regions=7, words=9, dim=16, pad_regions=False):
    """l2-normalised region and word vectors as the encoders give them, with garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    images = official.l2norm(torch.randn(n_images, regions, dim, generator=g), -1)
    image_lens = torch.randint(2, regions + 1, (n_images,), generator=g) if pad_regions else torch.full((n_images,), regions)
    image_lens[0] = regions
    cap_lens = torch.randint(1, words + 1, (n_captions,), generator=g)
    cap_lens[0] = words
    captions = official.l2norm(torch.randn(n_captions, words, dim, generator=g), -1)
    for feats, lens in ((images, image_lens), (captions, cap_lens)):
        pad = ~lengths_to_mask(lens, feats.shape[1])
        feats[pad] = torch.randn(int(pad.sum()), dim, generator=g) * 5
    image = Local(images, lengths_to_mask(image_lens, regions))
    text = Local(captions, lengths_to_mask(cap_lens, words))
    return image, text, image_lens, cap_lens


def branch_scores(image: Local, text: Local, *, cross_attn, agg_func, lambda_softmax, lambda_lse=6.0,
                  raw_norm="clipped_l2norm") -> torch.Tensor:
    """Our stages, built from their specs and chained the way a [[match]] branch chains them."""
    spec = (TextToImage if cross_attn == "t2i" else ImageToText)(lambda_softmax=lambda_softmax, raw_feature_norm=raw_norm)
    cross = spec.build(image=LocalPort(image.feats.shape[-1]), text=LocalPort(text.feats.shape[-1]))
    cosine = Cosine().build(x=None)
    pool = AGGREGATES[agg_func](lambda_lse).build(x=PairSimsPort(1))
    return pool(x=cosine(x=cross(image=image, text=text)))


# ------------------------------------------------------------- stages against the reference


@pytest.mark.parametrize("agg_func", ["LogSumExp", "Mean", "Max", "Sum"])
@pytest.mark.parametrize("cross_attn, lambda_softmax, lambda_lse", [("t2i", 9.0, 6.0), ("i2t", 4.0, 20.0)])
def test_branch_equals_the_official_per_caption_loop(cross_attn, lambda_softmax, lambda_lse, agg_func):
    image, text, _, cap_lens = block(seed=len(agg_func) + (cross_attn == "i2t"))
    ours = branch_scores(image, text, cross_attn=cross_attn, agg_func=agg_func, lambda_softmax=lambda_softmax,
                         lambda_lse=lambda_lse)
    expected = official.xattn_scores(image.feats, text.feats, cap_lens, cross_attn=cross_attn, agg_func=agg_func,
                                     lambda_softmax=lambda_softmax, lambda_lse=lambda_lse)
    assert ours.shape == expected.shape == (4, 5)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("raw_norm", RAW_NORMS)
@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_every_raw_feature_norm_equals_the_reference(cross_attn, raw_norm):
    image, text, _, cap_lens = block(seed=len(raw_norm))
    ours = branch_scores(image, text, cross_attn=cross_attn, agg_func="LogSumExp", lambda_softmax=9.0, raw_norm=raw_norm)
    expected = official.xattn_scores(image.feats, text.feats, cap_lens, cross_attn=cross_attn, agg_func="LogSumExp",
                                     lambda_softmax=9.0, raw_norm=raw_norm)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_images_with_fewer_regions_equal_slicing_each_image(cross_attn):
    # Not a case of the official code (36 regions everywhere), but of any detector with a threshold.
    image, text, image_lens, cap_lens = block(seed=3, pad_regions=True)
    assert (image_lens < image.feats.shape[1]).any()
    ours = branch_scores(image, text, cross_attn=cross_attn, agg_func="Mean", lambda_softmax=6.0)
    expected = official.xattn_scores(image.feats, text.feats, cap_lens, cross_attn=cross_attn, agg_func="Mean",
                                     lambda_softmax=6.0, image_lens=image_lens)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("agg_func", ["LogSumExp", "Sum", "Mean", "Max"])
@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_padding_never_changes_a_score(cross_attn, agg_func):
    image, text, _, _ = block(seed=11, pad_regions=True)
    first = branch_scores(image, text, cross_attn=cross_attn, agg_func=agg_func, lambda_softmax=9.0)
    g = torch.Generator().manual_seed(99)
    noisy = [Local(torch.where(x.mask[..., None], x.feats, torch.randn(x.feats.shape, generator=g) * 100), x.mask)
             for x in (image, text)]
    second = branch_scores(*noisy, cross_attn=cross_attn, agg_func=agg_func, lambda_softmax=9.0)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    # and a wider padding (a longer caption elsewhere in the batch) changes nothing either
    wider = [Local(torch.cat([x.feats, torch.randn(x.feats.shape[0], 3, x.feats.shape[2], generator=g)], 1),
                   torch.cat([x.mask, torch.zeros(x.mask.shape[0], 3, dtype=torch.bool)], 1)) for x in (image, text)]
    third = branch_scores(*wider, cross_attn=cross_attn, agg_func=agg_func, lambda_softmax=9.0)
    torch.testing.assert_close(first, third, rtol=0, atol=1e-6)


def test_the_official_float64_loop_and_our_float32_blocks_agree_at_scale():
    image, text, _, cap_lens = block(seed=5, n_images=6, n_captions=8, regions=36, words=20, dim=64)
    ours = branch_scores(image, text, cross_attn="t2i", agg_func="LogSumExp", lambda_softmax=9.0)
    expected = official.xattn_scores(image.feats.double(), text.feats.double(), cap_lens, cross_attn="t2i",
                                     agg_func="LogSumExp", lambda_softmax=9.0)
    torch.testing.assert_close(ours.double(), expected, **TOL)


# ---------------------------------------------------------------------------- aggregators


def sims(values: list[list[float]], lengths: list[int]) -> PairSims:
    x = torch.tensor(values, dtype=torch.float64)[None, :, :, None]  # (1, Nt, N, 1)
    return PairSims(x, lengths_to_mask(torch.tensor(lengths), x.shape[2])[None])


def test_lse_is_the_naive_log_sum_exp_over_valid_fragments():
    pool = LogSumExp(lambda_lse=5.0).build(x=PairSimsPort(1))
    out = pool(sims([[0.2, -0.4, 0.9], [0.5, 7.0, 7.0]], [3, 1]))
    expected = [torch.log(torch.exp(5 * torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64)).sum()) / 5, 0.5]
    torch.testing.assert_close(out[0], torch.stack([expected[0], torch.tensor(0.5, dtype=torch.float64)]))


def test_lse_lies_between_the_max_and_the_max_plus_log_n_over_lambda():
    x = sims([[0.1, 0.8, 0.3, -0.2]], [4])
    for lam in (1.0, 6.0, 20.0, 80.0):
        s = float(LogSumExp(lambda_lse=lam).build(x=PairSimsPort(1))(x))
        assert 0.8 <= s <= 0.8 + torch.log(torch.tensor(4.0)).item() / lam + 1e-12
        assert s == pytest.approx(float(torch.logsumexp(lam * x.sims[0, 0, :, 0], 0)) / lam, abs=1e-12)


def test_lse_at_the_largest_lambda_stays_finite_in_float32():
    x = PairSims(torch.ones(2, 3, 40, 1), torch.ones(2, 3, 40, dtype=torch.bool))  # every cosine at its maximum
    out = LogSumExp(lambda_lse=80.0).build(x=PairSimsPort(1))(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((2, 3), 1 + torch.log(torch.tensor(40.0)).item() / 80))


def test_sum_adds_the_valid_fragments():
    out = Sum().build(x=PairSimsPort(1))(sims([[0.2, -0.4, 0.9], [0.5, 7.0, 7.0]], [3, 1]))
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.5]], dtype=torch.float64))


def test_a_pair_without_valid_fragments_scores_zero_with_finite_gradients():
    values = torch.randn(1, 2, 3, 1, requires_grad=True)
    x = PairSims(values, torch.tensor([[[True, False, False], [False, False, False]]]))
    for spec in (LogSumExp(), Sum()):
        out = spec.build(x=PairSimsPort(1))(x)
        assert out[0, 1] == 0
        out.sum().backward()
        assert torch.isfinite(values.grad).all() and (values.grad[0, 1] == 0).all()
        values.grad = None


# ---------------------------------------------------------------------------------- ports


def test_cross_attention_needs_equal_dims_on_both_sides():
    with pytest.raises(PortError, match="image fragments are 16-d, text fragments 8-d"):
        TextToImage().ports(image=LocalPort(16), text=LocalPort(8))
    assert ImageToText().ports(image=LocalPort(8), text=LocalPort(8)).dim == 8


def test_aggregators_take_scalar_similarities_only():
    for spec in (LogSumExp(), Sum()):
        with pytest.raises(PortError, match="scalar per-fragment similarities"):
            spec.ports(x=PairSimsPort(256))


def test_a_recipe_with_unequal_encoder_dims_names_the_cross_slot():
    text = RECIPES[0].read_text()
    with pytest.raises(RecipeError) as failure:
        build_model(parse_recipe(text, overrides=["text.encoder.embed_dim=32", "recipe.embed_dim=16"]),
                    DataPorts(feature_dim=12, vocab_size=30))
    message = str(failure.value)
    assert "@ match[0].cross" in message and "16-d" in message and "32-d" in message


def test_recipe_parameters_are_validated():
    with pytest.raises(RecipeError, match=r"one of .*'clipped_l2norm'.* @ match\[0\]\.cross\.raw_feature_norm"):
        parse_recipe(RECIPES[0].read_text(), overrides=["match[0].cross.raw_feature_norm=clipped_l3norm"])
    with pytest.raises(RecipeError, match=r"match\[0\]\.aggregate\.lambda_lse"):
        parse_recipe((Path(RECIPES[0]).parent / "scan_f30k_t2i_lse.toml").read_text(),
                     overrides=["match[0].aggregate.lambda_lse=-1"])


# ------------------------------------------------------------------------- whole recipes


def _official_branch(match) -> dict:
    cross, aggregate = match.cross.spec, match.aggregate.spec
    agg = {"scan.lse": "LogSumExp", "core.mean": "Mean", "core.max": "Max", "scan.sum": "Sum"}[aggregate.name]
    return dict(cross_attn=cross.name.removeprefix("scan."), agg_func=agg, lambda_softmax=cross.lambda_softmax,
                lambda_lse=getattr(aggregate, "lambda_lse", 6.0), raw_norm=cross.raw_feature_norm)


def random_batch(seed: int, n_images=4, n_captions=6, regions=36, feature_dim=12, vocab=30, words=9):
    g = torch.Generator().manual_seed(seed)
    regions_in = Regions(torch.rand(n_images, regions, feature_dim, generator=g), torch.full((n_images,), regions))
    lengths = torch.randint(2, words + 1, (n_captions,), generator=g)
    lengths[0] = words
    ids = torch.randint(4, vocab, (n_captions, words), generator=g).masked_fill(~lengths_to_mask(lengths, words), 0)
    return regions_in, Tokens(ids, lengths)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_model_equals_the_official_loop_on_its_own_encodings(path):
    recipe = parse_recipe(path.read_text(), str(path), overrides=["recipe.embed_dim=16", "text.encoder.word_dim=8"])
    model = build_model(recipe, DataPorts(feature_dim=12, vocab_size=30, num_regions=36), seed=0).eval()
    regions, tokens = random_batch(seed=len(path.stem))
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        ours = model.score(image, text)
    expected = sum(match.weight * official.xattn_scores(image.local.feats, text.local.feats, tokens.lengths,
                                                        **_official_branch(match))
                   for match in recipe.match)
    assert ours.shape == (4, 6)
    torch.testing.assert_close(ours, expected, **TOL)


def test_the_ensemble_recipe_is_half_t2i_avg_plus_half_i2t_lse():
    recipe = parse_recipe((RECIPES[0].parent / "scan_f30k_ensemble.toml").read_text())
    branches = [(_official_branch(m), m.weight) for m in recipe.match]
    assert branches == [
        (dict(cross_attn="t2i", agg_func="Mean", lambda_softmax=9.0, lambda_lse=6.0, raw_norm="clipped_l2norm"), 0.5),
        (dict(cross_attn="i2t", agg_func="LogSumExp", lambda_softmax=4.0, lambda_lse=5.0, raw_norm="clipped_l2norm"), 0.5),
    ]


@pytest.mark.parametrize("name, cross, lambdas, schedule", [
    ("scan_f30k_t2i_lse", "scan.t2i", (9.0, 6.0), (30, 2e-4, 15)),
    ("scan_f30k_t2i_avg", "scan.t2i", (9.0, None), (30, 2e-4, 15)),
    ("scan_f30k_i2t_lse", "scan.i2t", (4.0, 5.0), (30, 2e-4, 15)),
    ("scan_f30k_i2t_avg", "scan.i2t", (4.0, None), (30, 2e-4, 15)),
    ("scan_coco_t2i_lse", "scan.t2i", (9.0, 6.0), (20, 5e-4, 10)),
    ("scan_coco_t2i_avg", "scan.t2i", (9.0, None), (20, 5e-4, 10)),
    ("scan_coco_i2t_lse", "scan.i2t", (4.0, 20.0), (20, 5e-4, 10)),
    ("scan_coco_i2t_avg", "scan.i2t", (4.0, None), (20, 5e-4, 10)),
])
def test_paper_recipes_carry_the_readme_arguments(name, cross, lambdas, schedule):
    r = parse_recipe((RECIPES[0].parent / f"{name}.toml").read_text())
    (match,) = r.match
    assert (match.cross.spec.name, match.cross.spec.lambda_softmax, match.cross.spec.raw_feature_norm) == (
        cross, lambdas[0], "clipped_l2norm")
    assert match.aggregate.spec.name == ("scan.lse" if lambdas[1] else "core.mean")
    assert getattr(match.aggregate.spec, "lambda_lse", None) == lambdas[1]
    assert (r.train.epochs, r.train.lr, r.train.lr_update, r.train.batch_size, r.train.grad_clip) == (*schedule, 128, 2.0)
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.info.embed_dim) == (0.2, True, 1024)
    assert (r.text.encoder.spec.word_dim, r.text.encoder.spec.bidirectional) == (300, True)
    coco = name.startswith("scan_coco")
    assert (r.data.protocol, r.data.test_split) == (("coco-1k-5fold", "testall") if coco else ("f30k-1k", "test"))


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("cls", [TextToImage, ImageToText], ids=lambda c: c.name)
def test_no_tensor_of_the_forward_pass_exceeds_the_block_working_memory(cls):
    # The dots are one GEMM of the flattened fragments: nothing of (Ni, Nt, L, D) is ever built (a
    # broadcasting matmul would copy both sides to (Ni, Nt, L, D): 3.3 GB for 128 x 128 at D = 1024).
    image, text, _, _ = block(seed=1, n_images=16, n_captions=16, regions=9, words=7, dim=256)
    spec = cls()
    module = spec.build(image=LocalPort(256), text=LocalPort(256))
    budget = 16 * 16 * spec.pair_bytes(text_len=7, image_len=9)
    with torch.no_grad(), LargestAllocation() as recorder:
        Cosine().build(x=None)(x=module(image=image, text=text))
    assert recorder.largest <= budget, f"a {recorder.largest:,}-byte tensor in a block budgeted at {budget:,} bytes"


def test_pair_bytes_grows_with_both_lengths():
    spec = TextToImage()
    assert spec.pair_bytes(text_len=12, image_len=36) == 4 * 4 * 12 * 36  # four float32 (words x regions) arrays
    assert ImageToText().pair_bytes(text_len=12, image_len=36) == spec.pair_bytes(text_len=12, image_len=36)
    assert LogSumExp().pair_bytes(text_len=12, image_len=36) >= 4 * 36
