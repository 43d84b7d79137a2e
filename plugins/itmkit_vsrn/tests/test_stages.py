"""VSRN's stages against the official forward (tests/official.py), padding, and its recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.core_stages import Precomp
from itmkit.plugins import get_registry
from itmkit.recipe import load_recipe
from itmkit.testing import CHECKS, check_stage, recipe_plugins
from itmkit.types import Local, LocalPort, Regions, RegionsPort, Tokens, TokensPort, lengths_to_mask
from itmkit_vsrn.stages import GRU, Caption, L2Norm, RsGCN, caption_targets
from itmkit_vsrn.tests import official

STAGES = [L2Norm, RsGCN, GRU, Caption]
ROOT = Path(__file__).parents[3]
RECIPES = [p for p in sorted((ROOT / "recipes").glob("vsrn_*.toml")) if recipe_plugins(p) <= {"vsrn"}]
TOL = dict(rtol=0, atol=1e-5)
D, F_DIM = 8, 12

@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


# ================================================================================ helpers


def gcn_state(seed: int, dim: int = D, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random official Rs_GCN weights (Conv1d layout), the BatchNorm away from its zero init."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("g", "theta", "phi", "W.0"):
        sd[f"{prefix}{name}.weight"] = torch.randn(dim, dim, 1, generator=g, dtype=torch.float64) * 0.5
        sd[f"{prefix}{name}.bias"] = torch.randn(dim, generator=g, dtype=torch.float64) * 0.1
    sd[f"{prefix}W.1.weight"] = torch.randn(dim, generator=g, dtype=torch.float64)
    sd[f"{prefix}W.1.bias"] = torch.randn(dim, generator=g, dtype=torch.float64)
    sd[f"{prefix}W.1.running_mean"] = torch.randn(dim, generator=g, dtype=torch.float64)
    sd[f"{prefix}W.1.running_var"] = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    return sd


def load_gcn(block: torch.nn.Module, sd: dict, prefix: str = "") -> None:
    ours = {k: sd[f"{prefix}{k}"].squeeze(-1) if k.endswith("weight") and sd[f"{prefix}{k}"].dim() == 3
            else sd[f"{prefix}{k}"] for k in block.state_dict() if not k.endswith("num_batches_tracked")}
    block.load_state_dict(ours, strict=False)


def built(cls, port, **params) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(**params).build(x=port).double()


def padded(feats: torch.Tensor, lengths: list[int], width: int, garbage: float = 1e3) -> Local:
    """feats (B, n_max, D) cut to each length and padded to ``width`` with garbage (one NaN)."""
    b, _, d = feats.shape
    mask = lengths_to_mask(torch.tensor(lengths), width)
    out = torch.randn(b, width, d, dtype=feats.dtype, generator=torch.Generator().manual_seed(9)) * garbage
    for i, n in enumerate(lengths):
        out[i, :n] = feats[i, :n]
    if not mask.all():
        out[~mask] = out[~mask].index_fill(0, torch.tensor([0]), float("nan"))
    return Local(out, mask)


# ============================================================================== l2norm


def test_l2norm_over_regions_is_the_official_dim1_norm():
    x = torch.randn(3, 5, D, dtype=torch.float64)
    out = built(L2Norm, LocalPort(D))(Local(x, torch.ones(3, 5, dtype=torch.bool)))
    torch.testing.assert_close(out.feats, official.l2norm(x), **TOL)
    assert torch.allclose(out.feats.pow(2).sum(dim=1), torch.ones(3, D, dtype=torch.float64))  # per channel


def test_l2norm_over_regions_reads_only_the_valid_ones_and_zeroes_the_padding():
    x = torch.randn(3, 5, D, dtype=torch.float64)
    lengths = [5, 2, 4]
    out = built(L2Norm, LocalPort(D))(padded(x, lengths, 7))
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out.feats[i, :n], official.l2norm(x[i:i + 1, :n])[0], **TOL)
        assert (out.feats[i, n:] == 0).all()


def test_l2norm_over_features_normalises_each_region():
    x = torch.randn(2, 4, D, dtype=torch.float64)
    out = built(L2Norm, LocalPort(D), axis="features")(Local(x, torch.ones(2, 4, dtype=torch.bool)))
    torch.testing.assert_close(out.feats.norm(dim=-1), torch.ones(2, 4, dtype=torch.float64), **TOL)


# ============================================================================== Rs-GCN


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_rsgcn_equals_the_official_block_with_every_region_valid(training):
    sd = gcn_state(1)
    block = built(RsGCN, LocalPort(D)).train(training)
    load_gcn(block, sd)
    x = torch.randn(4, 6, D, dtype=torch.float64)
    out = block(Local(x, torch.ones(4, 6, dtype=torch.bool)))
    expected = official.rs_gcn(x.permute(0, 2, 1), sd, "", training).permute(0, 2, 1)
    torch.testing.assert_close(out.feats, expected, **TOL)


def test_rsgcn_starts_as_the_identity_like_the_official_zero_init():
    block = built(RsGCN, LocalPort(D)).train()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(block(Local(x, torch.ones(2, 5, dtype=torch.bool))).feats, x, **TOL)


def test_rsgcn_with_padding_equals_each_image_alone_in_eval_mode():
    sd = gcn_state(2)
    block = built(RsGCN, LocalPort(D)).eval()
    load_gcn(block, sd)
    x = torch.randn(3, 6, D, dtype=torch.float64)
    lengths = [6, 3, 1]
    out = block(padded(x, lengths, 9))
    for i, n in enumerate(lengths):  # N = the image's own region count
        alone = official.rs_gcn(x[i:i + 1, :n].permute(0, 2, 1), sd, "", False).permute(0, 2, 1)[0]
        torch.testing.assert_close(out.feats[i, :n], alone, **TOL)
        assert (out.feats[i, n:] == 0).all()


def test_rsgcn_training_batchnorm_counts_only_valid_regions():
    sd = gcn_state(3)
    block = built(RsGCN, LocalPort(D)).train()
    load_gcn(block, sd)
    x = torch.randn(3, 6, D, dtype=torch.float64)
    lengths = [6, 2, 4]
    out = block(padded(x, lengths, 8))
    # slow reference: each image's W_o y alone (N = its own count), then BatchNorm statistics over
    # the concatenated valid regions of the batch
    pre = [official.rs_gcn_message(x[i:i + 1, :n].permute(0, 2, 1), sd, "")[0].T for i, n in enumerate(lengths)]
    stacked = torch.cat(pre)
    mean, var = stacked.mean(dim=0), stacked.var(dim=0, unbiased=False)
    normed = (stacked - mean) / torch.sqrt(var + 1e-5) * sd["W.1.weight"] + sd["W.1.bias"]
    expected = normed + torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(out.feats[out.mask], expected, **TOL)
    # the running statistics moved by the valid regions only (unbiased variance, momentum 0.1)
    torch.testing.assert_close(block.W[1].running_mean, 0.9 * sd["W.1.running_mean"] + 0.1 * mean, **TOL)
    torch.testing.assert_close(block.W[1].running_var,
                               0.9 * sd["W.1.running_var"] + 0.1 * stacked.var(dim=0, unbiased=True), **TOL)


def test_rsgcn_padding_gets_no_gradient_and_changes_nothing():
    block = built(RsGCN, LocalPort(D)).train()
    load_gcn(block, gcn_state(4))
    x = torch.randn(3, 6, D, dtype=torch.float64)
    first = padded(x, [6, 2, 4], 8)
    feats = first.feats.clone().requires_grad_(True)
    out = block(Local(feats, first.mask))
    out.feats[out.mask].pow(2).sum().backward()
    assert torch.isfinite(feats.grad).all() and (feats.grad[~first.mask] == 0).all()


# =============================================================================== GRU pool


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["coco", "f30k"])
def test_gru_pool_equals_the_official_img_rnn_and_bn(batch_norm, training):
    pool = built(GRU, LocalPort(D), batch_norm=batch_norm).train(training)
    g = torch.Generator().manual_seed(5)
    sd = {f"img_rnn.{k}": v for k, v in pool.rnn.state_dict().items()}
    if batch_norm:
        stats = {"weight": torch.randn(D, generator=g), "bias": torch.randn(D, generator=g),
                 "running_mean": torch.randn(D, generator=g), "running_var": torch.rand(D, generator=g) + 0.5}
        pool.bn.load_state_dict({k: v.double() for k, v in stats.items()}, strict=False)
        sd.update({f"bn.{k}": v.double() for k, v in stats.items()})
    x = torch.randn(4, 5, D, dtype=torch.float64)
    out = pool(Local(x, torch.ones(4, 5, dtype=torch.bool)))
    _, h = official.gru(x, sd, "img_rnn.")
    if batch_norm:
        h = official.batch_norm(h, sd, "bn.", training)
    torch.testing.assert_close(out, official.l2norm(h), **TOL)


def test_gru_pool_reads_each_image_to_its_last_valid_region():
    pool = built(GRU, LocalPort(D)).eval()
    sd = {f"img_rnn.{k}": v for k, v in pool.rnn.state_dict().items()}
    x = torch.randn(3, 6, D, dtype=torch.float64)
    lengths = [6, 1, 4]
    out = pool(padded(x, lengths, 9))
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i], official.l2norm(official.gru(x[i:i + 1, :n], sd, "img_rnn.")[1])[0], **TOL)


# =============================================================================== the tower


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("f30k", [True, False], ids=["f30k", "coco"])
def test_the_image_tower_equals_the_official_encoder(f30k, training):
    """fc -> [l2norm over regions] -> 4 Rs-GCN -> l2norm over regions -> GRU [-> BN] -> l2norm, both branches."""
    torch.manual_seed(0)
    enc = Precomp(embed_dim=D, normalize=False).build(x=RegionsPort(F_DIM)).double()
    gcns = [built(RsGCN, LocalPort(D)) for _ in range(4)]
    norm = built(L2Norm, LocalPort(D))
    pool = built(GRU, LocalPort(D), batch_norm=f30k)
    sd = {"fc.weight": enc.fc.weight.detach(), "fc.bias": enc.fc.bias.detach()}
    for k, block in enumerate(gcns, 1):
        part = gcn_state(10 + k, prefix=f"Rs_GCN_{k}.")
        load_gcn(block, part, f"Rs_GCN_{k}.")
        sd.update(part)
    sd.update({f"img_rnn.{k}": v for k, v in pool.rnn.state_dict().items()})
    if f30k:
        pool.bn.running_var.fill_(1.7)
        sd.update({f"bn.{k}": v for k, v in pool.bn.state_dict().items()})
    for m in (enc, *gcns, norm, pool):
        m.train(training)
    images = torch.rand(4, 6, F_DIM, dtype=torch.float64)
    x = enc(Regions(images, torch.full((4,), 6)))
    if not f30k:
        x = norm(x)
    for block in gcns:
        x = block(x)
    x = norm(x)
    emb = pool(x)
    ref_emb, ref_gcn = official.encode_images(sd, images, f30k, training)
    torch.testing.assert_close(x.feats, ref_gcn, **TOL)
    torch.testing.assert_close(emb, ref_emb, **TOL)


# ======================================================================= caption objective

V, MAX_LEN = 20, 7


def caption_batch(seed: int, lengths: list[int]) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 1, 2  # <start> ... <end>
        ids[i, 1:n - 1] = torch.randint(4, V, (n - 2,), generator=g)
    return Tokens(ids, torch.tensor(lengths))


def caption_module(**params) -> torch.nn.Module:
    torch.manual_seed(0)
    params = {"hidden_dim": 6, "word_dim": 5, "max_len": MAX_LEN, **params}
    return Caption(**params).build(image=LocalPort(D), tokens=TokensPort(V)).double()


def official_decoder_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())  # our names are the official S2VTAttModel's (encoder.*, decoder.*)


LENGTHS = [3, 9, 6, 7, 5]  # 9 and 7 are cut to max_len = 7; 6 fills every step without its <pad>


@pytest.mark.parametrize("lengths", [LENGTHS, [4, 4, 3]], ids=["with-cut", "short"])
def test_caption_targets_are_the_official_labels_and_masks(lengths):
    tokens = caption_batch(0, lengths)
    labels, mask = caption_targets(tokens, MAX_LEN, True)
    for i, n in enumerate(lengths):
        gts, m = official.caption_label_mask(tokens.ids[i, :n].tolist(), MAX_LEN)
        assert labels[i].tolist() == gts.tolist()
        assert mask[i].float().tolist() == m.tolist()


def test_caption_loss_equals_the_official_decoder_and_criterion():
    module = caption_module().eval()  # dropout off
    tokens = caption_batch(1, LENGTHS)
    gcn = official.l2norm(torch.randn(5, 6, D, dtype=torch.float64))
    loss = module(image=Local(gcn, torch.ones(5, 6, dtype=torch.bool)), tokens=tokens,
                  positives=torch.eye(5, dtype=torch.bool), epoch=0)
    labels = torch.stack([official.caption_label_mask(tokens.ids[i, :n].tolist(), MAX_LEN)[0]
                          for i, n in enumerate(LENGTHS)])
    masks = torch.stack([official.caption_label_mask(tokens.ids[i, :n].tolist(), MAX_LEN)[1]
                         for i, n in enumerate(LENGTHS)]).double()
    expected = official.caption_loss(official_decoder_state(module), gcn, labels, masks, MAX_LEN)
    torch.testing.assert_close(loss, expected, **TOL)


def test_caption_loss_without_the_pad_target_drops_one_position_per_short_caption():
    module = caption_module(pad_after_end=False).eval()
    tokens = caption_batch(2, [3, 4])
    gcn = torch.randn(2, 6, D, dtype=torch.float64)
    loss = module(image=Local(gcn, torch.ones(2, 6, dtype=torch.bool)), tokens=tokens)
    labels = torch.stack([official.caption_label_mask(tokens.ids[i, :n].tolist(), MAX_LEN)[0] for i, n in
                          enumerate([3, 4])])
    masks = torch.stack([official.caption_label_mask(tokens.ids[i, :n].tolist(), MAX_LEN)[1] for i, n in
                         enumerate([3, 4])]).double()
    masks[0, 3] = masks[1, 4] = 0  # the <pad> after <end>
    expected = official.caption_loss(official_decoder_state(module), gcn, labels, masks, MAX_LEN)
    torch.testing.assert_close(loss, expected, **TOL)


def test_caption_loss_reads_only_valid_regions():
    module = caption_module().eval()
    tokens = caption_batch(3, [5, 4, 3])
    x = torch.randn(3, 6, D, dtype=torch.float64)
    lengths = [6, 2, 4]
    image = padded(x, lengths, 9)
    loss = module(image=image, tokens=tokens)
    sd = official_decoder_state(module)
    expected = 0
    for i, n in enumerate(lengths):  # each image alone, with its own regions only
        lab, m = official.caption_label_mask(tokens.ids[i, :int(tokens.lengths[i])].tolist(), MAX_LEN)
        expected = expected + official.caption_loss(sd, x[i:i + 1, :n], lab[None], m[None].double(), MAX_LEN)
    torch.testing.assert_close(loss, expected / 3, **TOL)
    feats = image.feats.clone().requires_grad_(True)
    module.train()(image=Local(feats, image.mask), tokens=tokens).backward()
    assert torch.isfinite(feats.grad).all() and (feats.grad[~image.mask] == 0).all()


def test_caption_training_reaches_every_parameter():
    module = caption_module().train()
    tokens = caption_batch(4, LENGTHS)
    gcn = torch.randn(5, 6, D, dtype=torch.float64, requires_grad=True)
    module(image=Local(gcn, torch.ones(5, 6, dtype=torch.bool)), tokens=tokens).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert gcn.grad.abs().sum() > 0


def test_caption_module_keeps_the_official_parameter_names_and_shapes():
    module = Caption().build(image=LocalPort(2048), tokens=TokensPort(10006))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "encoder.vid2hid.weight": (512, 2048), "encoder.vid2hid.bias": (512,),
        "encoder.rnn.weight_ih_l0": (1536, 512), "encoder.rnn.weight_hh_l0": (1536, 512),
        "encoder.rnn.bias_ih_l0": (1536,), "encoder.rnn.bias_hh_l0": (1536,),
        "decoder.embedding.weight": (10006, 300),
        "decoder.attention.linear1.weight": (512, 1024), "decoder.attention.linear1.bias": (512,),
        "decoder.attention.linear2.weight": (1, 512),
        "decoder.rnn.weight_ih_l0": (1536, 812), "decoder.rnn.weight_hh_l0": (1536, 512),
        "decoder.rnn.bias_ih_l0": (1536,), "decoder.rnn.bias_hh_l0": (1536,),
        "decoder.out.weight": (10006, 512), "decoder.out.bias": (10006,),
    }


# ================================================================================ recipes


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"vsrn_f30k.toml", "vsrn_coco.toml", "vsrn_shapes.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_vsrn_recipe_builds_and_trains_one_step(path):
    recipe = load_recipe(path, overrides=["recipe.embed_dim=8", "text.encoder.word_dim=6"]
                         + [f"objective[{i}].{k}={v}" for i in range(len(recipe_objectives(path)))
                            for k, v in (("hidden_dim", 6), ("word_dim", 5))])
    model = build_model(recipe, DataPorts(feature_dim=F_DIM, vocab_size=V))
    model.train()
    regions = Regions(torch.rand(4, 5, F_DIM), torch.tensor([5, 3, 5, 4]))
    loss, scores = model(regions, caption_batch(5, [4, 6, 3, 5]), torch.arange(4))
    loss.backward()
    assert scores.shape == (4, 4) and torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def recipe_objectives(path: Path) -> list:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f).get("objective", [])
