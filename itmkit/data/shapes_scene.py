"""Scenes of the built-in "shapes" dataset: a few coloured shapes on a canvas, drawn with Pillow."""

from __future__ import annotations

import math
import zlib
from collections import Counter

import attrs
import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = (128, 128)  # width, height
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Saturated colours, far apart in RGB, so each stands out from every (pale or dark, grey-ish) background.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (45, 165, 65),
    "blue": (40, 85, 215),
    "purple": (135, 60, 175),
    "pink": (240, 120, 180),
    "brown": (130, 85, 40),
}
SIZES = {"small": (7.0, 10.0), "large": (15.0, 20.0)}  # half-width range in pixels
BACKGROUNDS = {
    "white": (238, 238, 234),
    "grey": (188, 188, 190),
    "beige": (226, 212, 184),
    "dark": (58, 58, 64),
}
TEXTURES = ("plain", "noise", "stripes")
TWIN_RATE = 0.3  # share of (even, odd) index pairs whose odd member is an attribute-swapped twin
SUPERSAMPLE = 2  # draw at twice the size and shrink, for anti-aliased edges


@attrs.frozen
class SceneObject:
    """One shape: what it is (the labels) and where and how it is drawn."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float  # half the side of its square bounding box
    rgb: tuple[int, int, int]  # the colour actually painted; the name never reaches the pixels

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (x1, y1, x2, y2) in pixels."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@attrs.frozen
class Scene:
    """The objects of one image and its background."""

    objects: tuple[SceneObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    texture: str
    texture_seed: int
    width: int = IMAGE_SIZE[0]
    height: int = IMAGE_SIZE[1]

    def bindings(self) -> Counter[tuple[str, str, str]]:
        """Multiset of (size, colour, shape) descriptions: what a caption binds together."""
        return Counter((o.size, o.colour, o.shape) for o in self.objects)

    def attribute_bag(self) -> Counter[str]:
        """Multiset of all attribute words with the binding thrown away: what a bag of concepts sees."""
        return Counter(w for o in self.objects for w in (o.size, o.colour, o.shape))


def item_rng(seed: int, split: str, index: int, purpose: str) -> np.random.Generator:
    """Independent generator for one (seed, split, index, purpose); crc32 because hash() is salted per process."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, zlib.crc32(purpose.encode())])


def make_scene(seed: int, split: str, index: int) -> Scene:
    """The scene of item `index` of `split`; odd items are sometimes the swapped twin of the item before."""
    pair_rng = item_rng(seed, split, index - index % 2, "twin")  # both members of a pair see the same draw
    if index % 2 == 1 and pair_rng.random() < TWIN_RATE:
        base = _random_scene(item_rng(seed, split, index - 1, "scene"))
        twin = swap_attributes(base, item_rng(seed, split, index, "swap"))
        if twin is not None:
            return twin
    return _random_scene(item_rng(seed, split, index, "scene"))


def _random_scene(rng: np.random.Generator) -> Scene:
    """2 to 5 objects whose colours and shapes come from a small per-scene pool, so attributes recur."""
    n = int(rng.integers(2, 6))
    # Few colours and shapes per scene: the same colour sits on different shapes, so only binding tells them apart.
    colours = _pooled(rng, list(COLOURS), n, int(rng.choice([1, 2, 2, 3])))
    shapes = _pooled(rng, list(SHAPES), n, int(rng.choice([1, 2, 2, 3])))
    sizes = ["large" if rng.random() < 0.45 else "small" for _ in range(n)]
    width, height = IMAGE_SIZE
    objects: list[SceneObject] = []
    # Large ones first: they are the hard ones to fit.
    for i in sorted(range(n), key=lambda i: sizes[i] != "large"):
        placed = _place(rng, objects, sizes[i], width, height)
        if placed is None and sizes[i] == "large":
            sizes[i] = "small"
            placed = _place(rng, objects, "small", width, height)
        if placed is None:
            continue  # the canvas is full; a scene keeps whatever fitted (always at least two)
        cx, cy, radius = placed
        base = np.array(COLOURS[colours[i]])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
        objects.append(SceneObject(shapes[i], colours[i], sizes[i], cx, cy, radius, rgb))
    background = str(rng.choice(list(BACKGROUNDS)))
    bg = np.clip(np.array(BACKGROUNDS[background]) + rng.integers(-10, 11, size=3), 0, 255)
    return Scene(
        objects=tuple(objects),
        background=background,
        background_rgb=tuple(int(v) for v in bg),
        texture=str(rng.choice(TEXTURES)),
        texture_seed=int(rng.integers(2**31)),
    )


def _pooled(rng: np.random.Generator, choices: list[str], n: int, pool_size: int) -> list[str]:
    """n values drawn from a random pool of `pool_size` choices, each pool member used at least once."""
    pool = list(rng.choice(choices, size=min(pool_size, n), replace=False))
    values = pool + list(rng.choice(pool, size=n - len(pool)))
    rng.shuffle(values)
    return [str(v) for v in values]


def _place(
    rng: np.random.Generator, placed: list[SceneObject], size: str, width: int, height: int
) -> tuple[float, float, float] | None:
    """A centre and radius that overlap the placed objects' boxes by at most 2 px, or None after 60 tries."""
    radius = float(rng.uniform(*SIZES[size]))
    margin = radius + 3
    for _ in range(60):
        cx = float(rng.uniform(margin, width - margin))
        cy = float(rng.uniform(margin, height - margin))
        if all(max(abs(cx - o.cx), abs(cy - o.cy)) - (radius + o.radius) >= -2.0 for o in placed):
            return round(cx, 2), round(cy, 2), round(radius, 2)
    return None


def swap_attributes(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The same layout with colours (or shapes) permuted among objects, so the binding changes; None if impossible."""
    objects = scene.objects
    for attribute in rng.permutation(["colour", "shape"]):
        fallback = None
        for _ in range(30):
            donors = [objects[j] for j in rng.permutation(len(objects))]  # object i takes donors[i]'s attribute
            pairs = zip(objects, donors, strict=True)
            if attribute == "colour":
                swapped = tuple(attrs.evolve(o, colour=d.colour, rgb=d.rgb) for o, d in pairs)
            else:
                swapped = tuple(attrs.evolve(o, shape=d.shape) for o, d in pairs)
            twin = attrs.evolve(scene, objects=swapped)
            if twin.bindings() != scene.bindings():
                return twin
            if fallback is None and swapped != objects:
                fallback = twin  # same descriptions, different places: still only spatial binding separates them
        if fallback is not None:
            return fallback
    return None


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene; depends only on geometry, painted colours and the background."""
    s = SUPERSAMPLE
    size = (scene.width * s, scene.height * s)
    canvas = Image.fromarray(_background(scene)).resize(size, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.cx * s, obj.cy * s, obj.radius * s, obj.rgb)
    return canvas.resize((scene.width, scene.height), Image.Resampling.BOX)


def _background(scene: Scene) -> np.ndarray:
    """(height, width, 3) uint8 background: a flat colour, light grey noise or faint diagonal stripes."""
    rng = np.random.default_rng(scene.texture_seed)
    if scene.texture == "noise":
        offset = rng.standard_normal((scene.height, scene.width), dtype=np.float32) * 5.0
    elif scene.texture == "stripes":
        period = float(rng.uniform(7, 15))
        phase = np.add.outer(np.arange(scene.height), np.arange(scene.width)) * (2 * math.pi / period)
        offset = 6.0 * np.sign(np.sin(phase)).astype(np.float32)
    else:
        offset = np.zeros((scene.height, scene.width), dtype=np.float32)
    pixels = np.asarray(scene.background_rgb, dtype=np.float32) + offset[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple[int, int, int]
) -> None:
    """Paint one shape filling the square of half-side r around (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        draw.polygon(points, fill=rgb)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r} (choices: {', '.join(SHAPES)})")
