"""Pictures of what a model attends to (matplotlib): heat maps over an image's boxes, or a word x region matrix.

A region's heat is its attention weight; a pixel's heat is the largest weight of the boxes that cover
it, so the box with the most attention is drawn hottest over its whole area and a large box does not
hide a small, hotter one inside it.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # Figure, not pyplot: no display, no backend to choose
from matplotlib.patches import Rectangle
from PIL import Image

from itmkit.explain import AttentionMap, Explanation

HEAT_CMAP = "inferno"
HEAT_ALPHA = 0.65  # how strongly the heat covers the picture
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PANELS = 24  # words drawn over the picture; a longer caption's later words are left out (and said so)


def find_picture(data_dir: Path, split: str, index: int, image_id: str) -> Image.Image | None:
    """The picture of image ``index`` (id ``image_id``) of a split, or None when the data has none.

    Looked for as ``DIR/images/SPLIT/ID.png|jpg|jpeg``, then ``DIR/images/ID.*``; the built-in data
    (a folder with ``shapes.json``) draws it again from its seed when it was not written out. For an
    HDF5 file DIR is the folder it lies in.
    """
    folder = Path(data_dir)
    folder = folder.parent if folder.is_file() else folder
    if not folder.is_dir():
        return None
    for base in (folder / "images" / split, folder / "images"):
        for suffix in PICTURE_SUFFIXES:
            path = base / f"{image_id}{suffix}"
            if path.is_file():
                with Image.open(path) as picture:
                    return picture.convert("RGB")
    meta_path = folder / "shapes.json"
    if meta_path.is_file():
        from itmkit.data.shapes import item_id, render_image

        meta = json.loads(meta_path.read_text())
        if image_id == item_id(split, index) and split in meta.get("sizes", {}):
            return render_image(split, index, seed=int(meta.get("seed", 0)))
    return None


def pixel_boxes(boxes: np.ndarray, image_size: np.ndarray | None, picture: Image.Image) -> np.ndarray:
    """Boxes (R, 4) x1, y1, x2, y2 given in ``image_size`` (width, height) pixels, scaled to the picture's."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if image_size is None:
        return boxes
    sx, sy = picture.width / float(image_size[0]), picture.height / float(image_size[1])
    return boxes * np.array([sx, sy, sx, sy])


def split_pixel_boxes(split, row: int, picture: Image.Image) -> np.ndarray | None:
    """Image ``row``'s valid boxes of a ``Split`` in ``picture``'s pixels; None unless they are pixel boxes (x1, y1,
    x2, y2: not PFAN's block layout, nor absent)."""
    if split.box_layout != "xyxy":
        return None
    count = int(split.region_lengths(np.array([row]))[0])
    size = None if split.image_sizes is None else split.image_sizes[row]
    return pixel_boxes(split.boxes[row][:count], size, picture)


def heat_image(boxes: np.ndarray, weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width) heat: each pixel the largest weight of the boxes (pixels) covering it, 0 elsewhere."""
    width, height = size
    heat = np.zeros((height, width), dtype=np.float32)
    for (x1, y1, x2, y2), w in zip(np.asarray(boxes), np.asarray(weights, dtype=np.float32)):
        cols = slice(max(int(math.floor(x1)), 0), min(int(math.ceil(x2)), width))
        rows = slice(max(int(math.floor(y1)), 0), min(int(math.ceil(y2)), height))
        np.maximum(heat[rows, cols], w, out=heat[rows, cols])
    return heat


def heat_overlay(picture: Image.Image, boxes: np.ndarray, weights: np.ndarray, vmax: float) -> np.ndarray:
    """(height, width, 3) floats in [0, 1]: the picture with the heat blended over it.

    A pixel of heat h takes the colour map's colour of h / vmax at opacity HEAT_ALPHA * h / vmax, so
    regions nobody attends to show the picture as it is and the hottest box is the most covered.
    """
    level = np.clip(heat_image(boxes, weights, picture.size) / max(vmax, 1e-12), 0.0, 1.0)[..., None]
    colours = matplotlib.colormaps[HEAT_CMAP](level[..., 0])[..., :3]
    alpha = HEAT_ALPHA * level
    return (1.0 - alpha) * (np.asarray(picture.convert("RGB"), dtype=np.float64) / 255.0) + alpha * colours


def _draw_heat(ax, picture: Image.Image, boxes: np.ndarray, weights: np.ndarray, vmax: float) -> None:
    """The picture with its heat, and the hottest box outlined."""
    ax.imshow(heat_overlay(picture, boxes, weights, vmax), interpolation="nearest")
    x1, y1, x2, y2 = boxes[int(np.argmax(weights))]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_xticks([])
    ax.set_yticks([])


def attention_figure(explanation: Explanation, map_index: int, *, picture: Image.Image | None = None,
                     boxes: np.ndarray | None = None, title: str = "") -> Figure:
    """Each word's attention over the picture's boxes (one panel per word), or the word x region matrix.

    ``boxes`` (R, 4) are in the picture's pixels. Without a picture or boxes the map is drawn as a
    matrix, words down, regions across. Specials (<start>, [CLS]) are left out of the panels.
    """
    amap: AttentionMap = explanation.maps[map_index]
    words = explanation.words()
    heading = title or f"score {explanation.score:.4f}"
    heading += f"\n{amap.label}: " + ("each word's attention over the regions" if amap.query_side == "text"
                                      else "each region's attention to the word")
    if picture is None or boxes is None:
        return _matrix_figure(explanation, amap, heading)
    shown = words[:MAX_PANELS]
    columns = min(len(shown), 6)
    rows = math.ceil(len(shown) / columns)
    width = max(2.2 * columns, 4.4)  # room for the title beside a caption of one or two words
    heading += f" (the first {MAX_PANELS} of {len(words)} words)" if len(words) > MAX_PANELS else ""
    vmax = float(max(amap.weights[shown].max(), 1e-12))  # one scale for every panel: words compare
    # the scale said in words: a near-uniform map drawn to its own maximum would otherwise look focused
    uniform = f"; spread evenly, each region would get {1 / amap.weights.shape[1]:.3f}" if amap.query_side == "text" else ""
    heading += f"\nheat: weight 0 (clear) to {vmax:.3f} (yellow){uniform}"
    lines = _wrapped(heading, width)
    fig = Figure(figsize=(width, 2.4 * rows + 0.2 + 0.17 * len(lines)), dpi=100, layout="constrained")
    fig.suptitle("\n".join(lines), fontsize=9)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(shown):
            ax.set_axis_off()
            continue
        w = shown[k]
        _draw_heat(ax, picture, boxes, amap.over_regions(w), vmax)
        contribution = explanation.contributions[w]
        note = "" if np.isnan(contribution) else f"  ({contribution:+.3f})"
        ax.set_title(f"{explanation.tokens[w]}{note}", fontsize=9)
    return fig


def _wrapped(text: str, width_inches: float) -> list[str]:
    """Title lines that fit a figure ``width_inches`` wide at 9 points (about 15 characters an inch)."""
    columns = max(int(width_inches * 15), 20)
    return [line for part in text.split("\n") for line in textwrap.wrap(part, columns) or [""]]


def _matrix_figure(explanation: Explanation, amap: AttentionMap, heading: str) -> Figure:
    regions = amap.weights.shape[1]
    width = max(5.0, 0.22 * regions + 2.0)
    lines = _wrapped(heading, width)
    height = max(2.5, 0.28 * len(explanation.tokens) + 1.2 + 0.17 * len(lines))
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    fig.suptitle("\n".join(lines), fontsize=9)
    ax = fig.subplots()
    image = ax.imshow(amap.weights, cmap=HEAT_CMAP, aspect="auto", interpolation="nearest", vmin=0.0)
    ax.set_yticks(range(len(explanation.tokens)), explanation.tokens, fontsize=8)
    ax.set_xlabel("region")
    fig.colorbar(image, ax=ax, label="attention weight")
    return fig


def caption_heat_png(picture: Image.Image, boxes: np.ndarray, weights: np.ndarray) -> bytes:
    """A PNG of the picture (its own size, no axes) with the heat of ``weights`` (R,) over its boxes."""
    blended = heat_overlay(picture, boxes, weights, float(np.max(weights)))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
