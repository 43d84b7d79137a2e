"""Detector-like region proposals and a fixed pixel-based feature extractor for the "shapes" dataset."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from itmkit.data.shapes_scene import Scene

CROP = 16  # each box is resampled to CROP x CROP cells
SUPER = 2  # samples per cell side, averaged so that large boxes are not aliased
COLOUR_LEVELS = np.array([0.15, 0.5, 0.85], dtype=np.float32)  # soft 3x3x3 colour histogram bin centres
ORIENTATIONS = 8  # signed edge-direction bins, 45 degrees each
PROJECTION_SEED = 20240617  # the extractor's one random draw, fixed forever: changing it changes every feature


def make_regions(scene: Scene, rng: np.random.Generator, n_regions: int = 36) -> np.ndarray:
    """n_regions shuffled boxes (x1, y1, x2, y2): jittered objects, loose and part boxes, pair unions, random crops."""
    width, height = scene.width, scene.height
    objects = np.array([o.box for o in scene.objects], dtype=np.float64)  # (n, 4)
    n = len(objects)
    side = (objects[:, 2] - objects[:, 0])[:, None]
    # The detections themselves, off by a few percent of their size (at most 8%, so IoU stays above 0.7).
    tight = objects + np.clip(rng.normal(0.0, 0.04, (n, 4)), -0.08, 0.08) * side
    # A looser, shifted duplicate of each, as non-maximum suppression leaves behind.
    centre = (objects[:, :2] + objects[:, 2:]) / 2 + rng.normal(0.0, 2.0, (n, 2))
    half = side / 2 * rng.uniform(1.15, 1.5, (n, 1))
    loose = np.concatenate([centre - half, centre + half], axis=1)
    # One half of each object (left, right, top or bottom): a part proposal.
    which = rng.integers(4, size=n)
    part = objects.copy()
    middle = (objects[:, :2] + objects[:, 2:]) / 2
    axis = which // 2  # 0: split along x, 1: along y
    keep_low = which % 2 == 0
    part[keep_low, 2 + axis[keep_low]] = middle[keep_low, axis[keep_low]]
    part[~keep_low, axis[~keep_low]] = middle[~keep_low, axis[~keep_low]]
    part += rng.normal(0.0, 1.0, (n, 4))
    # The union of every pair: proposals covering a group of objects.
    i, j = np.triu_indices(n, k=1)
    low, high = np.minimum(objects[i, :2], objects[j, :2]), np.maximum(objects[i, 2:], objects[j, 2:])
    unions = np.concatenate([low, high], axis=1) + rng.normal(0.0, 1.5, (len(i), 4))
    boxes = np.concatenate([tight, loose, part, unions])[:n_regions]
    # Background crops and stray proposals of any size fill the rest.
    extra = n_regions - len(boxes)
    size = rng.uniform(10, [0.7 * width, 0.7 * height], (extra, 2))
    corner = rng.uniform(0, 1, (extra, 2)) * ([width, height] - size)
    boxes = np.concatenate([boxes, np.concatenate([corner, corner + size], axis=1)])
    boxes = np.clip(boxes, 0, [width, height, width, height])
    # Keep every box at least 4 px wide and high, inside the image.
    for lo, hi, extent in ((0, 2, width), (1, 3, height)):
        short = boxes[:, hi] - boxes[:, lo] < 4
        boxes[short, lo] = np.clip(boxes[short, lo], 0, extent - 4)
        boxes[short, hi] = boxes[short, lo] + 4
    return boxes[rng.permutation(n_regions)].astype(np.float32)


def extract_features(image: Image.Image | np.ndarray, boxes: np.ndarray, dim: int = 256) -> np.ndarray:
    """(R, dim) non-negative float32 features of each box of an RGB image (uint8, or floats in [0, 1])."""
    # Only pixels and boxes go in, never a scene's labels: what a model learns here it had to see.
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {pixels.shape}")
    pixels = pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 1.0)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    height, width = pixels.shape[:2]
    crops = _crops(pixels, boxes)  # (R, CROP, CROP, 3)
    coarse = _pool2(crops)  # (R, CROP / 2, CROP / 2, 3)
    surround = np.median(_ring(pixels, boxes), axis=1)  # (R, 3): what lies just outside each box
    hand = _handcrafted(crops, coarse, surround, boxes, width, height)
    # The projection reads the coarse crop: 4x fewer inputs keeps its matrix product small and single-threaded.
    flat = (coarse - 0.5).reshape(len(boxes), -1)
    if dim >= hand.shape[1]:
        extra = _relu_projection(flat, dim - hand.shape[1], 0)
        return np.concatenate([hand, extra], axis=1).astype(np.float32)
    # Too small for the hand-made block itself: project everything, still through ReLU pairs.
    return _relu_projection(np.concatenate([hand, flat], axis=1), dim, 1).astype(np.float32)


def _crops(pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each box resampled to CROP x CROP by averaging SUPER x SUPER nearest-pixel samples per cell."""
    height, width = pixels.shape[:2]
    n = CROP * SUPER
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs = boxes[:, :1] + t * (boxes[:, 2:3] - boxes[:, :1])  # (R, n)
    ys = boxes[:, 1:2] + t * (boxes[:, 3:4] - boxes[:, 1:2])
    xi = np.clip(xs.astype(np.int64), 0, width - 1)
    yi = np.clip(ys.astype(np.int64), 0, height - 1)
    samples = pixels[yi[:, :, None], xi[:, None, :]]  # (R, n, n, 3)
    # Strided slices instead of a reshaped mean: the same average, several times faster.
    cells = sum(samples[:, i::SUPER, j::SUPER] for i in range(SUPER) for j in range(SUPER))
    return cells / (SUPER * SUPER)


def _ring(pixels: np.ndarray, boxes: np.ndarray, gap: float = 3.0, per_side: int = 8) -> np.ndarray:
    """(R, 4 * per_side, 3) pixels sampled on a rectangle `gap` px outside each box: its surroundings."""
    height, width = pixels.shape[:2]
    t = (np.arange(per_side, dtype=np.float32) + 0.5) / per_side
    x1, y1 = boxes[:, :1] - gap, boxes[:, 1:2] - gap
    x2, y2 = boxes[:, 2:3] + gap, boxes[:, 3:4] + gap
    along_x, along_y = x1 + t * (x2 - x1), y1 + t * (y2 - y1)
    ones = np.ones_like(t)
    xs = np.concatenate([along_x, along_x, x1 * ones, x2 * ones], axis=1)
    ys = np.concatenate([y1 * ones, y2 * ones, along_y, along_y], axis=1)
    xi = np.clip(xs.astype(np.int64), 0, width - 1)
    yi = np.clip(ys.astype(np.int64), 0, height - 1)
    return pixels[yi, xi]


def _handcrafted(
    crops: np.ndarray, coarse: np.ndarray, surround: np.ndarray, boxes: np.ndarray, width: int, height: int
) -> np.ndarray:
    """Colour, foreground-shape and box-geometry statistics, all in [0, 1]-ish and non-negative."""
    r = len(crops)
    cells = crops.reshape(r, -1, 3)
    # Foreground: cells whose colour differs clearly from the surroundings (soft, so features vary smoothly).
    difference = crops - surround[:, None, None, :]
    distance = np.sqrt(np.einsum("rhwc,rhwc->rhw", difference, difference))  # (R, CROP, CROP)
    fg = np.clip((distance - 0.08) / 0.12, 0.0, 1.0)
    fg_flat = fg.reshape(r, -1)
    fill = fg_flat.mean(axis=1, keepdims=True)
    fg_weight = fg_flat / np.maximum(fg_flat.sum(axis=1, keepdims=True), 1e-6)
    fg_colour = (fg_weight[:, None, :] @ cells)[:, 0]

    # Colour histograms on the coarse grid: colour needs no fine detail, and this is the costly part.
    coarse_weight = _pool2(fg[..., None]).reshape(r, 1, -1)
    coarse_weight /= np.maximum(coarse_weight.sum(axis=2, keepdims=True), 1e-6)
    membership = np.exp(-(((coarse.reshape(r, -1, 3, 1) - COLOUR_LEVELS) / 0.18) ** 2))  # (R, P, 3, levels)
    membership /= membership.sum(axis=-1, keepdims=True)
    red, green, blue = membership[:, :, 0], membership[:, :, 1], membership[:, :, 2]
    bins = (red[..., :, None, None] * green[..., None, :, None] * blue[..., None, None, :]).reshape(r, -1, 27)
    histogram = bins.mean(axis=1)
    fg_histogram = (coarse_weight @ bins)[:, 0]

    pooled = fg_flat @ _shape_pooling()  # (R, 16 + 5): a 4x4 layout grid, then 4 rings and the corners
    gy, gx = np.gradient(fg, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    angle = np.arctan2(gy, gx)  # signed, so an upward triangle differs from a downward one
    which = np.floor((angle + np.pi) / (2 * np.pi) * ORIENTATIONS).astype(np.int64) % ORIENTATIONS
    which = (which + ORIENTATIONS * np.arange(r)[:, None, None]).reshape(-1)
    orientation = np.bincount(which, magnitude.reshape(-1), minlength=r * ORIENTATIONS).reshape(r, ORIENTATIONS)
    edge_total = orientation.sum(axis=1, keepdims=True)
    orientation /= np.maximum(edge_total, 1e-6)
    edge_density = edge_total / (fg_flat.sum(axis=1, keepdims=True) + CROP)
    flips = (fg[:, ::-1], fg[:, :, ::-1])  # top-bottom and left-right mirror images
    symmetry = np.stack([np.abs(fg - flipped).mean(axis=(1, 2)) for flipped in flips], axis=1)

    scale = np.array([width, height, width, height], dtype=np.float32)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    geometry = np.concatenate(
        [boxes / scale, np.stack([w / width, h / height, w * h / (width * height), w / (w + h)], axis=1)], axis=1
    )
    # 107 values: colour (3 + 3 + 27 + 3 + 27 + 3), foreground shape (1 + 21 + 8 + 1 + 2), box geometry (8).
    return np.concatenate(
        [
            cells.mean(axis=1), cells.std(axis=1), histogram, fg_colour, fg_histogram, surround, fill,
            pooled, orientation, edge_density, symmetry, geometry,
        ],
        axis=1,
    ).astype(np.float32)


@functools.cache
def _shape_pooling() -> np.ndarray:
    """(CROP * CROP, 21) averaging weights: 16 cells of a 4x4 grid, then 4 rings around the centre and the corners."""
    rows, cols = np.mgrid[0:CROP, 0:CROP]
    cell = (rows // (CROP // 4)) * 4 + cols // (CROP // 4)
    radius = np.hypot(rows - (CROP - 1) / 2, cols - (CROP - 1) / 2)
    ring = 16 + np.minimum((radius / (CROP / 2) * 4).astype(np.int64), 4)
    weights = np.zeros((CROP * CROP, 21), dtype=np.float32)
    weights[np.arange(CROP * CROP), cell.reshape(-1)] = 1
    weights[np.arange(CROP * CROP), ring.reshape(-1)] = 1
    weights /= weights.sum(axis=0)
    weights.flags.writeable = False  # shared through the cache
    return weights


def _pool2(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling of (R, H, W, C)."""
    return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4


def _relu_projection(x: np.ndarray, out_dim: int, stream: int) -> np.ndarray:
    """A fixed random projection kept as ReLU(z) and ReLU(-z), which is non-negative yet loses nothing."""
    if out_dim == 0:
        return np.zeros((len(x), 0), dtype=np.float32)
    weights = _projection(x.shape[1], (out_dim + 1) // 2, stream)
    z = x.astype(np.float32) @ weights
    return np.concatenate([np.maximum(z, 0), np.maximum(-z, 0)], axis=1)[:, :out_dim]


@functools.lru_cache(maxsize=8)
def _projection(in_dim: int, out_dim: int, stream: int) -> np.ndarray:
    """The (in_dim, out_dim) projection matrix, drawn once from the fixed seed."""
    rng = np.random.default_rng([PROJECTION_SEED, stream, in_dim, out_dim])
    matrix = rng.normal(0.0, 2.0 / np.sqrt(in_dim), size=(in_dim, out_dim)).astype(np.float32)
    matrix.flags.writeable = False  # shared through the cache
    return matrix
