"""GPO's stages against slow references of the official algorithm; its augmentations; its recipes."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.data.vocab import Vocabulary
from itmkit.datasets import data_ports
from itmkit.plugins import get_registry
from itmkit.recipe import RecipeError, load_recipe, parse_recipe
from itmkit.testing import CHECKS, check_stage, recipe_plugins
from itmkit.types import Local, LocalPort, Regions, RegionsPort, Tokens, TokensPort, lengths_to_mask
from itmkit_bert.stages import TINY
from itmkit_gpo.stages import (
    AugmentedGRUTextEncoder,
    Bert,
    BiGRU,
    Pool,
    Precomp,
    augment_tokens,
    drop_regions,
    positional_encoding,
)
from itmkit_gpo.tests import official

STAGES = [Pool, Precomp, BiGRU, Bert]
ROOT = Path(__file__).parents[3]
# this paper's recipes; the cross-paper ones (scan_gpo.toml, ...) are tests/test_cross_paper_recipes.py's
RECIPES = [p for p in sorted((ROOT / "recipes").glob("gpo_*.toml"))
           if recipe_plugins(p) <= {"gpo", "bert"}]
TOL = dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


def test_the_importer_is_registered():
    from itmkit_gpo.importer import convert

    assert get_registry().importers["gpo"] is convert


# ===================================================================================== GPO


def padded_sets(seed: int, lengths: list[int], dim: int = 16, width: int | None = None, garbage: float = 1e4) -> Local:
    """Random sets of the given sizes, padded to ``width`` with huge garbage (NaN in one slot)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    lengths_t = torch.tensor(lengths)
    mask = lengths_to_mask(lengths_t, width)
    feats = torch.randn(len(lengths), width, dim, generator=g)
    feats = torch.where(mask[..., None], feats, torch.randn(feats.shape, generator=g) * garbage)
    if not mask.all():
        feats[~mask] = feats[~mask].index_fill(0, torch.tensor([0]), float("nan"))
    return Local(feats, mask)


def built_pool(seed: int = 0, **params) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Pool(**params).build(x=LocalPort(16)).eval()


def official_state(pool: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"gpool.{k}": v for k, v in pool.state_dict().items()}


LENGTHS = {"varied": [7, 3, 1, 5, 7, 2], "one size": [4, 4, 4], "singletons": [1, 1], "long": [36, 29, 33, 12]}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_gpo_equals_the_per_set_loop(lengths):
    pool = built_pool(seed=len(lengths), normalize=False)
    x = padded_sets(seed=len(lengths), lengths=lengths)
    with torch.no_grad():
        ours = pool(x)
    lengths_t = torch.tensor(lengths)
    loop = official.gpo_loop(official_state(pool), x.feats, lengths_t)
    torch.testing.assert_close(ours, loop, **TOL)
    clean = torch.where(x.mask[..., None], x.feats, 0.0)  # the official batched form needs finite padding
    torch.testing.assert_close(ours, official.gpo_batched(official_state(pool), clean, lengths_t), **TOL)


def test_gpo_normalises_the_pooled_vector_like_the_official_encoders():
    pool = built_pool(normalize=True)
    x = padded_sets(seed=3, lengths=[5, 2, 4])
    with torch.no_grad():
        ours = pool(x)
    expected = official.l2norm(official.gpo_loop(official_state(pool), x.feats, torch.tensor([5, 2, 4])))
    torch.testing.assert_close(ours, expected, **TOL)


def test_padding_and_width_never_change_the_pooled_vector():
    pool = built_pool()
    x = padded_sets(seed=5, lengths=[6, 2, 4, 1])
    wider = Local(torch.cat([x.feats, torch.full((4, 5, 16), -3e4)], 1), torch.cat([x.mask, torch.zeros(4, 5, dtype=torch.bool)], 1))
    with torch.no_grad():
        first, second = pool(x), pool(wider)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)


def test_the_weights_depend_on_the_set_size_only_and_sum_to_one():
    pool = built_pool(temperature=0.5)
    with torch.no_grad():
        weights = pool.pool_weights(torch.tensor([1, 3, 3, 6]))
    assert weights.shape == (4, 6)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    torch.testing.assert_close(weights[1], weights[2])
    assert (weights[0, 1:] == 0).all() and weights[0, 0] == 1 and (weights[1, 3:] == 0).all()


def test_a_lower_temperature_sharpens_the_weights():
    sharp, soft = built_pool(seed=1, temperature=0.1), built_pool(seed=1, temperature=10.0)
    with torch.no_grad():
        assert sharp.pool_weights(torch.tensor([8])).max() > soft.pool_weights(torch.tensor([8])).max()


def test_an_empty_set_pools_to_zero():
    pool = built_pool()
    x = Local(torch.randn(2, 3, 16), torch.tensor([[True, True, False], [False, False, False]]))
    with torch.no_grad():
        out = pool(x)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_positional_encoding_is_the_transformer_sinusoid():
    torch.testing.assert_close(positional_encoding(12, 32), official.sinusoid(12, 32), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        positional_encoding(3, 5)


def test_an_odd_encoding_size_is_a_recipe_error():
    with pytest.raises(RecipeError, match="d_pe must be even"):
        parse_recipe(RECIPE_HEAD + '[image]\nencoder = { stage = "gpo.precomp" }\npool = { stage = "gpo.pool", d_pe = 31 }\n'
                     + TEXT + RECIPE_TAIL)


# ============================================================================ image encoder


def built_image_encoder(drop_prob: float = 0.2, in_dim: int = 12, embed: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    encoder = Precomp(embed_dim=embed, drop_prob=drop_prob).build(x=RegionsPort(in_dim))
    with torch.no_grad():  # running statistics that differ from the defaults, as a trained model has
        bn = encoder.mlp[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return encoder


def official_image_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = encoder.state_dict()
    out = {"fc.weight": sd["fc.weight"], "fc.bias": sd["fc.bias"], "mlp.layers.0.weight": sd["mlp.0.weight"],
           "mlp.layers.0.bias": sd["mlp.0.bias"], "mlp.layers.1.weight": sd["mlp.3.weight"], "mlp.layers.1.bias": sd["mlp.3.bias"]}
    out.update({f"mlp.bns.0.{k}": sd[f"mlp.1.{k}"] for k in ("weight", "bias", "running_mean", "running_var")})
    return out


def regions(seed: int, n: int = 5, r: int = 9, f: int = 12, lengths: list[int] | None = None) -> Regions:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths) if lengths else torch.full((n,), r)
    feats = torch.rand(n, r, f, generator=g)
    return Regions(torch.where(lengths_to_mask(lens, r)[..., None], feats, torch.randn(feats.shape, generator=g) * 50), lens)


def test_image_encoder_and_pool_equal_the_official_eval_forward():
    encoder, pool = built_image_encoder(), built_pool(seed=2)
    x = regions(seed=1)
    with torch.no_grad():
        ours = pool(encoder.eval()(x))
    state = {**official_image_state(encoder), **official_state(pool)}
    torch.testing.assert_close(ours, official.encode_images(state, x.feats, x.lengths), **TOL)


def test_training_mode_batchnorm_sees_the_zero_padded_rows_as_the_official_loader_pads():
    encoder = built_image_encoder(drop_prob=0.0).train()
    x = regions(seed=2, lengths=[9, 4, 6, 2, 7])
    out = encoder(x)
    sets = [x.feats[i, : int(n)] for i, n in enumerate(x.lengths)]
    expected = official.region_features_training(official_image_state(encoder), sets)
    assert out.feats.shape[1] == 9
    torch.testing.assert_close(out.feats[out.mask], expected[out.mask], **TOL)


def test_size_augmentation_drops_regions_at_the_official_rate():
    torch.manual_seed(0)
    mask = torch.ones(400, 36, dtype=torch.bool)
    feats = torch.arange(36.0).expand(400, 36)[..., None]
    kept, new_mask, _ = drop_regions(feats, mask, 0.2)
    dropped = 1 - new_mask.float().mean().item()
    assert abs(dropped - 0.2) < 0.01  # 14400 regions: 3 standard deviations are 0.01
    # the kept regions are the originals, in their order, moved to the front
    for i in range(0, 400, 37):
        values = kept[i, new_mask[i], 0]
        assert (values[1:] > values[:-1]).all() and set(values.tolist()) <= set(range(36))


def test_size_augmentation_respects_padding_and_never_empties_an_image():
    torch.manual_seed(1)
    mask = lengths_to_mask(torch.tensor([3, 1, 2] * 200), 5)
    feats = torch.where(mask[..., None], torch.ones(600, 5, 1), -1.0)
    kept, new_mask, _ = drop_regions(feats, mask, 0.9)
    assert (new_mask.sum(1) >= 1).all() and (new_mask.sum(1) <= mask.sum(1)).all()
    assert (kept[new_mask] == 1).all()  # only valid regions survive


def test_size_augmentation_is_reproducible_from_the_seed_and_off_in_eval_mode():
    encoder = built_image_encoder(drop_prob=0.5)
    x = regions(seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = encoder.train()(x)
        runs.append((out.feats.detach(), out.mask))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1].sum() < x.mask.sum()  # something was dropped
    with torch.no_grad():
        undropped = copy.deepcopy(encoder)
        undropped.drop_prob = 0.0
        a, b = encoder.eval()(x), undropped.eval()(x)
    assert torch.equal(a.mask, x.mask)
    torch.testing.assert_close(a.feats, b.feats, rtol=0, atol=0)


def test_training_with_size_augmentation_equals_the_reference_on_the_kept_regions():
    encoder = built_image_encoder(drop_prob=0.3)
    x = regions(seed=4, lengths=[9, 9, 5, 9, 3])
    torch.manual_seed(11)
    out = encoder.train()(x)
    torch.manual_seed(11)
    kept, mask, _ = drop_regions(x.feats, x.mask, 0.3)
    sets = [kept[i, mask[i]] for i in range(5)]
    expected = official.region_features_training(official_image_state(encoder), sets)
    assert out.feats.shape[1] == max(len(s) for s in sets)
    torch.testing.assert_close(out.feats[out.mask], expected[out.mask], **TOL)


# ===================================================================== caption augmentation


def test_token_augmentation_has_the_official_probabilities():
    torch.manual_seed(0)
    ids = torch.full((4000, 50), 7)
    lengths = torch.full((4000,), 50)
    out, new_lengths = augment_tokens(ids, lengths, prob=0.2, mask_share=0.5, replace_share=0.1, mask_id=3,
                                      vocab_size=100_000)
    total = ids.numel()
    valid = lengths_to_mask(new_lengths, out.shape[1])
    masked = (out[valid] == 3).sum().item() / total
    replaced = ((out[valid] != 3) & (out[valid] != 7)).sum().item() / total
    deleted = 1 - new_lengths.sum().item() / total
    # 200k tokens: 3 standard deviations are below 0.002 for each share
    assert abs(masked - 0.2 * 0.5) < 0.002
    assert abs(replaced - 0.2 * 0.1) < 0.002
    assert abs(deleted - 0.2 * 0.4) < 0.002
    assert (out[~valid] == 0).all()


def test_token_augmentation_touches_start_and_end_like_the_bigru_branch():
    torch.manual_seed(1)
    ids = torch.tensor([[1, 9, 9, 9, 2]]).repeat(2000, 1)
    out, lengths = augment_tokens(ids, torch.full((2000,), 5), prob=0.2, mask_share=1.0, replace_share=0.0,
                                  mask_id=3, vocab_size=20)
    assert abs((out[:, 0] == 3).float().mean().item() - 0.2) < 0.03
    assert abs((out[torch.arange(2000), lengths - 1] == 3).float().mean().item() - 0.2) < 0.03


def test_token_augmentation_is_reproducible_and_keeps_every_caption_non_empty():
    ids, lengths = torch.randint(4, 30, (300, 4)), torch.randint(1, 5, (300,))
    ids = ids.masked_fill(~lengths_to_mask(lengths, 4), 0)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(augment_tokens(ids, lengths, prob=0.95, mask_share=0.0, replace_share=0.0, mask_id=3, vocab_size=30))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert (runs[0][1] >= 1).all()
    untouched = runs[0][1] == lengths  # everything would have been deleted: the caption is kept as it was
    assert untouched.any()


def test_word_augmentation_treats_the_pieces_of_a_word_alike_and_spares_cls_and_sep():
    torch.manual_seed(2)
    # [CLS]=2, words of three pieces: 10 ##11 ##12, [SEP]=3; continuation marks ids 11 and 12
    continuation = torch.zeros(40, dtype=torch.bool)
    continuation[[11, 12]] = True
    ids = torch.tensor([[2] + [10, 11, 12] * 4 + [3]]).repeat(3000, 1)
    out, lengths = augment_tokens(ids, torch.full((3000,), 14), prob=0.3, mask_share=0.5, replace_share=0.1,
                                  mask_id=4, vocab_size=1000, continuation=continuation, protect_ends=True)
    assert (out[:, 0] == 2).all() and (out[torch.arange(3000), lengths - 1] == 3).all()
    assert ((lengths - 2) % 3 == 0).all()  # whole words deleted
    for row, n in zip(out[:200], lengths[:200]):
        words = row[1 : n - 1].view(-1, 3)
        is_mask = words == 4
        assert (is_mask.all(1) | ~is_mask.any(1)).all()  # a word is masked entirely or not at all
    deleted = 1 - (lengths - 2).float().mean().item() / 12
    assert abs(deleted - 0.3 * 0.4) < 0.01


def gru_encoder(mask_id: int | None = 29, seed: int = 0, **params) -> AugmentedGRUTextEncoder:
    torch.manual_seed(seed)
    return BiGRU(embed_dim=16, word_dim=8, **params).build(x=TokensPort(30, mask_id))


def test_the_text_encoder_trains_on_augmented_captions_and_evaluates_on_the_originals():
    encoder = gru_encoder()
    ids = torch.randint(4, 29, (6, 9))
    tokens = Tokens(ids, torch.full((6,), 9))
    torch.manual_seed(5)
    trained = encoder.train()(tokens)
    torch.manual_seed(5)
    new_ids, new_lengths = augment_tokens(ids, tokens.lengths, prob=0.2, mask_share=0.5, replace_share=0.1,
                                          mask_id=29, vocab_size=30)
    plain = gru_encoder(augment_prob=0.0).train()
    torch.testing.assert_close(trained.feats, plain(Tokens(new_ids, new_lengths)).feats)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(tokens).feats, plain.eval()(tokens).feats, rtol=0, atol=0)


def test_augmentation_without_a_mask_token_is_a_clear_error():
    encoder = gru_encoder(mask_id=None).train()
    with pytest.raises(RuntimeError, match="lacks.*augment_prob = 0"):
        encoder(Tokens(torch.randint(4, 29, (2, 3)), torch.tensor([3, 2])))
    gru_encoder(mask_id=None, augment_prob=0.0).train()(Tokens(torch.randint(4, 29, (2, 3)), torch.tensor([3, 2])))


def test_shares_above_one_are_a_recipe_error():
    with pytest.raises(RecipeError, match="mask_share \\+ replace_share must be at most 1"):
        parse_recipe(RECIPE_HEAD + IMAGE + '[text]\nencoder = { stage = "gpo.bigru", mask_share = 0.8, replace_share = 0.3 }\n'
                     'pool = { stage = "gpo.pool" }\n' + RECIPE_TAIL)


def test_the_vocabulary_gains_mask_once_and_the_data_keeps_its_own():
    words = Vocabulary([*Vocabulary.SPECIALS, "dog", "cat"])
    vocab = BiGRU().vocabulary(lambda: words)
    assert vocab.idx2word == [*words.idx2word, "<mask>"] and vocab.mask_id == 6
    assert len(words) == 6 and words.mask_id is None  # the caller's vocabulary is not changed
    assert BiGRU().vocabulary(lambda: vocab) is vocab  # already there: kept where it is
    assert BiGRU().vocabulary(lambda: None) is None
    ports = data_ports(type("Split", (), {"feature_dim": 8, "num_regions": 36})(), vocab)
    assert (ports.vocab_size, ports.mask_id) == (7, 6)


# ================================================================================= recipes

RECIPE_HEAD = '[recipe]\nname = "t"\nembed_dim = 16\n'
IMAGE = '[image]\nencoder = { stage = "gpo.precomp" }\npool = { stage = "gpo.pool" }\n'
TEXT = '[text]\nencoder = { stage = "gpo.bigru" }\npool = { stage = "gpo.pool" }\n'
RECIPE_TAIL = '[[match]]\nsimilarity = { stage = "core.cosine" }\n[loss]\nstage = "core.triplet"\n'


def tiny_bert_overrides(path: Path) -> list[str]:
    return [f"text.encoder.path={TINY}", "text.encoder.pretrained=false"] if "bert" in path.stem else []


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_gpo_recipe_builds(path):
    recipe = load_recipe(path, tiny_bert_overrides(path))
    model = build_model(recipe, DataPorts(2048 if "shapes" not in path.stem else 256, 8482, 36, mask_id=8481))
    assert model.image.pool is not None and model.text.pool is not None


@pytest.mark.parametrize("path", [p for p in RECIPES if "shapes" not in p.stem], ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_official_schedule(path):
    r = load_recipe(path, tiny_bert_overrides(path))
    t = r.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_update, t.lr_decay, t.optimizer, t.grad_clip) == (25, 128, 5e-4, 15, 0.1, "adamw", 2.0)
    assert (r.loss.spec.name, r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == ("core.triplet", 0.2, True, 1)
    assert r.info.embed_dim == 1024 and r.image.encoder.spec.drop_prob == 0.2
    text = r.text.encoder.spec
    assert (text.augment_prob, text.mask_share, text.replace_share) == (0.2, 0.5, 0.1)
    for pool in (r.image.pool.spec, r.text.pool.spec):
        assert (pool.name, pool.d_pe, pool.d_hidden, pool.temperature, pool.normalize) == ("gpo.pool", 32, 32, 0.1, True)
    if "bert" in path.stem:
        assert (text.name, text.lr_scale, t.weight_decay) == ("gpo.bert", 0.1, 1e-4)
    else:
        assert (text.name, text.word_dim, text.normalize, t.weight_decay) == ("gpo.bigru", 300, False, 0.01)
    coco = "coco" in path.stem
    assert (r.data.protocol, r.data.test_split) == (("coco-1k-5fold", "testall") if coco else ("f30k-1k", "test"))


ITMKIT = Path(sys.executable).with_name("itmkit")


def test_a_bert_recipe_without_its_model_directory_says_what_is_missing(tmp_path):
    result = subprocess.run([str(ITMKIT), "build", str(ROOT / "recipes" / "gpo_f30k_bert.toml"), "--data", str(tmp_path / "absent")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "models/bert-base-uncased" in result.stderr and "--set text.encoder.path=DIR" in result.stderr


def test_a_bert_recipe_builds_with_a_local_directory_from_the_command_line(tmp_path):
    from itmkit_bert.testing import write_tiny_bert

    folder = write_tiny_bert(tmp_path / "bert")
    result = subprocess.run([str(ITMKIT), "build", str(ROOT / "recipes" / "gpo_coco_bert.toml"),
                             "--set", f"text.encoder.path={folder}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gpo.bert" in result.stdout and "64 words" in result.stdout  # the tiny tokenizer's vocabulary


@pytest.mark.parametrize("path", [ROOT / "recipes" / "gpo_shapes.toml", ROOT / "recipes" / "gpo_f30k_bert.toml"],
                         ids=["bigru", "bert"])
def test_a_training_step_reaches_every_parameter(path, tmp_path):
    from itmkit.train import make_optimizer
    from itmkit_bert.testing import write_tiny_bert
    from itmkit_bert.vocab import WordPieceVocabulary

    overrides = ["recipe.embed_dim=16", "train.batch_size=6"]
    if "bert" in path.stem:
        folder = write_tiny_bert(tmp_path / "bert")
        overrides.append(f"text.encoder.path={folder}")
        vocab_size, mask_id = 64, WordPieceVocabulary.load(str(folder)).mask_id
    else:
        vocab_size, mask_id = 40, 39
    recipe = load_recipe(path, overrides)
    model = build_model(recipe, DataPorts(20, vocab_size, 36, mask_id=mask_id), seed=0).train()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 12, (6,), generator=g)
    ids = torch.randint(5, vocab_size, (6, 12), generator=g).masked_fill(~lengths_to_mask(lengths, 12), 0)
    ids[torch.arange(6), 0], ids[torch.arange(6), lengths - 1] = 2, 3  # [CLS] ... [SEP] for BERT
    regions = Regions(torch.rand(6, 36, 20, generator=g), torch.full((6,), 36))
    losses = []
    for epoch in (0, 1):  # the summed hinge, then the hardest negative
        torch.manual_seed(epoch)
        loss, scores = model(regions, Tokens(ids, lengths), torch.arange(6) // 2, epoch=epoch)
        losses.append(loss)
    assert scores.shape == (6, 6) and all(torch.isfinite(x) for x in losses) and losses[0] > losses[1]
    losses[0].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    make_optimizer(recipe, model).step()
