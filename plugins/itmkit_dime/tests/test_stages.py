"""The dime stages against the literal official reference (tests/official.py), in float64, both directions."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F

from itmkit.core_stages import PrecompEncoder
from itmkit.errors import ItmkitError
from itmkit.testing import CHECKS, check_stage
from itmkit.types import BlockContext, Local, PairLocal, Regions
from itmkit_dime.importer import interaction_keys, text_keys
from itmkit_dime.stages import DimeBert, DimeImagePool, DimeInteraction, DimeRefine, DimeRefineStage, DimeScore
from itmkit_dime.stages import ImagePool
from itmkit_dime.tests import official

EMBED, HIDDEN, HEADS, HID, WORDS, REGIONS, IMG_DIM = 32, 24, 4, 20, 32, 7, 12
LAMBDA = {"i2t": 4.0, "t2i": 9.0}


def make_pair(direction: str, seed: int = 0, *, raw_norm: str = "clipped_l2norm", path_weight: float = 0.5,
              cls=DimeScore):
    """Official modules with random weights (float64) and ours loaded from their state dicts."""
    torch.manual_seed(seed)
    head = official.OfficialTextHead(HIDDEN, EMBED).double()
    itr = official.OfficialInteraction(EMBED, direction, hid_router=HID, hid_imrc=HID, heads=HEADS,
                                       raw_feature_norm=raw_norm, lambda_softmax=LAMBDA[direction]).double()
    with torch.no_grad():  # a trained score head: running statistics far from (0, 1)
        itr.bn.running_mean.normal_(0, 0.1)
        itr.bn.running_var.uniform_(0.5, 2.0)
        itr.bn.weight.uniform_(0.5, 1.5)
        itr.bn.bias.normal_(0, 0.1)
    ours = cls(direction=direction, dim=EMBED, hidden=HIDDEN, widths=(1, 2, 3), lambda_softmax=LAMBDA[direction],
               raw_feature_norm=raw_norm, heads=HEADS, hid_imrc=HID, hid_router=HID, path_hid=128,
               path_weight=path_weight, normalize_image=True).double()
    state = {ours_key: head.state_dict()[theirs] for theirs, (ours_key, _) in text_keys(EMBED, HIDDEN).items()}
    keys = interaction_keys(EMBED, 128, HID, HID)
    state.update({mine: itr.state_dict()[theirs] for theirs, (mine, _) in keys.items()
                  if (cls is DimeScore or not mine.startswith("head.")) and (path_weight or "path_" not in mine)})
    ours.load_state_dict(state, strict=True)
    return head, itr, ours


def block(ni: int, nt: int, seed: int = 1):
    """fc(f) regions (raw), BERT states (32 positions), real lengths (some cut at 32), image vectors."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(ni, REGIONS, EMBED, generator=g, dtype=torch.float64)
    states = torch.randn(nt, WORDS, HIDDEN, generator=g, dtype=torch.float64)
    lengths = torch.randint(3, WORDS + 1, (nt,), generator=g)
    lengths[0] = WORDS
    img = F.normalize(torch.randn(ni, EMBED, generator=g, dtype=torch.float64), dim=-1)
    return regions, states, lengths, img


def our_inputs(regions, states, lengths, img):
    image = Local(regions, torch.ones(regions.shape[:2], dtype=torch.bool))
    text = Local(states, torch.ones(states.shape[:2], dtype=torch.bool), {"token_lengths": lengths})
    return dict(image=image, text=text, image_global=img)


def official_inputs(head, regions, states, img):
    (stc, bert), wrd = head(states)
    return F.normalize(regions, dim=-1), img, wrd, stc, bert


def gated(itr: official.OfficialInteraction, ours) -> None:
    """Routers that shut paths: output path 2 of layer 1 gets no probability (its skip gate opens), and
    layer 2's GLGC router none (its skip carries the cell's input)."""
    with torch.no_grad():
        for cell in ("ric", "glgc", "imrc", "cmrc"):
            getattr(itr.dynamic_itr_l1, cell).router.mlp[2].bias[2] = -50.0
            getattr(ours.interaction.layers[1], cell).router.mlp[2].bias[2] = -50.0
        itr.dynamic_itr_l2.glgc.router.mlp[2].bias[0] = -50.0
        ours.interaction.layers[2].glgc.router.mlp[2].bias[0] = -50.0


# ============================================================================ scoring


@pytest.mark.parametrize("gates", [False, True], ids=["open", "gated"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_scores_equal_the_official_sharded_evaluation(direction, gates):
    head, itr, ours = make_pair(direction)
    if gates:
        gated(itr, ours)
    regions, states, lengths, img = block(5, 9)
    rgn, img, wrd, stc, _ = official_inputs(head, regions, states, img)
    itr.eval(), ours.eval()
    expected = official.cal_itr(itr, rgn, img, wrd, stc, lengths, shard_size=4)  # 2 x 3 shards
    with torch.no_grad():
        got = ours(**our_inputs(regions, states, lengths, img))
    torch.testing.assert_close(got, torch.as_tensor(expected), rtol=0, atol=1e-10)


@pytest.mark.parametrize("raw_norm", ["l2norm", "softmax", "clipped", "no_norm"])
def test_every_raw_feature_norm_equals_the_official(raw_norm):
    for direction in ("i2t", "t2i"):
        head, itr, ours = make_pair(direction, seed=3, raw_norm=raw_norm)
        regions, states, lengths, img = block(3, 4, seed=4)
        rgn, img, wrd, stc, _ = official_inputs(head, regions, states, img)
        itr.eval(), ours.eval()
        with torch.no_grad():
            expected, _ = itr(rgn, img, wrd, stc, lengths)
            got = ours(**our_inputs(regions, states, lengths, img))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_float32_scores_agree_to_1e5():
    head, itr, ours = make_pair("i2t")
    head, itr, ours = head.float(), itr.float(), ours.float()
    regions, states, lengths, img = (t.float() if t.is_floating_point() else t for t in block(4, 6))
    rgn, img, wrd, stc, _ = official_inputs(head, regions, states, img)
    itr.eval(), ours.eval()
    with torch.no_grad():
        expected, _ = itr(rgn, img, wrd, stc, lengths)
        got = ours(**our_inputs(regions, states, lengths, img))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_refined_fragments_equal_the_official_routing_output(direction):
    head, itr, ours = make_pair(direction, seed=5, cls=DimeRefine)
    regions, states, lengths, img = block(3, 4, seed=6)
    rgn, img, wrd, stc, _ = official_inputs(head, regions, states, img)
    with torch.no_grad():
        expected, _ = itr.refined(rgn, img, wrd, stc, lengths)  # (n_img, n_stc, N, d)
        got = ours(**our_inputs(regions, states, lengths, img))
    assert isinstance(got, PairLocal) and got.side == ("image" if direction == "i2t" else "text")
    torch.testing.assert_close(got.feats, expected, rtol=0, atol=1e-10)


# ============================================================================ training


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_training_scores_and_path_loss_equal_the_official_train_step(direction, extra):
    """BN with the block's batch statistics, the path term (weighted 0.5), extra negatives as the README's."""
    head, itr, ours = make_pair(direction, seed=7)
    b = 4
    ni, nt = (b, b * (1 + extra)) if direction == "i2t" else (b * (1 + extra), b)
    regions, states, lengths, img = block(ni, nt, seed=8)
    rgn, img, wrd, stc, bert = official_inputs(head, regions, states, img)
    itr.train(), ours.train()
    expected, term = official.train_loss_terms(itr, rgn, img, wrd, stc, lengths, bert, batch_size=b, trade_off=0.5)
    context = BlockContext(torch.zeros(ni, nt, dtype=torch.bool))
    got = ours(**our_inputs(regions, states, lengths, img), context=context)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(context.terms["path"], term, rtol=0, atol=1e-10)
    # the same gradients reach the weights (one per kind of cell, the router, the path mapping)
    (expected.sum() + term).backward()
    (got.sum() + context.terms["path"]).backward()
    pairs = [(itr.dynamic_itr_l1.cmrc.refine.fc_scale.weight, ours.interaction.layers[1].cmrc.fc_scale.weight),
             (itr.dynamic_itr_l0.imrc.sa.att_layer.linears[1].weight, ours.interaction.layers[0].imrc.key.weight),
             (itr.dynamic_itr_l2.glgc.fc_1.weight, ours.interaction.layers[2].glgc.fc_1.weight),
             (itr.dynamic_itr_l1.ric.router.mlp[0].weight, ours.interaction.layers[1].ric.router.mlp[0].weight),
             (itr.path_mapping.weight, ours.path_mapping.weight), (itr.bn.weight, ours.head.bn.weight),
             (head.mapping.weight, ours.text_head.mapping.weight)]
    for theirs, mine in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ours.head.bn.running_mean, itr.bn.running_mean, rtol=0, atol=1e-12)


def test_no_context_adds_no_term_and_scoring_never_computes_paths():
    _, _, ours = make_pair("i2t")
    regions, states, lengths, img = block(2, 3)
    ours.train()
    ours(**our_inputs(regions, states, lengths, img))  # no context: nothing to add to
    context = BlockContext(torch.zeros(2, 3, dtype=torch.bool))
    ours(**our_inputs(regions, states, lengths, img), context=context)
    assert set(context.terms) == {"path"} and context.terms["path"].dim() == 0


def test_i2t_path_loss_with_more_images_than_captions_is_a_clear_error():
    _, _, ours = make_pair("i2t")
    regions, states, lengths, img = block(4, 3)
    with pytest.raises(ItmkitError, match="extra_captions"):
        ours(**our_inputs(regions, states, lengths, img), context=BlockContext(torch.zeros(4, 3, dtype=torch.bool)))


# ========================================================================= the encoders


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_image_side_equals_the_official_precomp_encoder(direction):
    torch.manual_seed(0)
    off = official.OfficialImage(IMG_DIM, EMBED, direction).double()
    enc = PrecompEncoder(in_dim=IMG_DIM, embed_dim=EMBED, normalize=False).double()
    pool = ImagePool(dim=EMBED, batchnorm=direction == "t2i").double()
    enc.fc.load_state_dict(off.fc.state_dict())
    if pool.bn is not None:
        pool.bn.load_state_dict(off.bn.state_dict())
    feats = torch.rand(6, 5, IMG_DIM, dtype=torch.float64)
    for mode in (True, False):
        off.train(mode), pool.train(mode)
        img, rgn = off(feats)
        local = enc(Regions(feats, torch.full((6,), 5)))
        torch.testing.assert_close(F.normalize(local.feats, dim=-1), rgn, rtol=0, atol=1e-12)
        torch.testing.assert_close(pool(local), img, rtol=0, atol=1e-12)


def test_text_head_equals_the_official_text_net():
    head, _, ours = make_pair("t2i")
    states = torch.randn(3, WORDS, HIDDEN, dtype=torch.float64)
    (stc, _), wrd = head(states)
    words, sentence = ours.text_head(states, torch.ones(3, WORDS, dtype=torch.bool))
    torch.testing.assert_close(words, wrd, rtol=0, atol=1e-12)
    torch.testing.assert_close(sentence, stc, rtol=0, atol=1e-12)


def test_dime_bert_keeps_every_position_and_the_real_lengths():
    spec = DimeBert(path=str(DimeBert.example["path"]), pretrained=False, max_words=10)
    from itmkit.types import Tokens, TokensPort

    module = spec.build(TokensPort(64)).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 7, 8, 9, 10, 3]])
    out = module(Tokens(ids, torch.tensor([4, 6])))
    assert out.feats.shape[:2] == (2, 10) and bool(out.mask.all())
    assert out.extras["token_lengths"].tolist() == [4, 6]
    cut = module(Tokens(torch.tensor([[2] + [7] * 12 + [3]]), torch.tensor([14])))
    assert cut.extras["token_lengths"].tolist() == [10]


# ====================================================================== conformance


@attrs.frozen(kw_only=True)
class DimeInteractionT2I(DimeInteraction):
    """dime.interaction as the kit builds it in direction t2i."""

    example = {"path_weight": 0.0, "direction": "t2i"}


@attrs.frozen(kw_only=True)
class DimeRefineT2I(DimeRefineStage):
    """dime.refine as the kit builds it in direction t2i."""

    example = {"path_weight": 0.0, "direction": "t2i"}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", [DimeBert, DimeImagePool, DimeInteraction, DimeRefineStage, DimeInteractionT2I,
                                 DimeRefineT2I], ids=lambda c: f"{c.name}-{getattr(c, 'example', {}).get('direction', '')}")
def test_conformance(cls, check):
    check(cls)


def test_registered():
    from itmkit.plugins import get_registry

    registry = get_registry()
    for cls in (DimeBert, DimeImagePool, DimeInteraction, DimeRefineStage):
        check_stage(cls, registry=registry)
    assert "dime" in registry.importers


def test_t2i_without_the_image_pool_is_a_port_error():
    from itmkit.stage import PortError
    from itmkit.types import LocalPort

    with pytest.raises(PortError, match="dime.image_pool"):
        DimeInteraction(direction="t2i", embed_dim=32).ports(LocalPort(32), LocalPort(24))
    with pytest.raises(PortError, match="embed_dim = 16"):
        DimeInteraction(embed_dim=32).ports(LocalPort(16), LocalPort(24))
    with pytest.raises(PortError, match="heads = 5"):
        DimeInteraction(embed_dim=32, heads=5).ports(LocalPort(32), LocalPort(24))
