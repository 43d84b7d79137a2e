"""The PFAN block layout computed from raw boxes: a hand example, the shipped files' conventions, a slow loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit_pfan.blocks import boxes_to_blocks

SAMPLE = Path("/work/shared/reference/pfan_sample/train_boxes.npy")
GRID, TOP, PAD = 16, 15, 256


def slow_blocks(box, size, grid=GRID, top=TOP):
    """One region at a time, written from the rule: every cell the box overlaps, by intersection area."""
    width, height = size
    x1, y1, x2, y2 = (min(box[0] / width, 1.0), min(box[1] / height, 1.0),
                      min(box[2] / width, 1.0), min(box[3] / height, 1.0))
    cells = []
    for ix in range(grid):
        for iy in range(grid):
            dx = min(x2, (ix + 1) / grid) - max(x1, ix / grid)
            dy = min(y2, (iy + 1) / grid) - max(y1, iy / grid)
            if dx > 0 and dy > 0:
                cells.append((dx * dy, ix * grid + iy))
    cells.sort(key=lambda c: -c[0])  # stable: equal areas keep the lower index first
    cells = cells[:top]
    total = sum(a for a, _ in cells)
    indices = [i for _, i in cells] + [grid * grid] * (top - len(cells))
    weights = [a / total for a, _ in cells] + [0.0] * (top - len(cells))
    return indices + weights


def random_boxes(n_img, n_reg, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 700, size=(n_img, 2)).astype(np.float32)  # width, height
    corner = rng.random((n_img, n_reg, 2)) * sizes[:, None] * 0.9
    extent = rng.random((n_img, n_reg, 2)) * sizes[:, None] * 0.8 + 1
    boxes = np.concatenate([corner, np.minimum(corner + extent, sizes[:, None] + 5)], axis=-1)  # some past the edge
    return boxes.astype(np.float32), sizes


def check_conventions(layout: np.ndarray) -> None:
    """The conventions every region of the official files follows."""
    idx, w = layout[..., :TOP], layout[..., TOP:]
    assert (idx == np.round(idx)).all() and idx.min() >= 0 and idx.max() <= PAD
    assert ((w == 0) == (idx == PAD)).all()  # padding slots: index 256, weight 0
    assert (np.diff(w, axis=-1) <= 1e-12).all()  # largest overlap first
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)  # weights sum to 1
    for row in idx.reshape(-1, TOP):
        used = row[row != PAD]
        assert len(set(used.tolist())) == len(used)  # no block twice
        assert (row[len(used):] == PAD).all()  # padding only at the end


def test_a_box_covering_exactly_two_by_two_blocks():
    # 160 x 160 image: each block is 10 px. x 20..40 -> columns 2, 3; y 30..50 -> rows 3, 4.
    out = boxes_to_blocks(torch.tensor([[20.0, 30.0, 40.0, 50.0]]), torch.tensor([160.0, 160.0]))
    assert out.shape == (1, 30) and out.dtype == torch.float64
    assert out[0, :4].tolist() == [2 * 16 + 3, 2 * 16 + 4, 3 * 16 + 3, 3 * 16 + 4]  # index = i_x * 16 + i_y
    assert out[0, 4:15].tolist() == [PAD] * 11
    assert out[0, 15:19].tolist() == [0.25] * 4 and out[0, 19:].tolist() == [0.0] * 11


def test_partial_blocks_are_weighted_by_overlap_area():
    # 160 x 80 image: blocks 10 x 5 px. Box x 15..30 (half of col 1, all of col 2), y 0..5 (row 0).
    out = boxes_to_blocks(np.array([15.0, 0.0, 30.0, 5.0]), np.array([160.0, 80.0]))
    assert isinstance(out, np.ndarray)
    assert out[:2].tolist() == [2 * 16 + 0, 1 * 16 + 0]
    np.testing.assert_allclose(out[15:17], [2 / 3, 1 / 3])


def test_a_box_over_more_than_top_blocks_keeps_the_largest_and_renormalises():
    # the whole image: 256 equal blocks; 15 kept, each 1/15 (as 45% of the sample's regions)
    out = boxes_to_blocks(torch.tensor([0.0, 0.0, 64.0, 64.0]), torch.tensor([64.0, 64.0]))
    assert out[:15].tolist() == list(range(15))  # ties: the lower index first
    torch.testing.assert_close(out[15:], torch.full((15,), 1 / 15, dtype=torch.float64))
    # a box with 4 full blocks and 12 thin slivers: the full ones come first
    out = boxes_to_blocks(torch.tensor([10.0, 10.0, 31.0, 31.0]), torch.tensor([160.0, 160.0]))
    assert out[:4].tolist() == [17, 18, 33, 34] and (out[15:19] > out[19]).all()


def test_empty_and_outside_boxes_are_all_padding():
    out = boxes_to_blocks(torch.tensor([[5.0, 5.0, 5.0, 9.0], [200.0, 0.0, 300.0, 10.0]]), torch.tensor([100.0, 100.0]))
    assert (out[:, :15] == PAD).all() and (out[:, 15:] == 0).all()


def test_vectorised_equals_the_slow_loop():
    boxes, sizes = random_boxes(6, 36)
    out = boxes_to_blocks(boxes, sizes)
    assert out.shape == (6, 36, 30)
    for i in range(6):
        for r in range(36):
            expected = slow_blocks([float(v) for v in boxes[i, r]], [float(v) for v in sizes[i]])
            np.testing.assert_allclose(out[i, r], expected, rtol=0, atol=1e-12)


def test_torch_and_numpy_agree_and_other_grids_work():
    boxes, sizes = random_boxes(3, 5, seed=1)
    a = boxes_to_blocks(boxes, sizes, grid=8, top=6)
    b = boxes_to_blocks(torch.from_numpy(boxes), torch.from_numpy(sizes), grid=8, top=6)
    assert a.shape == (3, 5, 12)
    np.testing.assert_array_equal(a, b.numpy())
    for i in range(3):
        for r in range(5):
            np.testing.assert_allclose(a[i, r], slow_blocks(boxes[i, r].tolist(), sizes[i].tolist(), 8, 6), atol=1e-12)


def test_computed_layouts_follow_the_official_files_conventions():
    boxes, sizes = random_boxes(20, 36, seed=2)
    check_conventions(boxes_to_blocks(boxes, sizes))


@pytest.mark.skipif(not SAMPLE.is_file(), reason="the PFAN sample boxes file is not here")
def test_the_official_sample_follows_the_same_conventions():
    sample = np.load(SAMPLE)
    assert sample.shape == (50, 36, 30) and sample.dtype == np.float64
    check_conventions(sample)


def test_bad_shapes_and_sizes_are_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        boxes_to_blocks(torch.zeros(2, 5), torch.ones(2))
    with pytest.raises(ValueError, match="top"):
        boxes_to_blocks(torch.zeros(4), torch.ones(2), grid=2, top=5)
