"""caan.attention against a slow per-pair reference written from the paper's equations, options, padding, memory."""

from __future__ import annotations

import itertools
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from itmkit.plugins import get_registry
from itmkit.stage import PortError
from itmkit.testing import CHECKS, check_stage
from itmkit.types import Local, LocalPort, lengths_to_mask
from itmkit_caan.stages import Attention

TOL = dict(rtol=0, atol=1e-10)  # float64 throughout: the fast path equals the reference to rounding
EPS = 1e-8
# (intra_modal, inter_modal): the paper's model and each ablation row of its Table 4 that has attention
VARIANTS = [("semantic", True), ("semantic", False), ("feature", True), ("feature", False), ("none", True)]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(check):
    check(Attention)


def test_registered_by_the_entry_point():
    registry = get_registry()
    check_stage(Attention, registry=registry)
    assert registry.owners[Attention.name] == "caan"


def local(batch: int, length: int, dim: int, seed: int, *, dtype=torch.float64) -> Local:
    """Random fragments with varied lengths (first item full) and large noise in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = lengths_to_mask(lengths, length)
    feats = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    feats = torch.where(mask[..., None], feats, 100 * torch.randn(feats.shape, generator=g, dtype=dtype))
    return Local(feats, mask)


def build(dim: int = 8, width: int = 5, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = Attention(width=width, **options)
    return spec.build(image=LocalPort(dim), text=LocalPort(dim)).double().eval()


# ------------------------------------------------------------------ the paper, one pair at a time


def root(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x), with the finite gradient 0 at x = 0 (sqrt's is infinite, and 0 x inf is NaN)."""
    return torch.sqrt(x.clamp_min(torch.finfo(x.dtype).tiny))


def norm(x: torch.Tensor) -> torch.Tensor:
    """norm(.) of eq. 16-17: the vector over its l2 norm (SCAN's + 1e-8, so that a zero vector stays 0)."""
    return x / (root((x * x).sum()) + EPS)


def reference_pair(module, V: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f, g and S for one image V (D x n, columns = regions) and one caption U (D x m), as printed.

    Matrices in the paper's column convention: a weight stored as nn.Linear(in, out) maps x to
    x W^T, so K = k.weight^T, Q_i = q_i.weight^T, M_i = m_i.weight^T, w_v = w_v.weight[0].
    """
    (_, n), (_, m) = V.shape, U.shape
    intra, inter = module.intra, module.inter
    if module.k is not None:
        Vh, Uh = V, U
        if module.normalize_h_inputs:
            Vh = torch.stack([norm(V[:, i]) for i in range(n)], dim=1)
            Uh = torch.stack([norm(U[:, j]) for j in range(m)], dim=1)
        H = torch.tanh(Vh.T @ module.k.weight.T @ Uh)  # eq. 7
        Hp = torch.clamp(H, min=0)
        H_uv = torch.zeros(n, m, dtype=V.dtype)
        H_vu = torch.zeros(n, m, dtype=V.dtype)
        for i in range(n):
            for j in range(m):
                H_uv[i, j] = Hp[i, j] / (root(sum(Hp[k, j] ** 2 for k in range(n))) + EPS)  # eq. 12
                H_vu[i, j] = Hp[i, j] / (root(sum(Hp[i, k] ** 2 for k in range(m))) + EPS)  # eq. 13
    if intra == "semantic":
        rows = torch.stack([norm(H_uv[i, :]) for i in range(n)])  # eq. 16
        H_v = rows @ rows.T
        cols = torch.stack([norm(H_vu[:, j]) for j in range(m)])  # eq. 17: the words' responses
        H_u = cols @ cols.T
    elif intra == "feature":
        H_v = V.T @ module.m1.weight.T @ V  # eq. 14
        H_u = U.T @ module.m2.weight.T @ U  # eq. 15
    f_pre = torch.zeros(n, module.w_v.weight.shape[1], dtype=V.dtype)
    g_pre = torch.zeros(m, module.w_u.weight.shape[1], dtype=V.dtype)
    if intra != "none":
        f_pre = f_pre + H_v @ V.T @ module.q1.weight.T
        g_pre = g_pre + H_u @ U.T @ module.q3.weight.T
    if inter:
        f_pre = f_pre + H_uv @ U.T @ module.q2.weight.T
        g_pre = g_pre + H_vu.T @ V.T @ module.q4.weight.T
    f = torch.softmax(torch.tanh(f_pre) @ module.w_v.weight[0], dim=0)  # eq. 8-9
    g = torch.softmax(torch.tanh(g_pre) @ module.w_u.weight[0], dim=0)  # eq. 10-11
    v_hat, u_hat = V @ f, U @ g  # eq. 5-6
    if module.normalize:
        v_hat, u_hat = norm(v_hat), norm(u_hat)
    return f, g, v_hat @ u_hat


def reference(module, image: Local, text: Local):
    """Scores (Ni, Nt) and the per-pair weights, every pair computed alone on its unpadded fragments."""
    ni, nt = image.feats.shape[0], text.feats.shape[0]
    scores = torch.zeros(ni, nt, dtype=image.feats.dtype)
    weights = {}
    for i, t in itertools.product(range(ni), range(nt)):
        V = image.feats[i, image.mask[i]].T
        U = text.feats[t, text.mask[t]].T
        f, g, scores[i, t] = reference_pair(module, V, U)
        weights[i, t] = (f, g)
    return scores, weights


# ------------------------------------------------------------------ the stage against the reference

# (regions, words): 2 m < n takes the factored N (N^T V Q1) product, else H^v is formed
SHAPES = [(9, 4), (5, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}m{s[1]}")
@pytest.mark.parametrize("normalize_h_inputs", [False, True], ids=["raw-H", "l2-H"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "inner"])
@pytest.mark.parametrize("intra,inter", VARIANTS, ids=lambda v: str(v))
def test_scores_and_weights_equal_the_paper_pair_by_pair(intra, inter, normalize, normalize_h_inputs, shape):
    n, m = shape
    module = build(intra_modal=intra, inter_modal=inter, normalize=normalize, normalize_h_inputs=normalize_h_inputs)
    image, text = local(3, n, 8, seed=1), local(4, m, 8, seed=2)
    with torch.no_grad():
        scores = module(image=image, text=text)
        f, g = module.attention(image, text)
        expected, weights = reference(module, image, text)
    torch.testing.assert_close(scores, expected, **TOL)
    for (i, t), (rf, rg) in weights.items():
        torch.testing.assert_close(f[i, t, image.mask[i]], rf, **TOL)
        torch.testing.assert_close(g[i, t, text.mask[t]], rg, **TOL)
        assert not f[i, t, ~image.mask[i]].any() and not g[i, t, ~text.mask[t]].any()


@pytest.mark.parametrize("intra,inter", VARIANTS, ids=lambda v: str(v))
def test_a_block_scores_each_pair_as_it_scores_alone(intra, inter):
    module = build(intra_modal=intra, inter_modal=inter)
    image, text = local(3, 10, 8, seed=3), local(5, 7, 8, seed=4)
    with torch.no_grad():
        block = module(image=image, text=text)
        for i, t in itertools.product(range(3), range(5)):
            alone = module(image=image.select(slice(i, i + 1)), text=text.select(slice(t, t + 1)))
            torch.testing.assert_close(block[i, t], alone[0, 0], **TOL)


def test_training_mode_gives_the_scoring_mode_scores():
    # the in-place tanh_ / add_ must give the same values with autograd on
    module = build()
    image, text = local(2, 9, 8, seed=5), local(3, 4, 8, seed=6)
    with torch.no_grad():
        expected = module(image=image, text=text)
    torch.testing.assert_close(module.train()(image=image, text=text), expected, **TOL)


@pytest.mark.parametrize("intra,inter", VARIANTS, ids=lambda v: str(v))
def test_gradients_equal_the_reference_and_ignore_padding(intra, inter):
    module = build(intra_modal=intra, inter_modal=inter)
    image, text = local(2, 9, 8, seed=7), local(3, 4, 8, seed=8)
    image.feats.requires_grad_(True)
    text.feats.requires_grad_(True)
    leaves = [image.feats, text.feats, *module.parameters()]
    ours = torch.autograd.grad(module(image=image, text=text).sum(), leaves)
    ref = torch.autograd.grad(reference(module, image, text)[0].sum(), leaves)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert not ours[0][~image.mask].any() and not ours[1][~text.mask].any()


def test_only_the_weights_of_the_terms_in_use_exist():
    def names(**options):
        return {n.split(".")[0] for n, _ in build(**options).named_parameters()}

    assert names() == {"k", "q1", "q2", "q3", "q4", "w_v", "w_u"}  # CAAN: SA + IA
    assert names(intra_modal="semantic", inter_modal=False) == {"k", "q1", "q3", "w_v", "w_u"}  # SA reads H
    assert names(intra_modal="feature", inter_modal=False) == {"m1", "m2", "q1", "q3", "w_v", "w_u"}  # no H
    assert names(intra_modal="feature") == {"k", "m1", "m2", "q1", "q2", "q3", "q4", "w_v", "w_u"}
    assert names(intra_modal="none") == {"k", "q2", "q4", "w_v", "w_u"}


def test_cosine_scores_are_bounded_and_the_inner_product_is_not():
    image, text = local(3, 6, 8, seed=9), local(4, 5, 8, seed=10)
    image = Local(image.feats * 10, image.mask)
    with torch.no_grad():
        assert build()(image=image, text=text).abs().max() <= 1
        assert build(normalize=False)(image=image, text=text).abs().max() > 1


# ------------------------------------------------------------------ ports


def test_ports_explain_width_problems_and_the_empty_variant():
    with pytest.raises(PortError, match=r"regions \(width 32\) and words \(width 16\) must have one width"):
        Attention().ports(image=LocalPort(32), text=LocalPort(16))
    with pytest.raises(PortError, match="core.mean"):
        Attention(intra_modal="none", inter_modal=False).ports(image=LocalPort(16), text=LocalPort(16))
    assert Attention().ports(image=LocalPort(16), text=LocalPort(16)).dim == 1


# ------------------------------------------------------------------ memory and size


class PeakLive(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside the block (inputs and weights excluded).

    Every operator output is counted once per storage while any tensor on it is alive.
    """

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        known = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs and key in known:
                continue  # a view of an input or a weight, or an in-place result
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                self.current += self.sizes[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


@pytest.mark.parametrize("n,m,width", [(36, 12, 64), (36, 24, 32), (20, 20, 48), (10, 30, 16)])
def test_pair_bytes_is_the_measured_peak_of_a_block(n, m, width):
    spec = Attention(width=width)
    torch.manual_seed(0)
    module = spec.build(image=LocalPort(64), text=LocalPort(64)).eval()
    ni, nt = 16, 24
    image, text = local(ni, n, 64, seed=11, dtype=torch.float32), local(nt, m, 64, seed=12, dtype=torch.float32)
    with torch.no_grad(), PeakLive() as memory:
        module(image=image, text=text)
    estimate = spec.pair_bytes(text_len=m, image_len=n, ports={"image": LocalPort(64), "text": LocalPort(64)}) * ni * nt
    # what is held per item, not per pair: the zero-padded V, U and their products with K, Q1..Q4
    items = 4 * (ni * n + nt * m) * (2 * 64 + 2 * width)
    assert 0.9 * estimate <= memory.peak <= estimate + items, (memory.peak, estimate, items)


def test_parameter_count_at_the_assumed_paper_sizes():
    # The paper reports 11 M parameters in all; at D = 1024, z = 256 the attention holds K (D x D),
    # Q1..Q4 (D x z) and w_v, w_u (z): 2.1 M, beside 2.1 M of region FC and 8.1 M of bi-GRU.
    module = Attention(width=256).build(image=LocalPort(1024), text=LocalPort(1024))
    assert sum(p.numel() for p in module.parameters()) == 1024 * 1024 + 4 * 1024 * 256 + 2 * 256 == 2_097_664
