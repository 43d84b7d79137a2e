"""``itmkit search``: with a shortlist covering the gallery, re-scored results are full scoring's ranking
with its scores; without re-scoring, the first stage's; captions for an image; the clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.datasets import open_named_split
from itmkit.evaluate import similarity_matrix

from cliutil import invoke
from test_index import make_checkpoints


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """An exact index of the 30 test images and 150 captions, and both models' full score matrices."""
    folder, data = make_checkpoints(tmp_path_factory.mktemp("search"))
    result = invoke("index", "build", str(folder / "scan.safetensors"), "--first-stage",
                    str(folder / "vsepp.safetensors"), "--data", str(data), "--split", "test", "-o",
                    str(folder / "idx"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    split = open_named_split(data, "test")
    vocab = Vocabulary.load(data / "vocab.json")
    first = similarity_matrix(load_checkpoint(folder / "vsepp.safetensors").model, vocab, split)[0]
    second = similarity_matrix(load_checkpoint(folder / "scan.safetensors").model, vocab, split)[0]
    return folder, split, first, second


def search_json(*args: str) -> dict:
    result = invoke("search", *args, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def image_row(image_id: str) -> int:
    return int(image_id.rsplit("-", 1)[1])


@pytest.mark.parametrize("caption", [0, 17, 149])
def test_rescoring_the_whole_gallery_is_full_scoring(indexed, caption):
    folder, split, first, second = indexed
    got = search_json(str(folder / "idx"), split.captions[caption], "--k", "30", "--rescore",
                      str(folder / "scan.safetensors"), "--shortlist", "30")
    rows = [image_row(r["image_id"]) for r in got["results"]]
    assert rows == np.argsort(-second[:, caption], kind="stable").tolist()
    np.testing.assert_allclose([r["second_stage_score"] for r in got["results"]], second[rows, caption], atol=1e-5)
    np.testing.assert_allclose([r["first_stage_score"] for r in got["results"]], first[rows, caption], atol=1e-5)
    assert got["gallery"] == "images" and got["shortlist"] == 30


def test_without_rescoring_the_first_stage_ranks(indexed):
    folder, split, first, _ = indexed
    got = search_json(str(folder / "idx"), split.captions[42], "--k", "5")
    rows = [image_row(r["image_id"]) for r in got["results"]]
    assert rows == np.argsort(-first[:, 42], kind="stable")[:5].tolist()
    assert all(r["second_stage_score"] is None for r in got["results"])
    assert got["rescored_by"] is None and set(got["seconds"]) == {"first_stage"}


def test_a_short_shortlist_reorders_only_the_first_stages_top(indexed):
    folder, split, first, second = indexed
    got = search_json(str(folder / "idx"), split.captions[7], "--k", "3", "--rescore",
                      str(folder / "scan.safetensors"), "--shortlist", "8")
    top8 = np.argsort(-first[:, 7], kind="stable")[:8]
    expected = top8[np.argsort(-second[top8, 7], kind="stable")][:3]
    assert [image_row(r["image_id"]) for r in got["results"]] == expected.tolist()


def test_captions_for_an_image_are_full_scoring_of_its_row(indexed):
    folder, split, first, second = indexed
    got = search_json(str(folder / "idx"), "--image", "shapes-test-000003", "--k", "150", "--rescore",
                      str(folder / "scan.safetensors"), "--shortlist", "150")
    columns = [r["caption_index"] for r in got["results"]]
    assert columns == np.argsort(-second[3], kind="stable").tolist()
    np.testing.assert_allclose([r["second_stage_score"] for r in got["results"]], second[3, columns], atol=1e-5)
    np.testing.assert_allclose([r["first_stage_score"] for r in got["results"]], first[3, columns], atol=1e-5)
    assert [r["caption"] for r in got["results"]] == [split.captions[c] for c in columns]
    assert [r["of_query_image"] for r in got["results"]] == [c // 5 == 3 for c in columns]


def test_the_table_names_the_images_and_draws_the_built_in_ones(indexed):
    folder, split, _, _ = indexed
    result = invoke("search", str(folder / "idx"), split.captions[0], "--k", "3", "--rescore",
                    str(folder / "scan.safetensors"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "shapes-test-" in result.stdout and "re-scored" in result.stdout
    drawn = list((folder / "idx" / "rendered").glob("shapes-test-*.png"))
    assert len(drawn) >= 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in drawn)


def test_a_moved_first_stage_is_found_again_by_its_hash(indexed, tmp_path):
    folder, split, _, _ = indexed
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved, ignore=shutil.ignore_patterns("data"))
    (moved / "elsewhere.safetensors").write_bytes((moved / "vsepp.safetensors").read_bytes())
    (folder / "vsepp.safetensors").rename(tmp_path / "away.safetensors")
    try:
        lost = invoke("search", str(moved / "idx"), split.captions[0], "--device", "cpu")
        assert lost.returncode == 1 and "is not a file here" in lost.stderr
        found = invoke("search", str(moved / "idx"), split.captions[0], "--first-stage",
                       str(moved / "elsewhere.safetensors"), "--device", "cpu", "--json")
        assert found.returncode == 0, found.stderr
        other = invoke("search", str(moved / "idx"), split.captions[0], "--first-stage",
                       str(moved / "scan.safetensors"), "--device", "cpu")
        assert other.returncode == 1 and "not the checkpoint" in other.stderr
    finally:
        (tmp_path / "away.safetensors").rename(folder / "vsepp.safetensors")


def test_a_query_of_unknown_words_is_warned_about(indexed):
    folder, _, _, _ = indexed
    result = invoke("search", str(folder / "idx"), "zebra quokka", "--device", "cpu")
    assert result.returncode == 0 and "no word of the query" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["a red circle", "--rescore", "vsepp.safetensors"], "not the checkpoint index"),
    (["--image", "shapes-test-00003"], "is not an image of index"),
    ([], "give a query"),
    (["a red circle", "--image", "shapes-test-000003"], "not both"),
    (["a red circle", "--shortlist", "5"], "give --rescore MODEL"),
    (["a red circle", "--k", "0"], "--k must be at least 1"),
    (["a red circle", "--search-params", "nprobe=3"], "does not apply to this index"),
    (["  "], "the query is empty"),
])
def test_search_errors_are_one_clear_line(indexed, args, message):
    folder = indexed[0]
    args = [str(folder / a) if a.endswith(".safetensors") else a for a in args]
    result = invoke("search", str(folder / "idx"), *args, "--device", "cpu")
    assert result.returncode == 1, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_folder_that_is_not_an_index(tmp_path):
    result = invoke("search", str(tmp_path), "a red circle")
    assert result.returncode == 1 and "not an itmkit index" in result.stderr
