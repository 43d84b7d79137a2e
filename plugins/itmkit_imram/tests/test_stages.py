"""IMRAM's stages against the official algorithm (per-caption shard loop) and a per-pair reference, to 1e-5."""

from __future__ import annotations

import pytest
import torch

from itmkit.testing import check_stage
from itmkit.types import Local, lengths_to_mask
from itmkit_bfan.tests.official import focal_attention
from itmkit_imram.stages import ImageToText, Steps, TextToImage
from itmkit_imram.tests import official
from itmkit_scan.tests.official import cosine, func_attention

D = 16
TOL = dict(rtol=0, atol=1e-5)


def sides(seed: int, n_images=5, n_captions=7, regions=9, words=8, image_lens=None, dtype=torch.float64):
    """l2-normalised regions and words (as the encoders give them), captions of lengths 1..words, zero-padded."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, regions, D, generator=g, dtype=dtype), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_captions, words, D, generator=g, dtype=dtype), dim=-1)
    lengths = torch.randint(1, words + 1, (n_captions,), generator=g)
    lengths[0] = words
    captions = captions * lengths_to_mask(lengths, words)[..., None]
    image_lens = torch.full((n_images,), regions) if image_lens is None else image_lens
    images = images * lengths_to_mask(image_lens, regions)[..., None]
    return (Local(images, lengths_to_mask(image_lens, regions)), Local(captions, lengths_to_mask(lengths, words)),
            lengths)


def modules(steps, lambda_softmax=9.0, raw_norm="clipped_l2norm", renormalize=False, focal="none", seed=0):
    kw = dict(steps=steps, lambda_softmax=lambda_softmax, raw_feature_norm=raw_norm, renormalize=renormalize,
              focal=focal)
    from itmkit.types import LocalPort

    torch.manual_seed(seed)
    t2i = TextToImage(**kw).build(image=LocalPort(D), text=LocalPort(D)).double()
    i2t = ImageToText(**kw).build(image=LocalPort(D), text=LocalPort(D)).double()
    with torch.no_grad():  # larger than nn.Linear's init, so that the gate and memory matter
        for m in (t2i, i2t):
            for p in m.parameters():
                p.normal_(0, 0.5)
    return t2i, i2t


def weights_of(t2i, i2t) -> dict:
    return {f"{name}_{suffix}": {"weight": getattr(m, name).weight.detach(), "bias": getattr(m, name).bias.detach()}
            for suffix, m in (("t2i", t2i), ("i2t", i2t)) for name in ("linear", "gate")}


def ours(module, image, text, pool="mean"):
    with torch.no_grad():
        return Steps(pool=pool).build(x=None)(module(image=image, text=text))


CASES = {
    "K=1": dict(steps=1),
    "K=2": dict(steps=2),
    "K=3 (COCO script, lambda 11)": dict(steps=3, lambda_softmax=11.0),
    "K=3 renormalised memory": dict(steps=3, renormalize=True),
    "K=2 l2norm raw norm": dict(steps=2, raw_norm="l2norm"),
    "K=3 softmax raw norm": dict(steps=3, raw_norm="softmax", lambda_softmax=4.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_mode_equals_the_official_shard_loop(case):
    image, text, lengths = sides(seed=len(str(case)))
    t2i, i2t = modules(case["steps"], case.get("lambda_softmax", 9.0), case.get("raw_norm", "clipped_l2norm"),
                       case.get("renormalize", False))
    kw = dict(steps=case["steps"], smooth=case.get("lambda_softmax", 9.0),
              raw_norm=case.get("raw_norm", "clipped_l2norm"), renormalize=case.get("renormalize", False),
              weights=weights_of(t2i, i2t), shard=3)  # shards of 3: several blocks of both sides
    text_scores, image_scores = ours(t2i, image, text), ours(i2t, image, text)
    for mode, got in (("text", text_scores), ("image", image_scores), ("full", text_scores + image_scores)):
        expected = official.shard_scores(image.feats, text.feats, lengths, mode=mode, **kw)
        torch.testing.assert_close(got, torch.from_numpy(expected), **TOL)


def test_float32_equals_the_official_loop_in_float64():
    image, text, lengths = sides(seed=3)
    t2i, i2t = modules(3)
    expected = official.shard_scores(image.feats, text.feats, lengths, mode="full", steps=3, smooth=9.0,
                                     weights=weights_of(t2i, i2t))
    single = [Local(x.feats.float(), x.mask) for x in (image, text)]
    got = ours(t2i.float(), *single) + ours(i2t.float(), *single)
    torch.testing.assert_close(got.double(), torch.from_numpy(expected), **TOL)


def test_each_step_is_its_own_channel():
    """The stage's K channels are the K per-step matrices of the official code, in order."""
    image, text, lengths = sides(seed=4)
    t2i, i2t = modules(3)
    with torch.no_grad():
        sims = t2i(image=image, text=text)
    per_step = official.direction_steps(image.feats, text.feats, lengths, side="text", steps=3, smooth=9.0,
                                        raw_norm="clipped_l2norm", renormalize=False,
                                        linear=weights_of(t2i, i2t)["linear_t2i"], gate=weights_of(t2i, i2t)["gate_t2i"])
    assert sims.sims.shape == (5, 7, 8, 3)
    for k, expected in enumerate(per_step):
        mean = (sims.sims[..., k] * sims.mask).sum(-1) / sims.mask.sum(-1)
        torch.testing.assert_close(mean, expected, **TOL)


def pair_reference(module, image_feats, caption, side, focal):
    """One (image, caption) pair, both sliced: K steps with focal attention, literal loops (BFAN's reference)."""
    fragments, context = (caption, image_feats) if side == "text" else (image_feats, caption)
    query, total = fragments, 0.0
    for _ in range(module.steps):
        if focal == "none":
            attended = func_attention(query[None], context[None], "clipped_l2norm", module.lambda_softmax)[0]
        else:
            attended = focal_attention(query, context, module.lambda_softmax, focal) @ context
        total += float(cosine(fragments[None], attended[None]).mean())
        both = torch.cat([query, attended], 1)
        g = torch.sigmoid(module.gate(both))
        query = query * g + torch.tanh(module.linear(both)) * (1 - g)
    return total


@pytest.mark.parametrize("focal", ["none", "equal", "prob"])
@pytest.mark.parametrize("side", ["text", "image"])
def test_images_with_fewer_regions_and_focal_attention_equal_each_pair_alone(focal, side):
    image_lens = torch.tensor([9, 4, 1, 6])
    image, text, lengths = sides(seed=5, n_images=4, n_captions=5, image_lens=image_lens)
    t2i, i2t = modules(3, focal=focal)
    module = t2i if side == "text" else i2t
    got = ours(module, image, text)
    with torch.no_grad():
        for i in range(4):
            for t in range(5):
                expected = pair_reference(module, image.feats[i, : int(image_lens[i])], text.feats[t, : int(lengths[t])],
                                          side, focal)
                assert abs(float(got[i, t]) - expected) < 1e-9, (i, t)


@pytest.mark.parametrize("pool", ["max", "sum", "lse"])
def test_other_step_pools_pool_each_step_then_add(pool):
    image, text, lengths = sides(seed=6)
    t2i, _ = modules(2)
    with torch.no_grad():
        sims = t2i(image=image, text=text)
    got = Steps(pool=pool, lambda_lse=5.0).build(x=None)(sims)
    for i in range(image.feats.shape[0]):
        for t in range(text.feats.shape[0]):
            expected = 0.0
            for k in range(2):
                r = sims.sims[i, t, : int(lengths[t]), k]
                expected += float({"max": r.max(), "sum": r.sum(), "lse": torch.log(torch.exp(5.0 * r).sum()) / 5.0}[pool])
            assert abs(float(got[i, t]) - expected) < 1e-9


def test_gradients_reach_the_memory_weights_only_from_step_two():
    image, text, _ = sides(seed=7, dtype=torch.float32)
    t2i, _ = modules(2)
    t2i = t2i.float()
    Steps().build(x=None)(t2i(image=image, text=text)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t2i.parameters())
    one, _ = modules(1)
    one = one.float()
    regions = image.feats.clone().requires_grad_()
    Steps().build(x=None)(one(image=Local(regions, image.mask), text=text)).sum().backward()
    assert regions.grad.abs().sum() > 0
    assert all(p.grad is None for p in one.parameters())  # K = 1 is SCAN's AVG: the memory is never read


def test_pair_bytes_grows_with_the_wired_width():
    from itmkit.types import LocalPort

    small = TextToImage().pair_bytes(text_len=12, image_len=36, ports={"image": LocalPort(256), "text": LocalPort(256)})
    large = TextToImage().pair_bytes(text_len=12, image_len=36, ports={"image": LocalPort(1024), "text": LocalPort(1024)})
    assert large > 3 * small
    assert TextToImage(steps=1).pair_bytes(text_len=12, image_len=36) < small


@pytest.mark.parametrize("cls", [TextToImage, ImageToText, Steps])
def test_conformance(cls):
    check_stage(cls)


@pytest.mark.parametrize("renormalize", [False, True])
def test_scoring_and_training_paths_give_the_same_scores(renormalize):
    """The no-grad update (one fused product, in place) and the autograd one compute the same memory."""
    image, text, _ = sides(seed=8, image_lens=torch.tensor([9, 3, 9, 5, 9]))
    t2i, i2t = modules(3, renormalize=renormalize)
    for module in (t2i, i2t):
        scored = ours(module, image, text)
        trained = Steps().build(x=None)(module(image=image, text=text)).detach()
        torch.testing.assert_close(scored, trained, rtol=0, atol=1e-12)
