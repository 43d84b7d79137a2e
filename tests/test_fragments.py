"""Fragment stores: what is written in shards is read back, by any positions, as the items were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itmkit.build import Encoded
from itmkit.errors import ItmkitError
from itmkit.fragments import FragmentStore, FragmentWriter
from itmkit.types import Local


def batches(n: int, width: int, dim: int, seed: int = 0):
    """Encoded batches of 7 items with varying valid lengths, per-fragment boxes, a per-item extra and pools."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for start in range(0, n, 7):
        b = min(7, n - start)
        lengths = torch.randint(1, width + 1, (b,), generator=g)
        mask = torch.arange(width)[None] < lengths[:, None]
        feats = torch.randn(b, width, dim, generator=g) * mask[..., None]
        extras = {"boxes": torch.rand(b, width, 4, generator=g) * mask[..., None], "size": torch.rand(b, 2, generator=g)}
        items.append(Encoded(Local(feats, mask, extras), torch.randn(b, dim, generator=g)))
    return items


def item(batch_list, i: int) -> tuple[torch.Tensor, ...]:
    """Item i's valid fragments, boxes, per-item extra and pool."""
    b, r = divmod(i, 7)
    enc = batch_list[b]
    n = int(enc.local.mask[r].sum())
    return enc.local.feats[r, :n], enc.local.extras["boxes"][r, :n], enc.local.extras["size"][r], enc.global_[r]


@pytest.mark.parametrize("shard_size", [1, 5, 64])
def test_items_come_back_in_any_order_across_shards(tmp_path, shard_size):
    data = batches(40, 9, 6)
    writer = FragmentWriter(tmp_path / "store", shard_size=shard_size)
    for enc in data:
        writer.append(enc)
    assert writer.close() == 40
    store = FragmentStore(tmp_path / "store")
    assert len(store) == 40 and store.num_shards == -(-40 // shard_size)
    positions = np.array([39, 0, 17, 17, 5, 22, 38])
    got = store.take(positions)
    width = got.local.feats.shape[1]
    assert width == max(int(data[p // 7].local.mask[p % 7].sum()) for p in positions)  # cut to the longest taken
    for row, p in enumerate(positions):
        feats, boxes, size, pool = item(data, int(p))
        n = len(feats)
        assert torch.equal(got.local.feats[row, :n], feats) and torch.equal(got.local.extras["boxes"][row, :n], boxes)
        assert got.local.mask[row, :n].all() and not got.local.mask[row, n:].any()
        assert torch.equal(got.local.feats[row, n:], torch.zeros_like(got.local.feats[row, n:]))
        assert torch.equal(got.local.extras["size"][row], size) and torch.equal(got.global_[row], pool)


def test_a_pool_only_store(tmp_path):
    data = [Encoded(None, torch.randn(5, 3)), Encoded(None, torch.randn(4, 3))]
    writer = FragmentWriter(tmp_path / "s", shard_size=3)
    for enc in data:
        writer.append(enc)
    writer.close()
    got = FragmentStore(tmp_path / "s").take(np.array([8, 0]))
    assert got.local is None
    assert torch.equal(got.global_, torch.stack([data[1].global_[3], data[0].global_[0]]))


def test_damage_is_a_clear_error(tmp_path):
    with pytest.raises(ItmkitError, match="store.json is missing or damaged"):
        FragmentStore(tmp_path)
    writer = FragmentWriter(tmp_path / "s", shard_size=4)
    writer.append(batches(6, 3, 2)[0])
    writer.close()
    store = FragmentStore(tmp_path / "s")
    with pytest.raises(ItmkitError, match="positions outside 0..5"):
        store.take(np.array([6]))
    (tmp_path / "s" / "shard-00001" / "feats.npy").write_bytes(b"not npy")
    with pytest.raises(ItmkitError, match="a shard cannot be read"):
        store.take(np.array([5]))
