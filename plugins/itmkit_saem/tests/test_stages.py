"""SAEM's stages against the official forward pass and losses (tests/official.py), padding, ports, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itmkit.core_stages import Pool, PrecompEncoder
from itmkit.errors import ItmkitError
from itmkit.plugins import get_registry
from itmkit.stage import PortError
from itmkit.testing import CHECKS, check_stage, recipe_plugins
from itmkit.types import Local, LocalPort, ParametersPort, Regions, Tokens, TokensPort
from itmkit_bert.testing import write_tiny_bert
from itmkit_bert.vocab import WordPieceVocabulary
from itmkit_saem.modules import LAYER_KEYS
from itmkit_saem.stages import SaemAngular, SaemBert, SaemCnn, SaemParamNorm, SaemTransformer, angular_schedule
from itmkit_saem.tests import official

STAGES = [SaemBert, SaemTransformer, SaemCnn, SaemAngular, SaemParamNorm]
TOL = dict(rtol=0, atol=1e-5)
CAPTIONS = ["a man riding a horse", "two dogs play with a red ball on the grass next to a car and a cat",
            "a cat", "the woman is wearing a blue shirt", "unbelievably, the cat-car jumps!"]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny", seed=1)


def batch(vocab: WordPieceVocabulary, captions: list[str], extra: int = 0, fill: int = 0) -> Tokens:
    """Captions as itmkit's loader batches them: [CLS] .. [SEP], padded to the longest (+ extra columns of ``fill``)."""
    encoded = [vocab.encode(c) for c in captions]
    width = max(map(len, encoded)) + extra
    ids = torch.full((len(encoded), width), fill, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e)
    return Tokens(ids, torch.tensor([len(e) for e in encoded]))


# ================================================================================ saem.bert


def test_captions_are_cut_and_padded_as_the_official_data_code(bert_dir):
    vocab = WordPieceVocabulary.load(str(bert_dir))
    encoder = SaemBert(path=str(bert_dir), max_words=8).build(x=TokensPort(len(vocab)))
    tokens = batch(vocab, CAPTIONS, extra=3, fill=7)  # junk past each caption: it must not matter
    ids, kept = encoder.fixed_ids(tokens)
    for i, caption in enumerate(CAPTIONS):
        pieces = vocab.encode(caption)[1:-1]
        ref_ids, ref_mask = official.convert_to_feature(pieces, 8, vocab.cls_id, vocab.sep_id)
        assert ids[i].tolist() == ref_ids and int(kept[i]) == sum(ref_mask), caption


def text_tower(bert_dir, max_words=8, pad_fragments=True, seed=0):
    torch.manual_seed(seed)
    bert = SaemBert(path=str(bert_dir), max_words=max_words, pad_fragments=pad_fragments).build(x=TokensPort(64))
    cnn = SaemCnn(embed_dim=6, channels=5).build(x=LocalPort(32))
    return bert.double().eval(), cnn.double().eval()


def official_text_state(bert, cnn) -> dict:
    sd = {f"bert.{k}": v for k, v in official.from_hugging_face(bert.bert.state_dict()).items()}
    c = cnn.cnn.state_dict()
    sd.update({k.replace("convs.", "convs1."): v for k, v in c.items() if k.startswith("convs.")})
    sd.update({"mapping.weight": c["fc.weight"], "mapping.bias": c["fc.bias"]})
    return sd


def test_text_tower_equals_the_official_bert_mapping(bert_dir):
    vocab = WordPieceVocabulary.load(str(bert_dir))
    bert, cnn = text_tower(bert_dir)
    ours = cnn(bert(batch(vocab, CAPTIONS)))
    features = [official.convert_to_feature(vocab.encode(c)[1:-1], 8, vocab.cls_id, vocab.sep_id) for c in CAPTIONS]
    ids = torch.tensor([f[0] for f in features])
    mask = torch.tensor([f[1] for f in features])
    ref = official.text_forward(official_text_state(bert, cnn), ids, mask, heads=2)
    torch.testing.assert_close(ours, ref, **TOL)


def test_a_caption_scores_the_same_in_any_batch(bert_dir):
    vocab = WordPieceVocabulary.load(str(bert_dir))
    for pad_fragments in (True, False):
        bert, cnn = text_tower(bert_dir, max_words=12, pad_fragments=pad_fragments)
        whole = cnn(bert(batch(vocab, CAPTIONS)))
        for rows in ([2], [0, 2], [4, 1, 3]):
            part = cnn(bert(batch(vocab, [CAPTIONS[r] for r in rows], extra=5, fill=9)))
            torch.testing.assert_close(part, whole[rows], **TOL)


def test_without_pad_fragments_only_the_caption_is_valid(bert_dir):
    vocab = WordPieceVocabulary.load(str(bert_dir))
    bert, _ = text_tower(bert_dir, max_words=8, pad_fragments=False)
    out = bert(batch(vocab, CAPTIONS))
    lengths = [min(len(vocab.encode(c)), 8) for c in CAPTIONS]
    assert out.feats.shape == (5, 8, 32) and out.mask.sum(dim=1).tolist() == lengths
    free = SaemBert(path=str(bert_dir), max_words=0).build(x=TokensPort(64)).eval()
    tokens = batch(vocab, CAPTIONS)
    assert free(tokens).feats.shape[1] == tokens.ids.shape[1] and free(tokens).mask.equal(tokens.mask)


def test_frozen_bert_keeps_its_dropout_in_training_unless_asked(bert_dir):
    on = SaemBert(path=str(bert_dir)).build(x=TokensPort(64)).train()
    off = SaemBert(path=str(bert_dir), frozen_dropout=False).build(x=TokensPort(64)).train()
    assert on.bert.training and not off.bert.training
    assert not any(p.requires_grad for p in on.parameters())


def test_bert_port_errors(bert_dir, tmp_path):
    assert SaemBert(path=str(bert_dir)).ports(x=TokensPort(64)) == LocalPort(32)
    with pytest.raises(PortError, match="exceeds the 64 positions"):
        SaemBert(path=str(bert_dir), max_words=65).ports(x=TokensPort(64))
    with pytest.raises(PortError, match="text.encoder.path"):
        SaemBert(path=str(tmp_path / "nowhere")).ports(x=TokensPort(64))


# ========================================================================= saem.transformer


def image_tower(in_dim=12, dim=16, heads=4, seed=0):
    torch.manual_seed(seed)
    encoder = PrecompEncoder(in_dim=in_dim, embed_dim=dim, normalize=False)
    reasoner = SaemTransformer(heads=heads, intermediate=24).build(x=LocalPort(dim))
    with torch.no_grad():
        for norm in (reasoner.layer.attn_norm, reasoner.layer.ffn_norm):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    return encoder.double().eval(), reasoner.double().eval(), Pool(how="mean", normalize=True)


def official_image_state(encoder, reasoner) -> dict:
    sd = {"mapping.weight": encoder.fc.weight, "mapping.bias": encoder.fc.bias}
    sd.update({f"layer.{LAYER_KEYS[k]}": v for k, v in reasoner.layer.state_dict().items()})
    return sd


def test_image_tower_equals_the_official_transformer_mapping():
    encoder, reasoner, pool = image_tower()
    feats = torch.randn(4, 36, 12, dtype=torch.float64)
    ours = pool(reasoner(encoder(Regions(feats, torch.full((4,), 36)))))
    ref = official.transformer_mapping(official_image_state(encoder, reasoner), feats, heads=4)
    torch.testing.assert_close(ours, ref, **TOL)


def test_images_with_fewer_regions_equal_the_official_on_their_own_regions():
    encoder, reasoner, pool = image_tower(seed=1)
    counts = [36, 20, 3]
    feats = torch.randn(3, 36, 12, dtype=torch.float64)
    for i, n in enumerate(counts):
        feats[i, n:] = 0  # zero-padded adaptive features
    ours = pool(reasoner(encoder(Regions(feats, torch.tensor(counts)))))
    sd = official_image_state(encoder, reasoner)
    for i, n in enumerate(counts):
        torch.testing.assert_close(ours[i:i + 1], official.transformer_mapping(sd, feats[i:i + 1, :n], heads=4), **TOL)


def test_heads_must_divide_the_fragment_dim():
    with pytest.raises(PortError, match="do not divide"):
        SaemTransformer(heads=16).ports(x=LocalPort(40))


def test_cnn_pool_reads_only_valid_fragments_and_checks_widths():
    cnn = SaemCnn(embed_dim=6, channels=5).build(x=LocalPort(8)).double().eval()
    feats = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = cnn(Local(feats, mask))
    torch.testing.assert_close(cnn(Local(feats[1:, :4], mask[1:, :4])), out[1:], **TOL)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(PortError, match="widths"):
        SaemCnn(widths=[]).ports(x=LocalPort(8))


# =============================================================================== objectives


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("epoch", [0, 4, 5, 12, 19, 20, 21, 29])
def test_angular_equals_the_official_loss_times_alpha(epoch):
    im, s = unit(6, 8, 0), unit(6, 8, 1)
    module = SaemAngular().build(image=None, text=None)
    ours = module(image=im, text=s, positives=torch.eye(6, dtype=torch.bool), epoch=epoch)
    assert angular_schedule(epoch, start=0.5, decay=0.1, every=5, last=20) == official.angular_weight(epoch)
    torch.testing.assert_close(ours, official.angular_weight(epoch) * official.angular_loss(im, s), **TOL)


def test_angular_sum_and_tan2_equal_the_official_forms():
    im, s = unit(5, 8, 2), unit(5, 8, 3)
    eye = torch.eye(5, dtype=torch.bool)
    summed = SaemAngular(max_violation=False, start=1.0).build(image=None, text=None)
    torch.testing.assert_close(summed(image=im, text=s, positives=eye), official.angular_loss_sum(im, s), **TOL)
    wide = SaemAngular(tan2=0.3, start=1.0).build(image=None, text=None)
    torch.testing.assert_close(wide(image=im, text=s, positives=eye), official.angular_loss(im, s, 0.3), **TOL)


def test_angular_keeps_other_captions_of_the_image_as_negatives_unless_masked():
    im, s = unit(4, 8, 4), unit(4, 8, 5)
    im[1] = im[0]  # captions 0 and 1 share an image
    positives = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    official_like = SaemAngular(start=1.0).build(image=None, text=None)
    torch.testing.assert_close(official_like(image=im, text=s, positives=positives), official.angular_loss(im, s), **TOL)
    masked = SaemAngular(start=1.0, mask_same_image=True).build(image=None, text=None)
    assert not torch.allclose(masked(image=im, text=s, positives=positives), official.angular_loss(im, s))
    single = official_like(image=im[:1], text=s[:1], positives=positives[:1, :1])
    assert single.item() == 0.0  # one item: no negatives, nothing to add


def test_param_norm_equals_the_official_l2_term():
    encoder, reasoner, pool = image_tower(seed=2)
    named = {f"image.encoder.{k}": p for k, p in encoder.named_parameters()}
    named.update({f"image.reasoners.0.{k}": p for k, p in reasoner.named_parameters()})
    named["text.pool.cnn.fc.weight"] = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))  # not the image's
    official_named = {k: v for k, v in official_image_state(encoder, reasoner).items()}
    module = SaemParamNorm().build(parameters=ParametersPort())
    ours = 0.01 * module(parameters=named, positives=torch.eye(2, dtype=torch.bool))
    torch.testing.assert_close(ours.double(), official.l2_reg(official_named).double(), **TOL)
    chosen = module.selected(list(named))
    assert "image.encoder.fc.weight" in chosen and "image.reasoners.0.layer.query.weight" in chosen
    assert not [n for n in chosen if n.endswith("bias") or "norm" in n or n.startswith("text.")]
    nothing = SaemParamNorm(include=["nowhere.*"]).build(parameters=ParametersPort())
    with pytest.raises(ItmkitError, match=r"selects none of the model's .* trainable parameters"):
        nothing(parameters=named, positives=torch.eye(2, dtype=torch.bool))


# ================================================================================== recipes

# SAEM's own recipes; cross-paper ones sharing the prefix (saem_gpo.toml) name other plugins' stages too.
RECIPES = [p for p in sorted((Path(__file__).parents[3] / "recipes").glob("saem_*.toml")) if recipe_plugins(p) <= {"saem"}]


def tiny_bert_overrides() -> list[str]:
    from itmkit_bert.stages import TINY

    return [f"text.encoder.path={TINY}", "text.encoder.pretrained=false"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_saem_recipe_builds(path):
    from itmkit.build import DataPorts, build_model
    from itmkit.recipe import load_recipe

    recipe = load_recipe(path, tiny_bert_overrides())
    model = build_model(recipe, DataPorts(256 if "shapes" in path.stem else 2048, 64, 36))
    assert [o.slot.spec.name for o in recipe.objectives] == ["saem.angular", "saem.param_norm"]
    assert [o.weight for o in recipe.objectives] == [1.0, 0.01]
    assert model.text.pool is not None and len(model.image.reasoners) == 1


@pytest.mark.parametrize("path", [p for p in RECIPES if "shapes" not in p.stem], ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_official_configuration(path):
    from itmkit.recipe import load_recipe

    r = load_recipe(path, tiny_bert_overrides())
    t = r.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_update, t.lr_decay, t.optimizer, t.weight_decay) == (
        30, 64, 1e-4, 10, 0.1, "adam", 0.0)
    assert t.grad_clip == 0.0  # the official clip_grad_norm gets an exhausted iterator
    assert (r.loss.spec.name, r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs,
            r.loss.spec.mask_same_image) == ("core.triplet", 0.2, True, 0, False)
    assert r.info.embed_dim == 256 and r.image.encoder.spec.normalize is False and r.image.pool.spec.normalize
    layer = r.image.reasoners[0].spec
    assert (layer.heads, layer.intermediate, layer.activation, layer.dropout, layer.ln_eps) == (16, 2048, "gelu", 0.1,
                                                                                                 1e-12)
    enc, head = r.text.encoder.spec, r.text.pool.spec
    assert (enc.max_words, enc.pad_fragments, enc.freeze, enc.frozen_dropout) == (32, True, True, True)
    assert (head.channels, head.widths, head.dropout, head.normalize) == (512, [1, 2, 3], 0.1, True)
    angular = r.objectives[0].slot.spec
    assert (angular.tan2, angular.max_violation, angular.start, angular.decay, angular.every, angular.last) == (
        1.0, True, 0.5, 0.1, 5, 20)
    coco = "coco" in path.stem
    assert (r.data.protocol, r.data.test_split) == (("coco-1k-5fold", "testall") if coco else ("f30k-1k", "test"))


@pytest.mark.parametrize("epoch", [0, 6, 25])
def test_the_training_loss_is_the_official_sum_of_three_terms(epoch):
    from itmkit.build import DataPorts, build_model
    from itmkit.recipe import load_recipe

    recipe = load_recipe(RECIPES[0].with_name("saem_f30k.toml"), [*tiny_bert_overrides(), "recipe.embed_dim=32",
                                                                   "image.reasoners.0.intermediate=24"])
    torch.manual_seed(0)
    model = build_model(recipe, DataPorts(12, 64, 36)).double().eval()
    g = torch.Generator().manual_seed(epoch)
    feats = torch.randn(5, 36, 12, generator=g, dtype=torch.float64)
    ids = torch.randint(5, 64, (5, 9), generator=g)
    lengths = torch.tensor([9, 7, 5, 9, 3])
    ids = torch.where(torch.arange(9)[None] < lengths[:, None], ids, 0)
    image_ids = torch.tensor([0, 1, 2, 3, 3])  # two captions of one image
    step = model.training_step(Regions(feats, torch.full((5,), 36)), Tokens(ids, lengths), image_ids, epoch=epoch)
    im = model.encode_images(Regions(feats, torch.full((5,), 36))).global_
    s = model.encode_texts(Tokens(ids, lengths)).global_
    named = {}
    for k, p in model.image.named_parameters():
        theirs = k.replace("encoder.fc.", "mapping.")
        for ours, official_name in LAYER_KEYS.items():
            theirs = theirs.replace(f"reasoners.0.layer.{ours}", f"layer.{official_name}")
        named[theirs] = p
    assert len(named) == 2 + len(LAYER_KEYS)
    expected = (official.contrastive_loss(im, s) + official.angular_weight(epoch) * official.angular_loss(im, s)
                + official.l2_reg(named))
    torch.testing.assert_close(step.loss, expected.to(step.loss.dtype), **TOL)


def test_a_trained_model_scores_a_split_as_its_captions_score_alone(tmp_path):
    """One epoch on a tiny dataset, then the scoring engine (galleries of length-sorted caption batches)
    gives each caption the scores it has when encoded on its own."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
    from tinydata import write_tiny

    from itmkit.recipe import load_recipe
    from itmkit.testing import check_scores_match_captions_alone
    from itmkit.train import train

    data = write_tiny(tmp_path / "data", width=8, regions=4)
    recipe = load_recipe(RECIPES[0].with_name("saem_shapes.toml"), [
        *tiny_bert_overrides(), f"data.path={data}", "recipe.embed_dim=16", "image.reasoners.0.intermediate=8",
        "text.pool.channels=4", "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=3",
        "text.encoder.max_words=12"])
    train(recipe, out_dir=tmp_path / "run", log=lambda *a: None)
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data)
