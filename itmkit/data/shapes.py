"""The built-in "shapes" dataset: a deterministic, no-download miniature Flickr30K of synthetic scenes.

Each image is 2 to 5 coloured shapes on a canvas, described by 5 captions that bind attributes to objects
and state spatial relations, and represented like a detector's output: 36 boxes with features computed
from the rendered pixels. Everything follows from (seed, split, index), so images are regenerated on
demand rather than stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
from PIL import Image

from itmkit.data.precomp import write_split
from itmkit.data.shapes_features import extract_features, make_regions
from itmkit.data.shapes_scene import IMAGE_SIZE, Scene, item_rng, make_scene, render
from itmkit.data.shapes_text import CAPTIONS_PER_IMAGE, captions_for
from itmkit.data.vocab import Vocabulary

__all__ = [
    "DEFAULT_SIZES", "GENERATOR_VERSION", "SHAPES_FEATURE_DIM", "SHAPES_IMAGE_SIZE", "SHAPES_REGIONS",
    "Scene", "ShapesSplit", "captions_for", "extract_features", "make_scene", "make_split", "render",
    "render_image", "write_shapes",
]

SHAPES_FEATURE_DIM = 256
SHAPES_REGIONS = 36
SHAPES_IMAGE_SIZE = IMAGE_SIZE  # (width, height)
DEFAULT_SIZES = {"train": 5000, "dev": 500, "test": 1000}
GENERATOR_VERSION = "1"  # bump whenever a change alters any image, box, feature or caption
VOCAB_THRESHOLD = 4

Progress = Callable[[str, int, int], None]


@attrs.frozen(eq=False)
class ShapesSplit:
    """One split in memory, in the precomp layout: captions 5i..5i+4 belong to image i."""

    name: str
    features: np.ndarray  # (N, 36, dim) float32, non-negative
    captions: list[str]  # 5N
    boxes: np.ndarray  # (N, 36, 4) float32 x1, y1, x2, y2 in pixels
    image_sizes: np.ndarray  # (N, 2) int width, height
    ids: list[str]  # "shapes-{split}-{index:06d}"

    def __len__(self) -> int:
        """Number of images."""
        return len(self.ids)


def item_id(split: str, index: int) -> str:
    """The id of one image, e.g. 'shapes-test-000017'."""
    return f"shapes-{split}-{index:06d}"


def make_split(
    name: str,
    n_images: int,
    *,
    seed: int = 0,
    dim: int = SHAPES_FEATURE_DIM,
    progress: Progress | None = None,
) -> ShapesSplit:
    """Generate images 0..n_images-1 of a split: render, propose boxes, extract features, write captions."""
    if n_images < 0 or seed < 0 or dim < 1:
        raise ValueError(f"need n_images >= 0, seed >= 0 and dim >= 1, got {n_images}, {seed}, {dim}")
    features = np.empty((n_images, SHAPES_REGIONS, dim), dtype=np.float32)
    boxes = np.empty((n_images, SHAPES_REGIONS, 4), dtype=np.float32)
    captions: list[str] = []
    for index in range(n_images):
        scene = make_scene(seed, name, index)
        boxes[index] = make_regions(scene, item_rng(seed, name, index, "regions"), SHAPES_REGIONS)
        # One image per call, exactly as a caller re-extracting a single image would, so results are bit-identical.
        features[index] = extract_features(render(scene), boxes[index], dim)
        captions.extend(captions_for(scene, item_rng(seed, name, index, "captions")))
        if progress is not None and ((index + 1) % 100 == 0 or index + 1 == n_images):
            progress(name, index + 1, n_images)
    return ShapesSplit(
        name=name,
        features=features,
        captions=captions,
        boxes=boxes,
        image_sizes=np.tile(np.array(SHAPES_IMAGE_SIZE, dtype=np.int64), (n_images, 1)),
        ids=[item_id(name, i) for i in range(n_images)],
    )


def render_image(split: str, index: int, *, seed: int = 0) -> Image.Image:
    """Regenerate the image of one item (images are regenerable, not stored)."""
    return render(make_scene(seed, split, index))


def write_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    images: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write every split in the precomp layout, a vocabulary from train+dev, metadata and optionally PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    vocab_captions: dict[str, list[str]] = {}
    for name, n_images in sizes.items():
        split = make_split(name, n_images, seed=seed, progress=progress)
        write_split(
            out, name, features=split.features, captions=split.captions, boxes=split.boxes,
            image_sizes=split.image_sizes, ids=split.ids,
        )
        vocab_captions[name] = split.captions
        if images:
            folder = out / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, image_id in enumerate(split.ids):
                render_image(name, index, seed=seed).save(folder / f"{image_id}.png")
    # The vocabulary must not see test captions; with neither train nor dev asked for, use what there is.
    sources = [n for n in ("train", "dev") if n in vocab_captions] or list(vocab_captions)
    vocab = Vocabulary.build([c for n in sources for c in vocab_captions[n]], threshold=VOCAB_THRESHOLD)
    vocab.save(out / "vocab.json")
    meta = {
        "dataset": "shapes",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sizes": sizes,
        "feature_dim": SHAPES_FEATURE_DIM,
        "regions": SHAPES_REGIONS,
        "image_size": list(SHAPES_IMAGE_SIZE),
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "vocab_from": sources,
        "vocab_threshold": VOCAB_THRESHOLD,
    }
    (out / "shapes.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.txt").write_text(_readme(meta))
    return out


def _readme(meta: dict) -> str:
    """A short human description of a written dataset."""
    splits = ", ".join(f"{name} {n} images" for name, n in meta["sizes"].items())
    return (
        "itmkit built-in dataset 'shapes' (synthetic, deterministic; regenerate with the same seed).\n"
        f"generator version {meta['generator_version']}, seed {meta['seed']}: {splits}.\n"
        f"Per image: {meta['regions']} region boxes with {meta['feature_dim']}-d features computed from the "
        f"rendered {meta['image_size'][0]}x{meta['image_size'][1]} pixels, and {meta['captions_per_image']} "
        "captions.\n"
        "Files: {split}_ims.npy, {split}_caps.txt, {split}_boxes.npy, {split}_sizes.npy, {split}_ids.txt, "
        f"vocab.json (from {' + '.join(meta['vocab_from'])} captions, threshold {meta['vocab_threshold']}).\n"
    )
