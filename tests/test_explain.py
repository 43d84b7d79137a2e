"""``itmkit explain``: the recorded attention is SCAN's, the score is full scoring's, each word's contribution is
the score without it, and the picture draws the highest-attention box hottest; the clear messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import load_checkpoint, save_checkpoint
from itmkit.data.loader import pad_tokens
from itmkit.data.shapes import render_image
from itmkit.datasets import open_named_split
from itmkit.evaluate import similarity_matrix
from itmkit.explain import explain_pair, note_attention, recording
from itmkit.pictures import HEAT_ALPHA, HEAT_CMAP, attention_figure, heat_image, pixel_boxes
from itmkit.recipe import parse_recipe
from itmkit.types import Regions, Tokens

from cliutil import invoke
from conftest import TINY_RECIPE

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

IMAGE = 7


@pytest.fixture(scope="module")
def pair(tiny_scan, tiny_data):
    """The trained tiny SCAN, the test split, and its explanation of image IMAGE with its first caption."""
    loaded = load_checkpoint(tiny_scan)
    split = open_named_split(tiny_data, "test")
    rows = np.array([IMAGE])
    result = explain_pair(loaded.model, loaded.vocab, split.image_features(rows)[0], split.captions[5 * IMAGE],
                          boxes=split.boxes[IMAGE], image_size=split.image_sizes[IMAGE])
    return loaded, split, result


def test_the_recorded_attention_is_scans_word_over_region_softmax(pair):
    loaded, split, result = pair
    model, vocab = loaded.model, loaded.vocab
    ids = vocab.encode(split.captions[5 * IMAGE])
    with torch.no_grad():
        regions = model.encode_images(Regions(torch.as_tensor(split.image_features(np.array([IMAGE]))),
                                              torch.tensor([36]))).local.feats[0]
        words = model.encode_texts(Tokens(torch.tensor([ids]), torch.tensor([len(ids)]))).local.feats[0]
    # The official func_attention, one pair: context x query products, LeakyReLU(0.1), l2 over the words,
    # then each word's softmax(lambda *) over the regions.
    affinity = F.leaky_relu(regions @ words.T, 0.1)
    affinity = affinity / (affinity.norm(dim=1, keepdim=True) + 1e-8)
    expected = torch.softmax(9.0 * affinity.T, dim=1).numpy()
    assert len(result.maps) == 1 and result.maps[0].label == "match[0].cross (scan.t2i)"
    np.testing.assert_allclose(result.maps[0].weights, expected, atol=1e-5)
    assert result.tokens == [vocab.token(i) for i in ids] and result.tokens[0] == "<start>"


def test_the_score_is_full_scorings_and_contributions_are_the_score_without_each_word(pair):
    loaded, split, result = pair
    sims, _ = similarity_matrix(loaded.model, loaded.vocab, split)
    assert result.score == pytest.approx(float(sims[IMAGE, 5 * IMAGE]), abs=1e-5)
    ids = loaded.vocab.encode(split.captions[5 * IMAGE])
    image = loaded.model.encode_images(Regions(torch.as_tensor(split.image_features(np.array([IMAGE]))),
                                               torch.tensor([36])))
    for w in range(len(ids)):
        if w in (0, len(ids) - 1):  # <start>, <end>: specials are not words
            assert np.isnan(result.contributions[w])
            continue
        tokens, lengths = pad_tokens([np.array(ids[:w] + ids[w + 1:])])
        with torch.no_grad():
            without = float(loaded.model.score(image, loaded.model.encode_texts(Tokens(tokens, lengths)))[0, 0])
        assert result.contributions[w] == pytest.approx(result.score - without, abs=1e-5)


def test_the_picture_draws_each_words_highest_attention_box_hottest(pair, tiny_data):
    _, split, result = pair
    picture = render_image("test", IMAGE)
    boxes = pixel_boxes(split.boxes[IMAGE], split.image_sizes[IMAGE], picture)
    fig = attention_figure(result, 0, picture=picture, boxes=boxes)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255.0
    words = [w for w, special in enumerate(result.special) if not special]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(words)
    vmax = result.maps[0].weights[words].max()
    for ax, w in zip(panels, words):
        weights = result.maps[0].weights[w]
        top = int(np.argmax(weights))
        drawn = np.asarray(ax.images[0].get_array())
        heat = heat_image(boxes, weights, picture.size)
        x1, y1, x2, y2 = boxes[top]
        inside = (slice(int(np.ceil(y1)), int(np.floor(y2))), slice(int(np.ceil(x1)), int(np.floor(x2))))
        assert np.all(heat[inside] == weights[top]) and heat.max() == weights[top]
        # where the heat is highest the picture is covered most: its colour is the map's at weight / vmax
        level = weights[top] / vmax
        colour = np.array(matplotlib.colormaps[HEAT_CMAP](level)[:3])
        background = np.asarray(picture, dtype=float)[inside] / 255.0
        np.testing.assert_allclose(drawn[inside], (1 - HEAT_ALPHA * level) * background + HEAT_ALPHA * level * colour,
                                   atol=1e-9)
        # ... and so it is in the rendered PNG, at the box's centre (resampled: one of the picture's pixels
        # around it, the background being textured)
        cx, cy = ax.transData.transform(((x1 + x2) / 2, (y1 + y2) / 2))
        shown = pixels[int(pixels.shape[0] - cy), int(cx)]
        row, col = int((y1 + y2) / 2), int((x1 + x2) / 2)
        around = drawn[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3)
        assert np.abs(around - shown).max(axis=1).min() <= 2.5 / 255


def test_the_cli_writes_the_picture_and_prints_score_and_words(tiny_scan, tiny_data, tmp_path):
    out = tmp_path / "attention.png"
    result = invoke("explain", str(tiny_scan), "--data", str(tiny_data), "--image", str(IMAGE), "--caption",
                    str(5 * IMAGE + 1), "-o", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "score" in result.stdout and "heat maps over the image's boxes" in result.stdout
    assert "attention 0: match[0].cross (scan.t2i)" in result.stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width >= 600 and png.height >= 250
    free = invoke("explain", str(tiny_scan), "--data", str(tiny_data), "--image", "3", "--caption",
                  "a large red circle zzqx", "--device", "cpu")
    assert free.returncode == 0, free.stderr
    assert "a caption given as text" in free.stdout and "circle" in free.stdout
    assert "1 word(s) of the caption are not in the model's vocabulary" in free.stdout and "zzqx" in free.stdout


def test_without_pictures_the_word_by_region_matrix_is_drawn(tiny_scan, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "shapes.json").unlink()  # now an ordinary precomp folder with no images
    out = tmp_path / "matrix.png"
    result = invoke("explain", str(tiny_scan), "--data", str(data), "--image", "2", "-o", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "word x region matrix" in result.stdout and "images/test/shapes-test-000002.png" in result.stdout
    loaded = load_checkpoint(tiny_scan)
    split = open_named_split(data, "test")
    explained = explain_pair(loaded.model, loaded.vocab, split.image_features(np.array([2]))[0], split.captions[10])
    fig = attention_figure(explained, 0)
    drawn = [ax for ax in fig.axes if ax.images][0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(drawn), explained.maps[0].weights)
    assert Image.open(out).format == "PNG"


def test_hdf5_data_converted_from_the_built_in_keeps_its_ids_and_pictures(tiny_scan, tiny_data, tmp_path):
    from itmkit.data.hdf5 import stored_ids

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    converted = invoke("data", "convert", str(data), str(data / "data.h5"), "--splits", "test")
    assert converted.returncode == 0, converted.stderr
    assert stored_ids(data / "data.h5", "test") == (data / "test_ids.txt").read_text().split()
    out = tmp_path / "h5.png"
    result = invoke("explain", str(tiny_scan), "--data", str(data / "data.h5"), "--image", "4", "-o", str(out),
                    "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "(shapes-test-000004)" in result.stdout and "heat maps over the image's boxes" in result.stdout


def test_a_model_without_attention_says_so(tiny_data, tmp_path):
    recipe = parse_recipe(TINY_RECIPE.replace("DATA", str(tiny_data)))
    split = open_named_split(tiny_data, "test")
    from itmkit.data.vocab import Vocabulary

    vocab = Vocabulary.load(tiny_data / "vocab.json")
    model = build_model(recipe, DataPorts(split.feature_dim, len(vocab), split.num_regions), seed=0)
    save_checkpoint(tmp_path / "vsepp.safetensors", model, vocab)
    plain = invoke("explain", str(tmp_path / "vsepp.safetensors"), "--image", "0", "--device", "cpu")
    assert plain.returncode == 0, plain.stderr
    assert "has no cross-attention to draw" in plain.stdout and "contribution" in plain.stdout
    drawn = invoke("explain", str(tmp_path / "vsepp.safetensors"), "--image", "0", "-o", str(tmp_path / "a.png"),
                   "--device", "cpu")
    assert drawn.returncode == 1 and "has no cross-attention to draw" in drawn.stderr
    assert "Traceback" not in drawn.stderr and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--image", "100"], "has images 0 to 99"),
    (["--image", "0", "--caption", "500"], "has captions 0 to 499"),
    (["--image", "0", "--caption", "-1"], "--caption -1: split 'test' has captions 0 to 499"),
    (["--image", "0", "--caption", "  "], "--caption is empty"),
    (["--image", "0", "--attention", "3"], "records 1 attention map(s) (0 to 0)"),
    (["--image", "0", "-o", "x.jpg"], "name a .png file"),
])
def test_bad_requests_are_one_clear_line(tiny_scan, tiny_data, args, message):
    result = invoke("explain", str(tiny_scan), "--data", str(tiny_data), *args, "--device", "cpu")
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_imram_reports_each_steps_attention():
    recipe = parse_recipe((RECIPES_DIR / "imram_shapes.toml").read_text())
    from itmkit.data.vocab import Vocabulary

    vocab = Vocabulary([*Vocabulary.SPECIALS, "a", "red", "circle"])
    model = build_model(recipe, DataPorts(256, len(vocab), 36), seed=0)
    features = np.random.default_rng(0).random((36, 256), dtype=np.float32)
    result = explain_pair(model, vocab, features, "a red circle", region_count=30)
    assert [m.label for m in result.maps] == [f"match[{k}].similarity (imram.{d}) step {s}"
                                              for k, d in enumerate(("t2i", "i2t")) for s in (1, 2)]
    for m in result.maps:  # words' distributions over the regions, or regions' over the words
        assert m.weights.shape == (5, 30)
        np.testing.assert_allclose(m.weights.sum(axis=1 if m.query_side == "text" else 0), 1.0, atol=1e-5)
    assert [m.query_side for m in result.maps] == ["text", "text", "image", "image"]


def test_reporting_outside_a_recording_does_nothing():
    note_attention(torch.ones(1, 1, 2, 3), "text")  # no recording: nothing to append to, no error
    with recording() as maps:
        note_attention(torch.ones(2, 2, 2, 3) / 3, "image", "step 1")
    assert len(maps) == 1 and maps[0].weights.shape == (3, 2) and maps[0].label == "step 1"
