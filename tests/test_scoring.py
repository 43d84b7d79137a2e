"""The scoring engine: block-wise scores equal one big call, whatever the blocks or ranks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from itmkit.build import DataPorts, build_model
from itmkit.recipe import parse_recipe
from itmkit.scoring import BlockPlan, score_all
from itmkit.types import Regions, Tokens

RECIPE = """
[recipe]
name = "score-test"
embed_dim = 16
[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.max" }
[text]
encoder = { stage = "core.bigru", word_dim = 8 }
pool = { stage = "core.mean" }
[[match]]
similarity = { stage = "core.cosine" }
[[match]]
similarity = { stage = "core.cosine" }
weight = 0.25
[loss]
stage = "core.triplet"
"""


def _model_and_sides():
    model = build_model(parse_recipe(RECIPE), DataPorts(12, 30, 6), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    regions = Regions(torch.rand(23, 6, 12, generator=g), torch.full((23,), 6))
    lengths = torch.randint(3, 11, (57,), generator=g)
    ids = torch.randint(4, 30, (57, 10), generator=g) * (torch.arange(10)[None] < lengths[:, None])
    with torch.no_grad():
        return model, model.encode_images(regions), model.encode_texts(Tokens(ids, lengths))


def test_blocks_of_any_size_give_the_full_matrix():
    model, images, texts = _model_and_sides()
    with torch.no_grad():
        expected = model.score(images, texts).numpy()
    assert expected.shape == (23, 57)
    for budget in (1, 64 * 7, 64 * 100, 2**30):
        sims, stats = score_all(model, images, texts, budget=budget)
        np.testing.assert_allclose(sims, expected, rtol=0, atol=1e-6)
        assert stats.pairs == 23 * 57
    # a budget of one pair means one image x one caption per block
    assert BlockPlan.for_model(model, 23, 57, 10, 6, budget=1) == BlockPlan(1, 1)


def test_progress_reports_every_pair():
    model, images, texts = _model_and_sides()
    seen = []
    score_all(model, images, texts, budget=64 * 50, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (23 * 57, 23 * 57)
    assert len(seen) > 1 and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import itmkit.scoring

        itmkit.scoring.REDUCE_ROWS_BYTES = 57 * 4 * 5  # the reduction in chunks of 5 rows (23 = 4 x 5 + 3)
        model, images, texts = _model_and_sides()
        sims, _ = score_all(model, images, texts, budget=64 * 40)
        np.save(f"{out}.{rank}.npy", sims)
    finally:
        dist.destroy_process_group()


def test_torch_distributed_ranks_share_the_blocks(tmp_path):
    model, images, texts = _model_and_sides()
    expected, _ = score_all(model, images, texts, budget=64 * 40)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "sims")), nprocs=2, join=True)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"sims.{rank}.npy"), expected, rtol=0, atol=1e-6)
