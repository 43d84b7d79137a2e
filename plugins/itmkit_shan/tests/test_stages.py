"""SHAN's stages against the per-pair reference of the paper's equations, padding, variants, memory, conformance."""

from __future__ import annotations

import pytest
import torch

from itmkit.plugins import get_registry
from itmkit.stage import PortError
from itmkit.testing import CHECKS, LargestAllocation, check_stage
from itmkit.types import GlobalPort, Local, LocalPort, lengths_to_mask
from itmkit_shan.hierarchy import GlobalToLocal, StepwiseHierarchy, global_alignment, zero_padding
from itmkit_shan.stages import GlobalToLocalStage, Hierarchy
from itmkit_shan.tests import reference

STAGES = [Hierarchy, GlobalToLocalStage]
TOL = dict(rtol=0, atol=1e-7)  # float64 against the float64 reference


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


def local(batch: int, length: int, dim: int, seed: int, *, dtype=torch.float64, full: bool = False) -> Local:
    """Random fragments with varied lengths (first item full) and large noise in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((batch,), length) if full else torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = lengths_to_mask(lengths, length)
    feats = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    feats = torch.where(mask[..., None], feats, 100 * torch.randn(feats.shape, generator=g, dtype=dtype))
    return Local(feats, mask)


def block(seed: int = 0, ni: int = 3, nt: int = 4, k: int = 5, n: int = 6, dim: int = 8):
    return local(ni, k, dim, seed), local(nt, n, dim, seed + 1)


def hierarchy(seed: int = 0, dim: int = 8, **settings) -> StepwiseHierarchy:
    torch.manual_seed(seed)
    module = StepwiseHierarchy(dim=dim, **settings).double()
    with torch.no_grad():  # biases away from their zero init, so the reference reads them too
        for p in module.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return module


def valid(x: Local, item: int) -> torch.Tensor:
    return x.feats[item][x.mask[item]]


def reference_block(module, image: Local, text: Local) -> torch.Tensor:
    return torch.stack([torch.stack([reference.shan_pair(module, valid(image, i), valid(text, t))
                                     for t in range(text.feats.shape[0])]) for i in range(image.feats.shape[0])])


SETTINGS = [
    {},  # SHAN-full as the recipes run it
    {"variant": "t2i"},
    {"variant": "i2t"},
    {"steps": "l2l"},
    {"steps": "l2l+g2l"},
    {"variant": "t2i", "steps": "l2l"},
    {"variant": "i2t", "steps": "l2l+g2l", "l2l_pool": "mean"},
    {"l2l_pool": "mean", "normalize_affinity": False, "lambda_softmax": 2.0},
    {"gate": "scalar", "g2l_temperature": 0.1, "mu1": 0.8, "mu2": 0.1},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "full")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_hierarchy_equals_the_per_pair_reference(settings, grad):
    """Both code paths (in-place scoring, autograd training) equal eq. 3-16 written out pair by pair."""
    module = hierarchy(**settings)
    image, text = block()
    with torch.set_grad_enabled(grad):
        fast = module(image=image, text=text)
    with torch.no_grad():
        slow = reference_block(module, image, text)
    torch.testing.assert_close(fast, slow, **TOL)


@pytest.mark.parametrize("settings", [{}, {"gate": "vector"}, {"variant": "t2i", "normalize_affinity": False}],
                         ids=["full", "vector_gate", "t2i_bilinear"])
def test_gradients_equal_the_reference_gradients(settings):
    """Training sees the same function: d(sum of scores)/d(every weight and every valid input) as the reference's."""
    module = hierarchy(**settings)
    image, text = block(seed=14, ni=2, nt=3)
    grads = []
    for forward in (lambda v, t: module(image=Local(v, image.mask), text=Local(t, text.mask)),
                    lambda v, t: reference_block(module, Local(v, image.mask), Local(t, text.mask))):
        module.zero_grad()
        v, t = image.feats.clone().requires_grad_(), text.feats.clone().requires_grad_()
        forward(v, t).sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()] + [v.grad[image.mask], t.grad[text.mask]])
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, **TOL)


@pytest.mark.parametrize("variant", ["full", "t2i", "i2t"])
def test_a_caption_scored_in_a_block_equals_it_scored_alone(variant):
    """Padding is masked everywhere: each caption cut to its length, each image to its regions, gives the same score."""
    module = hierarchy(variant=variant, dim=16).float()
    image, text = local(4, 9, 16, 3, dtype=torch.float32), local(5, 7, 16, 4, dtype=torch.float32)
    with torch.no_grad():
        scores = module(image=image, text=text)
        for i in range(4):
            for t in range(5):
                alone = module(image=image.select(slice(i, i + 1)), text=text.select(slice(t, t + 1)))
                torch.testing.assert_close(scores[i, t], alone[0, 0], rtol=0, atol=1e-5)


def test_sum_and_mean_pooling_of_eq_7_differ_by_the_fragment_counts():
    """L2L alone, one direction: 'sum' (as printed) is 'mean' (as the text says) times the number of words."""
    image, text = block(seed=5)
    scores = {how: hierarchy(variant="t2i", steps="l2l", l2l_pool=how)(image=image, text=text).detach()
              for how in ("sum", "mean")}
    torch.testing.assert_close(scores["sum"], scores["mean"] * text.mask.sum(1)[None].double(), **TOL)


def test_the_variants_keep_what_the_docs_say():
    image, text = block(seed=6)
    full, t2i, i2t = (hierarchy(variant=v) for v in ("full", "t2i", "i2t"))
    assert full.image_fusion is not None and full.text_fusion is not None
    assert t2i.image_fusion is None and t2i.text_fusion is not None  # only the words are fused and pooled
    assert i2t.image_fusion is not None and i2t.text_fusion is None
    # one direction: mu1 and mu2 balance nothing
    for variant in ("t2i", "i2t"):
        a = hierarchy(variant=variant, mu1=0.1, mu2=0.2)(image=image, text=text)
        b = hierarchy(variant=variant, mu1=0.9, mu2=0.7)(image=image, text=text)
        torch.testing.assert_close(a, b, **TOL)
    assert not hierarchy(steps="l2l").image_fusion  # the L2L ablation builds no fusion weights


def test_steps_add_up():
    """S = S_L2L + S_G2L + S_G2G: the ablations of Table 3 are partial sums of one model (same seed, same
    weights), and the G2L and G2G increments are cosines (G2L a convex combination of two), in [-1, 1]."""
    image, text = block(seed=7)
    with torch.no_grad():
        s1, s12, s123 = (hierarchy(steps=s)(image=image, text=text) for s in ("l2l", "l2l+g2l", "l2l+g2l+g2g"))
    g2l, g2g = s12 - s1, s123 - s12
    assert g2l.abs().max() <= 1 + 1e-12 and g2g.abs().max() <= 1 + 1e-12
    assert s1.abs().max() > 1  # eq. 7 sums: L2L runs over all fragments, well beyond one cosine
    assert not torch.allclose(g2l, g2g)


def test_an_image_with_fewer_regions_is_scored_on_its_own_regions():
    module = hierarchy()
    image, text = block(seed=8)
    short = Local(image.feats[:, :3], image.mask[:, :3])  # the same images cut to 3 region slots ...
    wide = Local(torch.cat([short.feats, torch.full_like(image.feats[:, :2], float("inf"))], dim=1),
                 torch.cat([short.mask, torch.zeros_like(image.mask[:, :2])], dim=1))  # ... then 2 slots of inf
    with torch.no_grad():
        torch.testing.assert_close(module(image=wide, text=text), module(image=short, text=text), **TOL)


# --------------------------------------------------------------------------- shan.global_to_local


@pytest.mark.parametrize("variant", ["full", "t2i", "i2t"])
@pytest.mark.parametrize("steps", ["g2l+g2g", "g2l", "g2g"])
def test_global_to_local_equals_the_reference(variant, steps):
    image, text = block(seed=9)
    g = torch.Generator().manual_seed(10)
    v_c, t_c = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    module = GlobalToLocal(variant=variant, steps=steps, mu2=0.3, g2l_temperature=0.5)
    fast = module(image=image, text=text, image_global=v_c, text_global=t_c)
    iq, tq = variant in ("full", "i2t"), variant in ("full", "t2i")
    slow = torch.stack([torch.stack([
        reference.global_steps(v_c[i], t_c[t], valid(image, i), valid(text, t), image_queries=iq, text_queries=tq,
                               mu2=0.3, temperature=0.5, g2l="g2l" in steps, g2g="g2g" in steps)
        for t in range(4)]) for i in range(3)])
    torch.testing.assert_close(fast, slow, **TOL)


def test_both_stages_share_the_global_steps():
    """shan.hierarchy's steps 2-3 are global_alignment on its fused contexts; shan.global_to_local is the same
    function on pooled vectors: SHAN-T2I's G2L + G2G equals global_to_local (t2i) fed the region means as v_c
    and t_c computed by the hierarchy."""
    image, text = block(seed=11)
    module = hierarchy(variant="t2i")
    with torch.no_grad():
        total = module(image=image, text=text)
        l2l = hierarchy(variant="t2i", steps="l2l")(image=image, text=text)
        # the text context of every pair, recomputed by the reference, and the mean of the regions
        def word_attended(i, t):  # v*_j of eq. 5 for every valid word j of caption t over image i
            beta = torch.softmax(module.lambda_softmax * _affinity(module, image, text, i, t), dim=0)  # (k, n)
            return list(beta.T @ valid(image, i))

        t_c = torch.stack([torch.stack([reference.fuse_and_pool(module.text_fusion, valid(text, t), word_attended(i, t))
                                        for t in range(4)]) for i in range(3)])
        v_mean = torch.stack([valid(image, i).mean(0) for i in range(3)])
        steps = global_alignment(v_mean[:, None], t_c, zero_padding(image), zero_padding(text), image_queries=False,
                                 text_queries=True, mu2=0.5)
    torch.testing.assert_close(total - l2l, steps, **TOL)


def _affinity(module, image, text, i, t):
    pv, pt = module.affinity_image(valid(image, i)), module.affinity_text(valid(text, t))
    pv, pt = pv / (pv.norm(dim=1, keepdim=True) + 1e-8), pt / (pt.norm(dim=1, keepdim=True) + 1e-8)
    return pv @ pt.T


# --------------------------------------------------------------------------- ports, memory


def test_mismatched_widths_are_a_port_error():
    with pytest.raises(PortError, match="same embed_dim"):
        Hierarchy().ports(image=LocalPort(256), text=LocalPort(128))
    with pytest.raises(PortError, match="text_global 64"):
        GlobalToLocalStage().ports(image=LocalPort(32), text=LocalPort(32), image_global=GlobalPort(32),
                                   text_global=GlobalPort(64))


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_no_tensor_of_a_scoring_block_exceeds_its_budget(gate):
    """The largest single tensor of a no-grad forward fits the block's pair_bytes budget. With a scalar gate
    no (Lq, D) array exists per pair (the largest are (k, n) per pair); a vector gate needs the fused fragments."""
    ni, nt, k, n, d = 8, 8, 36, 12, 64
    image, text = local(ni, k, d, 12, dtype=torch.float32), local(nt, n, d, 13, dtype=torch.float32)
    spec = Hierarchy(gate=gate)
    module = spec.build(image=LocalPort(d), text=LocalPort(d))
    budget = ni * nt * spec.pair_bytes(text_len=n, image_len=k, ports={"image": LocalPort(d), "text": LocalPort(d)})
    with torch.no_grad(), LargestAllocation() as recorder:
        module(image=image, text=text)
    assert recorder.largest <= budget // 2, f"a {recorder.largest:,}-byte tensor in a block budgeted at {budget:,}"
    if gate == "scalar":
        assert recorder.largest <= ni * nt * k * n * 4
    else:
        assert recorder.largest >= ni * nt * k * d * 4


def test_pair_bytes_grows_with_both_lengths_and_the_wired_width():
    spec = Hierarchy()
    wide, narrow = ({"image": LocalPort(d), "text": LocalPort(d)} for d in (1024, 256))
    assert spec.pair_bytes(text_len=12, image_len=36, ports=wide) < spec.pair_bytes(text_len=24, image_len=36, ports=wide)
    assert spec.pair_bytes(text_len=12, image_len=36, ports=wide) < spec.pair_bytes(text_len=12, image_len=48, ports=wide)
    assert spec.pair_bytes(text_len=12, image_len=36, ports=narrow) < spec.pair_bytes(text_len=12, image_len=36, ports=wide)
