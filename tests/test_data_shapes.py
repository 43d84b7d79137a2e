"""Tests of the built-in "shapes" dataset: determinism, layout, captions, pixel-only features, confusable twins."""

from __future__ import annotations

import json
import re

import attrs
import numpy as np
import pytest

from itmkit.data.shapes import (
    DEFAULT_SIZES,
    SHAPES_FEATURE_DIM,
    SHAPES_IMAGE_SIZE,
    SHAPES_REGIONS,
    ShapesSplit,
    captions_for,
    extract_features,
    make_scene,
    make_split,
    render,
    render_image,
    write_shapes,
)
from itmkit.data.shapes_scene import COLOURS, SHAPES
from itmkit.data.shapes_text import RELATION_PHRASES, RELATION_WORDS, WITH_PHRASES
from itmkit.data.vocab import Vocabulary, tokenize


@pytest.fixture(scope="module")
def split() -> ShapesSplit:
    return make_split("test", 40, seed=3)


def _iou(boxes: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """IoU of each of `boxes` (R, 4) with one box."""
    x1, y1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    x2, y2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def test_defaults_match_flickr30k_test_size():
    assert DEFAULT_SIZES == {"train": 5000, "dev": 500, "test": 1000}
    assert SHAPES_FEATURE_DIM == 256 and SHAPES_REGIONS == 36


def test_split_arrays_have_the_promised_shapes_and_dtypes(split):
    n = 40
    assert len(split) == n and split.name == "test"
    assert split.features.shape == (n, SHAPES_REGIONS, SHAPES_FEATURE_DIM)
    assert split.features.dtype == np.float32
    assert np.isfinite(split.features).all() and (split.features >= 0).all()
    assert split.boxes.shape == (n, SHAPES_REGIONS, 4) and split.boxes.dtype == np.float32
    width, height = SHAPES_IMAGE_SIZE
    assert (split.boxes[..., 0] >= 0).all() and (split.boxes[..., 2] <= width).all()
    assert (split.boxes[..., 1] >= 0).all() and (split.boxes[..., 3] <= height).all()
    assert (split.boxes[..., 2] - split.boxes[..., 0] >= 4 - 1e-4).all()
    assert (split.boxes[..., 3] - split.boxes[..., 1] >= 4 - 1e-4).all()
    assert split.image_sizes.shape == (n, 2) and (split.image_sizes == SHAPES_IMAGE_SIZE).all()
    assert len(split.captions) == 5 * n
    assert split.ids[17] == "shapes-test-000017" and len(set(split.ids)) == n


def test_same_seed_gives_identical_data_and_another_seed_or_split_does_not():
    a, b = make_split("dev", 6, seed=5), make_split("dev", 6, seed=5)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.boxes, b.boxes)
    assert a.captions == b.captions
    for other in (make_split("dev", 6, seed=6), make_split("train", 6, seed=5)):
        assert not np.array_equal(a.features, other.features)
        assert a.captions != other.captions
    # An item does not depend on how many items were generated before it.
    assert np.array_equal(make_split("dev", 3, seed=5).features, a.features[:3])


def test_scenes_have_two_to_five_objects_of_known_attributes():
    for index in range(60):
        scene = make_scene(0, "train", index)
        assert 2 <= len(scene.objects) <= 5
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in ("small", "large")
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height


def test_each_image_has_five_distinct_captions_most_stating_relations(split):
    phrases = [p for table in (RELATION_PHRASES, WITH_PHRASES) for options in table.values() for p in options]
    assert all(RELATION_WORDS & set(p.split()) for p in phrases)  # so counting relation words finds them all
    lengths = []
    for i in range(len(split)):
        own = split.captions[5 * i : 5 * i + 5]
        assert len(set(own)) == 5
        tokens = [tokenize(c) for c in own]
        assert sum(bool(RELATION_WORDS & set(t)) for t in tokens) >= 3
        assert all(re.fullmatch(r"[A-Za-z][a-z ,:']*[a-z]( ?\.)?", c) for c in own), own
        lengths += [len(t) for t in tokens]
    assert 6 <= np.median(lengths) <= 20 and max(lengths) <= 30


def test_captions_bind_attributes_of_real_objects():
    scene = make_scene(0, "train", 4)
    described = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in described]
    for seed in range(20):
        text = " ".join(captions_for(scene, np.random.default_rng(seed)))
        for colour, shape in absent:  # no caption pairs a colour with a shape that no object has
            assert f"{colour} {shape}" not in text


def test_features_reextracted_from_a_rerendered_image_are_identical(split):
    for index in (0, 7, 39):
        image = render_image("test", index, seed=3)
        assert image.size == SHAPES_IMAGE_SIZE and image.mode == "RGB"
        assert np.array_equal(extract_features(image, split.boxes[index]), split.features[index])
        assert np.array_equal(extract_features(np.asarray(image), split.boxes[index]), split.features[index])


def test_features_depend_only_on_pixels():
    scene = make_scene(0, "train", 2)
    boxes = np.array([o.box for o in scene.objects], dtype=np.float32)
    # Rename every label but keep the painted colours: same pixels, so the same features.
    relabelled = attrs.evolve(
        scene, objects=tuple(attrs.evolve(o, colour="purple", size="small") for o in scene.objects)
    )
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(relabelled)))
    assert np.array_equal(extract_features(render(scene), boxes), extract_features(render(relabelled), boxes))
    repainted = attrs.evolve(scene, objects=(attrs.evolve(scene.objects[0], rgb=(0, 0, 0)), *scene.objects[1:]))
    assert not np.array_equal(extract_features(render(scene), boxes), extract_features(render(repainted), boxes))


@pytest.mark.parametrize("dim", [32, 107, 1024])
def test_extract_features_honours_any_dim(dim):
    scene = make_scene(0, "dev", 1)
    boxes = np.array([o.box for o in scene.objects], dtype=np.float32)
    features = extract_features(render(scene), boxes, dim=dim)
    assert features.shape == (len(boxes), dim) and features.dtype == np.float32 and (features >= 0).all()


def test_proposals_include_every_object_and_are_shuffled(split):
    object_slots = []
    for index in range(len(split)):
        for obj in make_scene(3, "test", index).objects:
            overlap = _iou(split.boxes[index], obj.box)
            assert overlap.max() > 0.7
            object_slots.append(int(overlap.argmax()))
    assert len(set(object_slots)) > 20  # objects are not always in the first slots


def _object_features(name: str, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored features of the region best matching each object, with the object's colour and shape index."""
    data = make_split(name, n_images, seed=1)
    features, colours, shapes = [], [], []
    for index in range(n_images):
        for obj in make_scene(1, name, index).objects:
            features.append(data.features[index, int(_iou(data.boxes[index], obj.box).argmax())])
            colours.append(list(COLOURS).index(obj.colour))
            shapes.append(SHAPES.index(obj.shape))
    return np.stack(features), np.array(colours), np.array(shapes)


def _softmax_regression_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, classes: int
) -> float:
    """Held-out accuracy of a multinomial logistic regression trained by full-batch gradient descent."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    weights, bias = np.zeros((a.shape[1], classes)), np.zeros(classes)
    targets = np.eye(classes)[y_train]
    for _ in range(300):
        logits = a @ weights + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - targets) / len(a)
        weights -= 0.5 * (a.T @ grad + 1e-3 * weights)
        bias -= 0.5 * grad.sum(axis=0)
    return float(((b @ weights + bias).argmax(axis=1) == y_test).mean())


def test_colour_and_shape_are_recoverable_from_region_features():
    x_train, colour_train, shape_train = _object_features("train", 120)
    x_test, colour_test, shape_test = _object_features("test", 50)
    colour = _softmax_regression_accuracy(x_train, colour_train, x_test, colour_test, len(COLOURS))
    shape = _softmax_regression_accuracy(x_train, shape_train, x_test, shape_test, len(SHAPES))
    assert colour > 0.9, colour  # chance 1/8
    assert shape > 0.8, shape  # chance 1/6


def test_split_holds_confusable_twins_that_only_binding_separates():
    scenes = [make_scene(0, "train", i) for i in range(100)]
    twins = [
        (a, b)
        for i, a in enumerate(scenes)
        for b in scenes[i + 1 :]
        if a.attribute_bag() == b.attribute_bag() and a.bindings() != b.bindings()
    ]
    assert len(twins) >= 5
    # A deliberate twin: same layout and attribute words, colours or shapes moved between objects.
    a, b = next((a, b) for a, b in twins if [o.box for o in a.objects] == [o.box for o in b.objects])
    assert not np.array_equal(np.asarray(render(a)), np.asarray(render(b)))


def test_write_shapes_writes_a_readable_precomp_dataset(tmp_path):
    from itmkit.data.precomp import read_split

    calls = []
    sizes = {"train": 6, "dev": 3, "test": 4}
    out = write_shapes(tmp_path / "shapes", seed=2, sizes=sizes, images=True, progress=lambda *a: calls.append(a))
    assert out == tmp_path / "shapes"
    expected = make_split("test", 4, seed=2)
    loaded = read_split(out, "test")
    assert np.array_equal(np.asarray(loaded.features), expected.features)
    assert loaded.captions == expected.captions
    assert np.array_equal(np.asarray(loaded.boxes), expected.boxes)
    assert (out / "test_ids.txt").read_text().split() == expected.ids
    meta = json.loads((out / "shapes.json").read_text())
    assert meta["seed"] == 2 and meta["sizes"] == sizes and meta["feature_dim"] == SHAPES_FEATURE_DIM
    assert "generator_version" in meta and (out / "README.txt").is_file()
    vocab = Vocabulary.load(out / "vocab.json")
    assert "circle" in vocab or "square" in vocab
    assert len(list((out / "images" / "dev").glob("shapes-dev-*.png"))) == 3
    assert {(name, total) for name, _, total in calls} == set(sizes.items())
    assert ("test", 4, 4) in calls
