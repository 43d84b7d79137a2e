"""TransformerLayer and NgramCNN against the official BERTLayer and CNN head (tests/official.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itmkit_saem.modules import LAYER_KEYS, NgramCNN, TransformerLayer
from itmkit_saem.tests import official

TOL = dict(rtol=0, atol=1e-5)


def official_layer_state(layer: TransformerLayer) -> dict:
    sd = layer.state_dict()
    return {LAYER_KEYS[k]: v for k, v in sd.items()}


def random_layer(seed=0, dim=16, heads=4, intermediate=24, activation="gelu"):
    torch.manual_seed(seed)
    layer = TransformerLayer(dim=dim, heads=heads, intermediate=intermediate, activation=activation, dropout=0.1)
    with torch.no_grad():  # non-trivial LayerNorms
        for norm in (layer.attn_norm, layer.ffn_norm):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    return layer.double().eval()


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_layer_equals_the_official_bert_layer(activation):
    layer = random_layer(activation=activation)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    act = official.gelu if activation == "gelu" else torch.relu
    ref = official.bert_layer(official_layer_state(layer), x, None, heads=4, act=act)
    torch.testing.assert_close(layer(x), ref, **TOL)
    torch.testing.assert_close(layer(x, torch.ones(3, 7, dtype=torch.bool)), ref, **TOL)


def test_layer_masks_padded_keys_like_the_official_additive_mask():
    layer = random_layer(seed=1)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [4], [1]])
    ref = official.bert_layer(official_layer_state(layer), x, mask, heads=4)
    out = layer(x, mask)
    torch.testing.assert_close(out, ref, **TOL)  # every row, padded ones included
    noisy = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 100)
    torch.testing.assert_close(layer(noisy, mask)[mask], out[mask], **TOL)


def test_layer_output_is_finite_for_an_item_with_nothing_valid():
    layer = random_layer(seed=2)
    out = layer(torch.randn(2, 5, 16, dtype=torch.float64), torch.tensor([[True] * 5, [False] * 5]))
    assert torch.isfinite(out).all()


def test_layer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        TransformerLayer(dim=10, heads=4, intermediate=8)
    with pytest.raises(ValueError, match="activation"):
        TransformerLayer(dim=8, heads=4, intermediate=8, activation="tanh")


def random_cnn(seed=0, in_dim=12, channels=5, out_dim=6, **kwargs):
    torch.manual_seed(seed)
    return NgramCNN(in_dim=in_dim, channels=channels, out_dim=out_dim, dropout=0.1, **kwargs).double().eval()


def official_cnn_state(cnn: NgramCNN) -> dict:
    sd = cnn.state_dict()
    out = {k.replace("convs.", "convs1."): v for k, v in sd.items() if k.startswith("convs.")}
    out.update({"mapping.weight": sd["fc.weight"], "mapping.bias": sd["fc.bias"]})
    return out


def test_cnn_equals_the_official_head_over_every_position():
    cnn = random_cnn(normalize=True)
    hidden = torch.randn(4, 9, 12, dtype=torch.float64)
    ref = official.bert_mapping_cnn(official_cnn_state(cnn), hidden)
    torch.testing.assert_close(cnn(hidden), ref, **TOL)
    torch.testing.assert_close(cnn(hidden, torch.ones(4, 9, dtype=torch.bool)), ref, **TOL)
    raw = random_cnn()(hidden)
    torch.testing.assert_close(F.normalize(raw, dim=1), ref, **TOL)


def test_masked_cnn_pools_the_windows_inside_each_caption():
    cnn = random_cnn(seed=3)
    hidden = torch.randn(4, 9, 12, dtype=torch.float64)
    lengths = [9, 5, 2, 1]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    out = cnn(hidden, mask)
    sd = official_cnn_state(cnn)
    for i, n in enumerate(lengths):
        pools = []
        for j, k in enumerate((1, 2, 3)):
            # the caption alone, zero-padded to one whole window when shorter than it
            alone = torch.cat([hidden[i:i + 1, :n], hidden.new_zeros(1, max(0, k - n), 12)], dim=1)
            one = {f"convs1.0.{p}": sd[f"convs1.{j}.{p}"] for p in ("weight", "bias")}
            pools.append(official.cnn_pool(one, alone, widths=(k,)))
        ref = official.linear(sd, "mapping", torch.cat(pools, dim=1))
        torch.testing.assert_close(out[i:i + 1], ref, **TOL)
    # independent of the batch width and of what lies in the padding
    wide = torch.cat([hidden, torch.randn(4, 6, 12, dtype=torch.float64) * 50], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(4, 6, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(cnn(wide, wide_mask), out, **TOL)
    torch.testing.assert_close(cnn(hidden[1:3, :5], mask[1:3, :5]), out[1:3], **TOL)


def test_cnn_layer_norm_and_errors():
    cnn = random_cnn(layer_norm=True)
    out = cnn(torch.randn(2, 4, 12, dtype=torch.float64))
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, dtype=torch.float64), **TOL)
    with pytest.raises(ValueError, match="fewer than the width"):
        cnn(torch.randn(2, 2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="widths"):
        NgramCNN(in_dim=4, channels=2, widths=(), out_dim=3)
