"""SGRAF's stages and recipes against the official per-caption computation, padding, ports, memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.errors import DataError
from itmkit.plugins import get_registry
from itmkit.recipe import RecipeError, parse_recipe
from itmkit.stage import PortError
from itmkit.testing import CHECKS, LargestAllocation, check_stage, recipe_plugins
from itmkit.types import (AlignedPort, GlobalPort, Local, LocalPort, PairSims, PairSimsPort, Regions, Tokens,
                          lengths_to_mask)
from itmkit_sgraf.importer import rename_similarity, similarity_layout
from itmkit_sgraf.stages import SAF, SGR, TextSelfAttention, TextToImage, Vector, VisualSelfAttention
from itmkit_sgraf.tests import official
from itmkit_sgraf.tests.fixtures import as_dtype, block, our_stages, similarity_state

STAGES = [VisualSelfAttention, TextSelfAttention, TextToImage, Vector, SGR, SAF]
# this paper's recipes; the cross-paper ones (scan_gpo.toml, ...) are tests/test_cross_paper_recipes.py's
RECIPES = [p for p in sorted((Path(__file__).parents[3] / "recipes").glob("sgraf_*.toml"))
           if recipe_plugins(p) <= {"sgraf"}]
TOL = dict(rtol=0, atol=1e-5)
SIZES = dict(embed=16, sim_dim=12, regions=6)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


def test_the_importer_is_registered():
    from itmkit_sgraf.importer import convert

    assert get_registry().importers["sgraf"] is convert


def reference(sd, image, text, cap_lens, module, steps=3, **kwargs):
    return official.forward_sim(as_dtype(sd, torch.float64), image.feats, text.feats, cap_lens, module_name=module,
                                sgr_step=steps, **kwargs)


# ------------------------------------------------------------- stages against the reference


def test_visual_pool_equals_the_official_visual_sa():
    sd = similarity_state(module="SGR", seed=3, **SIZES)
    stages = our_stages(sd, module="SGR", **SIZES)
    image, _, _, _ = block(seed=3, n_images=5)
    ref = official.visual_sa(official.sub(as_dtype(sd, torch.float64), "v_global_w."), image.feats)
    torch.testing.assert_close(stages.image_pool(image), ref, **TOL)


def test_visual_pool_in_training_uses_batch_statistics_over_regions_like_the_official():
    sd = similarity_state(module="SGR", seed=4, **SIZES)
    stages = our_stages(sd, module="SGR", **SIZES).train()  # dropout 0: the train-mode maths, deterministic
    image, _, _, _ = block(seed=4, n_images=5)
    ref_sd = official.sub(as_dtype(sd, torch.float64), "v_global_w.")
    ref = official.visual_sa(ref_sd, image.feats, training=True)
    torch.testing.assert_close(stages.image_pool(image), ref, **TOL)
    for bn, name in ((stages.image_pool.embedding_local[1], "embedding_local.1"),
                     (stages.image_pool.embedding_global[1], "embedding_global.1")):
        torch.testing.assert_close(bn.running_mean, ref_sd[f"{name}.running_mean"], **TOL)
        torch.testing.assert_close(bn.running_var, ref_sd[f"{name}.running_var"], **TOL)


def test_text_pool_equals_the_official_text_sa_of_each_sliced_caption():
    sd = similarity_state(module="SGR", seed=5, **SIZES)
    stages = our_stages(sd, module="SGR", **SIZES)
    _, text, _, cap_lens = block(seed=5, n_captions=7)
    assert (cap_lens < text.feats.shape[1]).any()
    ref_sd = official.sub(as_dtype(sd, torch.float64), "t_global_w.")
    ref = torch.cat([official.text_sa(ref_sd, text.feats[i : i + 1, : int(n)]) for i, n in enumerate(cap_lens)])
    torch.testing.assert_close(stages.text_pool(text), ref, **TOL)


@pytest.mark.parametrize("grad", [False, True], ids=["scoring", "training"])
def test_similarity_vectors_equal_the_official_graph_of_each_caption(grad):
    sd = similarity_state(module="SAF", seed=6, **SIZES)
    stages = our_stages(sd, module="SAF", **SIZES)
    image, text, _, cap_lens = block(seed=6)
    with torch.set_grad_enabled(grad):
        sims = stages.sims(image, text)
    ref_sd = as_dtype(sd, torch.float64)
    img_glo = official.visual_sa(official.sub(ref_sd, "v_global_w."), image.feats)
    assert sims.sims.shape == (4, 5, 1 + text.feats.shape[1], 12)
    for i, n in enumerate(cap_lens.tolist()):
        cap_i = text.feats[i : i + 1, :n]
        cap_glo = official.text_sa(official.sub(ref_sd, "t_global_w."), cap_i)
        expected = official.similarity_graph(ref_sd, image.feats, img_glo, cap_i, cap_glo)  # (Ni, 1 + n, S)
        torch.testing.assert_close(sims.sims[:, i, : 1 + n], expected, **TOL)
        assert sims.mask[:, i, : 1 + n].all() and not sims.mask[:, i, 1 + n :].any()
        assert (sims.sims[:, i, 1 + n :] == 0).all()  # padded nodes are zero, not garbage


@pytest.mark.parametrize("module, steps", [("SGR", 1), ("SGR", 2), ("SGR", 3), ("SAF", 0)])
def test_branch_equals_the_official_per_caption_loop(module, steps):
    sd = similarity_state(module=module, steps=steps, seed=steps, **SIZES)
    stages = our_stages(sd, module=module, steps=steps, **SIZES)
    image, text, _, cap_lens = block(seed=10 + steps)
    with torch.no_grad():
        ours = stages.scores(image, text)
    expected = reference(sd, image, text, cap_lens, module, steps)
    assert ours.shape == expected.shape == (4, 5)
    torch.testing.assert_close(ours, expected, **TOL)
    assert ((ours > 0) & (ours < 1)).all()  # the sigmoid readout


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_training_mode_equals_the_official_loop_with_its_per_caption_batch_norm(module):
    # SAF's BatchNorm1d(1) sees one caption at a time in the official loop: per-caption batch
    # statistics over every image and that caption's valid nodes, one running update per caption.
    sd = similarity_state(module=module, seed=21, **SIZES)
    stages = our_stages(sd, module=module, **SIZES).train()
    image, text, _, cap_lens = block(seed=21, n_images=6, n_captions=5)
    ref_sd = as_dtype(sd, torch.float64)
    ours = stages.scores(image, text)
    expected = official.forward_sim(ref_sd, image.feats, text.feats, cap_lens, module_name=module, training=True)
    torch.testing.assert_close(ours, expected, **TOL)
    if module == "SAF":
        bn = stages.aggregate.bn
        torch.testing.assert_close(bn.running_mean, ref_sd["SAF_module.bn.running_mean"], **TOL)
        torch.testing.assert_close(bn.running_var, ref_sd["SAF_module.bn.running_var"], **TOL)
        assert int(bn.num_batches_tracked) == 17 + 5
    ours.sum().backward()
    trained = [p for m in stages.modules() for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_images_with_fewer_regions_equal_slicing_each_image(module):
    # Not a case of the official code (36 regions everywhere), but of a detector with a threshold:
    # padded region slots are left out of the mean, the attention and the pool's softmax.
    sd = similarity_state(module=module, seed=8, **SIZES)
    stages = our_stages(sd, module=module, **SIZES)
    image, text, image_lens, cap_lens = block(seed=8, pad_regions=True)
    assert (image_lens < image.feats.shape[1]).any()
    with torch.no_grad():
        ours = stages.scores(image, text)
    torch.testing.assert_close(ours, reference(sd, image, text, cap_lens, module, image_lens=image_lens), **TOL)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_padding_never_changes_a_score(module):
    sd = similarity_state(module=module, seed=9, **SIZES)
    stages = our_stages(sd, module=module, **SIZES)
    image, text, _, _ = block(seed=9, pad_regions=True)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        first = stages.scores(image, text)
        noisy = [Local(torch.where(x.mask[..., None], x.feats,
                                   torch.randn(x.feats.shape, generator=g, dtype=x.feats.dtype) * 100), x.mask)
                 for x in (image, text)]
        second = stages.scores(*noisy)
        # a wider caption padding (a longer caption elsewhere in the batch) changes nothing either
        wider = Local(torch.cat([text.feats, torch.randn(text.feats.shape[0], 3, text.feats.shape[2], generator=g,
                                                         dtype=text.feats.dtype)], 1),
                      torch.cat([text.mask, torch.zeros(text.mask.shape[0], 3, dtype=torch.bool)], 1))
        third = stages.scores(image, wider)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-12)
    torch.testing.assert_close(first, third, rtol=0, atol=1e-12)


def test_a_block_scores_like_its_parts():
    # Any split of the Ni x Nt matrix into blocks gives the same numbers (the scoring engine's premise).
    sd = similarity_state(module="SGR", seed=12, **SIZES)
    stages = our_stages(sd, module="SGR", **SIZES)
    image, text, _, _ = block(seed=12, n_images=6, n_captions=7)
    with torch.no_grad():
        whole = stages.scores(image, text)
        parts = torch.cat([torch.cat([stages.scores(image.select(slice(i, i + 3)), text.select(slice(t, t + 4)))
                                      for t in (0, 4)], 1) for i in (0, 3)], 0)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)


def test_float32_blocks_agree_with_the_float64_official_loop_at_full_size():
    sizes = dict(embed=64, sim_dim=32, regions=36)
    sd = similarity_state(module="SGR", seed=13, **sizes)
    stages = our_stages(sd, module="SGR", dtype=torch.float32, **sizes)
    image, text, _, cap_lens = block(seed=13, n_images=5, n_captions=6, regions=36, words=20, dim=64)
    with torch.no_grad():
        ours = stages.scores(Local(image.feats.float(), image.mask), Local(text.feats.float(), text.mask))
    torch.testing.assert_close(ours.double(), reference(sd, image, text, cap_lens, "SGR"), **TOL)


def test_the_chunked_scoring_path_equals_the_training_path():
    # Without autograd sgraf.vector builds the (Lq x D) differences part by part, in place.
    sd = similarity_state(module="SAF", embed=256, sim_dim=4, regions=6, seed=14)
    stages = our_stages(sd, module="SAF", embed=256, sim_dim=4, regions=6)
    image, text, _, _ = block(seed=14, n_images=40, n_captions=30, dim=256)
    aligned = stages.cross(image=image, text=text)
    image_global, text_global = stages.image_pool(image), stages.text_pool(text)
    assert len(list(stages.vector._parts(40, 30, 8, 256))) > 1  # the test really splits the block
    with torch.no_grad():
        chunked = stages.vector(x=aligned, image=image_global, text=text_global)
    whole = stages.vector(x=aligned, image=image_global, text=text_global)
    torch.testing.assert_close(chunked.sims, whole.sims.detach(), rtol=0, atol=1e-12)
    assert torch.equal(chunked.mask, whole.mask)


# ------------------------------------------------------------------------- region count


def test_the_image_pool_rejects_more_regions_than_slots_with_a_clear_error():
    pool = VisualSelfAttention(num_regions=36).build(x=LocalPort(8))
    images = Local(torch.randn(2, 40, 8), lengths_to_mask(torch.tensor([40, 12]), 40))
    with pytest.raises(DataError, match=r"built for 36 regions per image .* some images have 40: to train on this"
                                        r" data, set num_regions = 40 .*; a trained or imported model needs data"
                                        r" with at most 36 regions per image"):
        pool(images)


def test_the_image_pool_masks_fewer_regions_than_slots_and_cuts_padding_past_them():
    # Zero-padded adaptive features: the same images in 10, 36 or 50 stored rows pool alike.
    pool = VisualSelfAttention(num_regions=36).build(x=LocalPort(8)).eval()
    lengths = torch.tensor([10, 3])
    feats = torch.randn(2, 10, 8)
    out = pool(Local(feats, lengths_to_mask(lengths, 10)))
    for width in (36, 50):
        wide = torch.cat([feats, torch.zeros(2, width - 10, 8)], dim=1)
        torch.testing.assert_close(pool(Local(wide, lengths_to_mask(lengths, width))), out)


def test_a_model_on_data_with_more_regions_than_slots_fails_when_encoding():
    recipe = parse_recipe(RECIPES[0].read_text(), overrides=["recipe.embed_dim=16", "text.encoder.word_dim=8"])
    model = build_model(recipe, DataPorts(feature_dim=12, vocab_size=30, num_regions=40), seed=0).eval()
    with pytest.raises(DataError, match=r"sgraf.visual_sa was built for 36 regions .* have 40.* \[image\] pool"):
        model.encode_images(Regions(torch.rand(2, 40, 12), torch.full((2,), 40)))


# ---------------------------------------------------------------------------------- ports


def test_the_head_needs_pooled_global_vectors_on_both_sides():
    with pytest.raises(PortError, match=r"add a pool to \[image\] and \[text\]"):
        Vector().ports(x=AlignedPort(16), image=GlobalPort(16))
    with pytest.raises(PortError, match="share one dim"):
        Vector().ports(x=AlignedPort(16), image=GlobalPort(16), text=GlobalPort(8))
    assert Vector(sim_dim=7).ports(x=AlignedPort(16), image=GlobalPort(16), text=GlobalPort(16)) == PairSimsPort(7)


def test_a_recipe_without_pools_names_the_similarity_slot():
    text = RECIPES[0].read_text().replace('pool = { stage = "sgraf.visual_sa"', '# pool = { stage = "sgraf.visual_sa"')
    with pytest.raises(RecipeError, match=r"global vector on both sides.* @ match\[0\]\.similarity"):
        build_model(parse_recipe(text), DataPorts(feature_dim=12, vocab_size=30))


def test_aggregators_read_similarity_vectors():
    for spec in (SGR(), SAF()):
        with pytest.raises(PortError, match="put sgraf.vector before it"):
            spec.ports(x=PairSimsPort(1))
        assert spec.ports(x=PairSimsPort(256)).dim == 1


def test_cross_attention_needs_equal_dims():
    with pytest.raises(PortError, match="image fragments are 16-d, text fragments 8-d"):
        TextToImage().ports(image=LocalPort(16), text=LocalPort(8))


# ------------------------------------------------------------------------- whole recipes


def official_names(model) -> dict:
    """Our model's similarity weights under the official sim_enc names."""
    spec = model.recipe.match[0].aggregate.spec
    module = "SGR" if spec.name == "sgraf.sgr" else "SAF"
    ours = model.state_dict()
    embed, sim_dim = model.recipe.info.embed_dim, model.recipe.match[0].similarity.spec.sim_dim
    layout = similarity_layout(embed, sim_dim, model.recipe.image.pool.spec.num_regions, module,
                               getattr(spec, "steps", 0), tracked=True)
    return {k: ours[rename_similarity(k)].double() if ours[rename_similarity(k)].is_floating_point()
            else ours[rename_similarity(k)] for k in layout}, module, getattr(spec, "steps", 0)


def random_batch(seed: int, n_images=4, n_captions=6, regions=36, feature_dim=12, vocab=30, words=9):
    g = torch.Generator().manual_seed(seed)
    regions_in = Regions(torch.rand(n_images, regions, feature_dim, generator=g), torch.full((n_images,), regions))
    lengths = torch.randint(2, words + 1, (n_captions,), generator=g)
    lengths[0] = words
    ids = torch.randint(4, vocab, (n_captions, words), generator=g).masked_fill(~lengths_to_mask(lengths, words), 0)
    return regions_in, Tokens(ids, lengths)


def test_there_are_the_sgraf_recipes():
    assert [p.stem for p in RECIPES] == ["sgraf_saf_coco", "sgraf_saf_f30k", "sgraf_sgr_coco", "sgraf_sgr_f30k",
                                         "sgraf_shapes_sgr"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_model_equals_the_official_loop_on_its_own_encodings(path):
    recipe = parse_recipe(path.read_text(), str(path), overrides=["recipe.embed_dim=16", "text.encoder.word_dim=8",
                                                                  "match[0].similarity.sim_dim=12"])
    model = build_model(recipe, DataPorts(feature_dim=12, vocab_size=30, num_regions=36), seed=0).eval()
    regions, tokens = random_batch(seed=len(path.stem))
    with torch.no_grad():
        image, text = model.encode_images(regions), model.encode_texts(tokens)
        ours = model.score(image, text)
    sd, module, steps = official_names(model)
    expected = official.forward_sim(sd, image.local.feats.double(), text.local.feats.double(), tokens.lengths,
                                    module_name=module, sgr_step=steps)
    assert ours.shape == (4, 6)
    torch.testing.assert_close(ours.double(), expected, **TOL)


@pytest.mark.parametrize("name, module, schedule", [
    ("sgraf_sgr_f30k", "sgraf.sgr", (40, 30)),
    ("sgraf_saf_f30k", "sgraf.saf", (30, 20)),
    ("sgraf_sgr_coco", "sgraf.sgr", (20, 10)),
    ("sgraf_saf_coco", "sgraf.saf", (20, 10)),
])
def test_paper_recipes_carry_the_readme_arguments(name, module, schedule):
    r = parse_recipe((RECIPES[0].parent / f"{name}.toml").read_text())
    (match,) = r.match
    assert (match.cross.spec.name, match.cross.spec.lambda_softmax) == ("sgraf.t2i", 9.0)
    assert (match.similarity.spec.name, match.similarity.spec.sim_dim, match.similarity.spec.normalize_attended) == (
        "sgraf.vector", 256, True)
    assert match.aggregate.spec.name == module
    if module == "sgraf.sgr":
        assert match.aggregate.spec.steps == 3
    pool = r.image.pool.spec
    assert (pool.name, pool.num_regions, pool.dropout) == ("sgraf.visual_sa", 36, 0.4)
    assert (r.text.pool.spec.name, r.text.pool.spec.dropout) == ("sgraf.text_sa", 0.4)
    enc = r.text.encoder.spec
    assert (enc.word_dim, enc.bidirectional, enc.num_layers, enc.embed_dropout) == (300, True, 1, 0.4)
    train, loss = r.train, r.loss.spec
    assert (train.epochs, train.lr_update, train.lr, train.batch_size, train.grad_clip) == (*schedule, 2e-4, 128, 2.0)
    assert (loss.margin, loss.max_violation, loss.warmup_epochs, r.info.embed_dim) == (0.2, True, 0, 1024)
    coco = "coco" in name
    assert (r.data.protocol, r.data.test_split) == (("coco-1k-5fold", "testall") if coco else ("f30k-1k", "test"))


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_no_tensor_of_a_scoring_block_exceeds_the_block_working_memory(module):
    # D = 1024 and S = 32: a (pairs x words x D) difference tensor would be 32 times the output.
    # The images are the scoring engine's encodings; only the branch runs inside the recorder.
    sizes = dict(embed=1024, sim_dim=32, regions=9)
    sd = similarity_state(module=module, seed=15, **sizes)
    stages = our_stages(sd, module=module, dtype=torch.float32, **sizes)
    image, text, _, _ = block(seed=15, n_images=24, n_captions=24, regions=9, words=7, dim=1024, dtype=torch.float32)
    with torch.no_grad():
        image_global, text_global = stages.image_pool(image), stages.text_pool(text)
    specs = [TextToImage(), Vector(sim_dim=32), SGR() if module == "SGR" else SAF()]
    budget = 24 * 24 * sum(s.pair_bytes(text_len=7, image_len=9) for s in specs)
    with torch.no_grad(), LargestAllocation() as recorder:
        sims = stages.vector(x=stages.cross(image=image, text=text), image=image_global, text=text_global)
        stages.aggregate(x=sims)
    assert recorder.largest <= budget, f"a {recorder.largest:,}-byte tensor in a block budgeted at {budget:,} bytes"


def test_pair_bytes_grow_with_the_lengths_and_the_similarity_size():
    assert Vector(sim_dim=256).pair_bytes(text_len=12, image_len=36) == 4 * (6 * 37 * 256 + 12 * 36)
    assert Vector(sim_dim=512).pair_bytes(text_len=12, image_len=36) > Vector().pair_bytes(text_len=12, image_len=36)
    assert TextToImage().pair_bytes(text_len=12, image_len=36) == 6 * 4 * 12 * 36
    for spec in (SGR(), SAF()):
        assert 0 < spec.pair_bytes(text_len=12, image_len=10) < spec.pair_bytes(text_len=20, image_len=10)
        assert spec.pair_bytes(text_len=12, image_len=10) < spec.pair_bytes(text_len=12, image_len=36)


def test_sgr_last_step_reads_node_zero_only_like_a_full_update():
    sd = similarity_state(module="SGR", seed=16, **SIZES)
    agg = our_stages(sd, module="SGR", **SIZES).aggregate
    sims = PairSims(torch.randn(3, 4, 6, 12, dtype=torch.float64), torch.ones(3, 4, 6, dtype=torch.bool))
    nodes, no_padding = sims.sims.reshape(12, 6, 12), torch.zeros(12, 1, 6, dtype=torch.float64)
    for step in agg.steps:
        nodes = step(nodes, no_padding)  # every node updated at every step
    full = torch.sigmoid(agg.readout(nodes[:, 0])).view(3, 4)
    torch.testing.assert_close(agg(sims), full, rtol=0, atol=1e-12)
