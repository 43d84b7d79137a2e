"""MMCA's stages against slow per-item / per-pair references, the conformance kit, memory and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itmkit.plugins import get_registry
from itmkit.stage import PortError
from itmkit.testing import CHECKS, check_stage
from itmkit.types import Local, LocalPort, lengths_to_mask
from itmkit_mmca.stages import Cross, SelfAttention
from itmkit_saem.stages import SaemCnn

STAGES = [SelfAttention, Cross]
TOL = dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


def local(batch: int, length: int, dim: int, seed: int, *, dtype=torch.float64) -> Local:
    """Random fragments with varied lengths (first item full) and large noise in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = lengths_to_mask(lengths, length)
    feats = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    feats = torch.where(mask[..., None], feats, 100 * torch.randn(feats.shape, generator=g, dtype=dtype))
    return Local(feats, mask)


# ------------------------------------------------------------------ slow references (paper eq.)


def transformer_unit(layer, y: torch.Tensor, scale_by: str = "head") -> torch.Tensor:
    """One post-LN Transformer unit on one unpadded sequence y (L, d), written out from eq. 1-4 / 8-14."""
    length, d = y.shape
    h = layer.heads
    dh = d // h
    root = math.sqrt(dh if scale_by == "head" else d)
    q, k, v = layer.query(y), layer.key(y), layer.value(y)
    heads = []
    for j in range(h):
        part = slice(j * dh, (j + 1) * dh)
        weights = torch.softmax(q[:, part] @ k[:, part].T / root, dim=-1)
        heads.append(weights @ v[:, part])
    x = layer.attn_norm(y + layer.attn_out(torch.cat(heads, dim=-1)))
    act = F.relu if layer.activation == "relu" else F.gelu
    return layer.ffn_norm(x + layer.ffn_out(act(layer.ffn_in(x))))


def ngram_cnn(cnn, e: torch.Tensor) -> torch.Tensor:
    """q_l = max_k ReLU(W_l [e_k; ...; e_{k+l-1}] + b_l) over the windows inside e (n, D); FC; LN."""
    n = e.shape[0]
    pooled = []
    for size, conv in zip(cnn.widths, cnn.convs):
        w = conv.weight[:, 0].transpose(1, 2)  # (C, 1, size, D) -> (C, D, size)
        starts = range(max(n - size + 1, 1))  # a caption shorter than the window: one zero-padded window
        windows = []
        for s in starts:
            acc = conv.bias.clone()
            for o in range(size):
                if s + o < n:
                    acc = acc + w[:, :, o] @ e[s + o]
            windows.append(torch.relu(acc))
        pooled.append(torch.stack(windows).max(dim=0).values)
    out = cnn.fc(torch.cat(pooled))
    return cnn.norm(out) if cnn.norm is not None else out


def l2(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm() + 1e-8)


# ------------------------------------------------------------------ stages against the references


def test_self_attention_pool_equals_the_unit_over_each_image_alone():
    spec = SelfAttention(heads=4)
    torch.manual_seed(0)
    module = spec.build(x=LocalPort(16)).double().eval()
    x = local(5, 7, 16, seed=1)
    out = module(x)
    for b in range(5):
        valid = x.feats[b, x.mask[b]]
        expected = l2(transformer_unit(module.layer, valid).mean(dim=0))
        torch.testing.assert_close(out[b], expected, **TOL)


def cross_reference(module, image: Local, text: Local) -> torch.Tensor:
    """The paper's cross-attention score i1 . c1, one pair at a time on unpadded [R; E W_p]."""
    out = torch.zeros(image.feats.shape[0], text.feats.shape[0], dtype=image.feats.dtype)
    for i in range(image.feats.shape[0]):
        regions = image.feats[i, image.mask[i]]
        for t in range(text.feats.shape[0]):
            tokens = module.text_proj(text.feats[t, text.mask[t]])
            joint = transformer_unit(module.layer, torch.cat([regions, tokens]), module.attention_scale)
            k = regions.shape[0]
            i1 = l2(joint[:k].mean(dim=0))
            c1 = l2(ngram_cnn(module.text_head, joint[k:]))
            out[i, t] = i1 @ c1
    return out


@pytest.mark.parametrize("grad", [True, False], ids=["training", "scoring"])  # scoring runs in place
@pytest.mark.parametrize("heads,scale", [(1, "head"), (4, "head"), (4, "width")])
def test_cross_equals_one_unit_per_pair(heads, scale, grad):
    spec = Cross(embed_dim=16, heads=heads, channels=6, intermediate=24, attention_scale=scale)
    torch.manual_seed(2)
    module = spec.build(image=LocalPort(16), text=LocalPort(10)).double().eval()
    image, text = local(3, 6, 16, seed=3), local(4, 5, 10, seed=4)
    with torch.set_grad_enabled(grad):
        ours = module(image=image, text=text)
    with torch.no_grad():
        torch.testing.assert_close(ours, cross_reference(module, image, text), **TOL)


def test_cross_with_every_region_valid_skips_no_mask():
    spec = Cross(embed_dim=8, heads=2, channels=4)
    module = spec.build(image=LocalPort(8), text=LocalPort(8)).double().eval()
    image, text = local(2, 4, 8, seed=12), local(3, 4, 8, seed=13)
    image = Local(image.feats[:, :1], image.mask[:, :1])  # one region each: all valid
    with torch.no_grad():
        torch.testing.assert_close(module(image=image, text=text), cross_reference(module, image, text), **TOL)


def test_cross_gradients_equal_the_reference_and_ignore_padding():
    spec = Cross(embed_dim=8, heads=2, channels=4, activation="gelu")
    torch.manual_seed(3)
    module = spec.build(image=LocalPort(8), text=LocalPort(6)).double().eval()
    image, text = local(2, 4, 8, seed=5), local(3, 4, 6, seed=6)
    image.feats.requires_grad_(True)
    text.feats.requires_grad_(True)
    ours = torch.autograd.grad(module(image=image, text=text).sum(), [image.feats, text.feats, *module.parameters()])
    ref = torch.autograd.grad(cross_reference(module, image, text).sum(),
                              [image.feats, text.feats, *module.parameters()], allow_unused=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, **TOL)
    assert not ours[0][~image.mask].any() and not ours[1][~text.mask].any()


def test_cross_dropout_in_training_keeps_outputs_finite_and_pair_dependent():
    spec = Cross(embed_dim=8, heads=2, channels=4, dropout=0.5, head_dropout=0.5)
    module = spec.build(image=LocalPort(8), text=LocalPort(8)).train()
    out = module(image=local(3, 4, 8, seed=7, dtype=torch.float32), text=local(2, 5, 8, seed=8, dtype=torch.float32))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


# ------------------------------------------------------------------ ports, memory, sizes


def test_ports_explain_width_problems():
    with pytest.raises(PortError, match="embed_dim = 32"):
        Cross(embed_dim=16).ports(image=LocalPort(32), text=LocalPort(768))
    with pytest.raises(PortError, match="project_text"):
        Cross(embed_dim=32, project_text=False).ports(image=LocalPort(32), text=LocalPort(768))
    with pytest.raises(PortError, match="divisible"):
        SelfAttention(heads=16).ports(x=LocalPort(40))
    with pytest.raises(PortError, match="ngrams"):
        Cross(embed_dim=32, ngrams=[]).ports(image=LocalPort(32), text=LocalPort(32))


def test_pair_bytes_covers_the_largest_allocation_of_a_block():
    from itmkit.testing import LargestAllocation

    spec = Cross(embed_dim=32, heads=4, channels=16)
    module = spec.build(image=LocalPort(32), text=LocalPort(48)).eval()
    image, text = local(6, 9, 32, seed=9, dtype=torch.float32), local(7, 11, 48, seed=10, dtype=torch.float32)
    with torch.no_grad(), LargestAllocation() as record:
        module(image=image, text=text)
    assert record.largest <= spec.pair_bytes(text_len=11, image_len=9) * 6 * 7


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_the_paper_sizes():
    # The paper gives no parameter counts; these pin the sizes its text implies (d = 256, 16 heads,
    # FFN d x d, 256 filters per window over 768-d BERT states, FC 768 -> d) so a change shows up.
    d, bert = 256, 768
    unit = 4 * (d * d + d) + 2 * (d * d + d) + 2 * 2 * d  # Q, K, V, O; FFN W1, W2; two LayerNorms
    pool = SelfAttention().build(x=LocalPort(d))
    assert count(pool) == unit == 395_776
    text = SaemCnn(embed_dim=d, channels=256, layer_norm=True).build(x=LocalPort(bert))  # the c0 head
    cnn = sum(256 * bert * k + 256 for k in (1, 2, 3)) + (3 * 256 * d + d) + 2 * d
    assert count(text) == cnn == 1_377_792
    cross = Cross(embed_dim=d).build(image=LocalPort(d), text=LocalPort(bert))
    head = sum(256 * d * k + 256 for k in (1, 2, 3)) + (3 * 256 * d + d) + 2 * d
    assert count(cross) == (bert * d + d) + unit + head == 1_184_000


def test_the_one_product_n_gram_head_equals_saem_s_module():
    from itmkit_mmca.stages import ngram_head
    from itmkit_saem.modules import NgramCNN

    torch.manual_seed(4)
    cnn = NgramCNN(in_dim=10, channels=7, widths=(1, 2, 3), out_dim=9, layer_norm=True).double().eval()
    x = local(8, 5, 10, seed=11)
    assert int(x.lengths.min()) < 3
    torch.testing.assert_close(ngram_head(cnn, x.feats, x.mask), cnn(x.feats, x.mask), **TOL)
    long = x.lengths >= 3  # every caption holds the widest window: the padding is never read, nor zeroed
    torch.testing.assert_close(ngram_head(cnn, x.feats[long], x.mask[long]), cnn(x.feats[long], x.mask[long]), **TOL)
    assert (~x.mask[long]).any()
    short = Local(x.feats[:, :2], x.mask[:, :2])  # a block narrower than the widest window
    torch.testing.assert_close(ngram_head(cnn, short.feats, short.mask), cnn(short.feats, short.mask), **TOL)
