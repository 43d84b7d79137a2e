"""Two-stage evaluation (``itmkit.twostage``, ``itmkit eval --shortlist``) against a slow reference built
from the two models' full similarity matrices: shortlist = the first stage's top K, then the shortlist by
the second stage's scores, then the rest of the gallery by the first stage's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import itmkit.evaluation as evaluation
from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import save_checkpoint
from itmkit.data.shapes import write_shapes
from itmkit.data.vocab import Vocabulary
from itmkit.datasets import open_named_split
from itmkit.errors import ItmkitError
from itmkit.evaluate import similarity_matrix
from itmkit.evaluation import protocol_galleries, protocol_metrics
from itmkit.recipe import parse_recipe
from itmkit.twostage import evaluate_two_stage, first_stage_problem

from cliutil import invoke

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """30 built-in test images (150 captions), an untrained VSE++ (first stage) and SCAN t-i (second)."""
    folder = tmp_path_factory.mktemp("twostage")
    write_shapes(folder, seed=0, sizes={"train": 40, "test": 30})
    split = open_named_split(folder, "test")
    vocab = Vocabulary.load(folder / "vocab.json")
    ports = DataPorts(split.features.shape[-1], len(vocab), split.features.shape[1])
    first = build_model(parse_recipe((RECIPES / "vsepp.toml").read_text()), ports, seed=0).eval()
    second = build_model(parse_recipe((RECIPES / "scan_shapes_t2i.toml").read_text()), ports, seed=1).eval()
    return folder, split, vocab, first, second


def reference_metrics(first_sims: np.ndarray, second_sims: np.ndarray, image_of: np.ndarray, k: int) -> dict:
    """Two-stage ranks by a per-query loop over Python lists, then the standard summary."""
    def rank(first_row, second_row, is_true):
        shortlist = sorted(range(len(first_row)), key=lambda j: (-first_row[j], j))[:k]
        head = sorted(shortlist, key=lambda j: (-second_row[j], -j))  # ties: the later item first, as numpy
        rest = sorted(set(range(len(first_row))) - set(shortlist), key=lambda j: (-first_row[j], -j))
        return next(r for r, j in enumerate(head + rest) if is_true(j)), any(is_true(j) for j in shortlist)

    i2t = [rank(first_sims[i], second_sims[i], lambda j, i=i: image_of[j] == i) for i in range(len(first_sims))]
    t2i = [rank(first_sims[:, c], second_sims[:, c], lambda j, c=c: j == image_of[c]) for c in range(len(image_of))]
    out = evaluation.ranks_metrics(np.array([r for r, _ in i2t]), np.array([r for r, _ in t2i]))
    out["i2t_shortlist_recall"] = 100.0 * np.mean([hit for _, hit in i2t])
    out["t2i_shortlist_recall"] = 100.0 * np.mean([hit for _, hit in t2i])
    return out


def full_matrices(setup):
    _, split, vocab, first, second = setup
    return similarity_matrix(first, vocab, split)[0], similarity_matrix(second, vocab, split)[0]


@pytest.mark.parametrize("k", [1, 4, 13])
def test_two_stage_ranks_equal_the_per_query_reference(setup, k):
    _, split, vocab, first, second = setup
    first_sims, second_sims = full_matrices(setup)
    got = evaluate_two_stage((second, vocab), (first, vocab), split, "f30k-1k", k).metrics
    expected = reference_metrics(first_sims, second_sims, split.caption_images, k)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_a_shortlist_covering_the_gallery_is_full_scoring(setup):
    _, split, vocab, first, second = setup
    _, second_sims = full_matrices(setup)
    got = evaluate_two_stage((second, vocab), (first, vocab), split, "f30k-1k", split.num_captions).metrics
    assert got.pop("i2t_shortlist_recall") == got.pop("t2i_shortlist_recall") == 100.0
    assert got == protocol_metrics(second_sims, "f30k-1k", split.caption_images)


def test_one_model_is_its_own_first_stage(setup):
    _, split, vocab, first, _ = setup
    first_sims, _ = full_matrices(setup)
    got = evaluate_two_stage((first, vocab), (first, vocab), split, "f30k-1k", 3).metrics
    plain = protocol_metrics(first_sims, "f30k-1k", split.caption_images)
    # re-scoring with the first stage itself reorders nothing: R@K for K <= 3 and the ranks past 3 are the first's
    for key in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10", "i2t_meanr", "t2i_meanr"):
        assert got[key] == pytest.approx(plain[key], abs=1e-9), key


def test_folds_rank_within_their_own_gallery(setup, monkeypatch):
    """coco-1k-5fold, scaled down to folds of 6 images: each fold's queries see only the fold's items."""
    _, split, vocab, first, second = setup
    monkeypatch.setitem(evaluation.PROTOCOL_IMAGES, "coco-1k-5fold", 30)
    monkeypatch.setattr(evaluation, "COCO_FOLD_IMAGES", 6)
    first_sims, second_sims = full_matrices(setup)
    galleries = protocol_galleries("coco-1k-5fold", 5, 30)
    assert [len(i) for i, _ in galleries] == [6] * 5 and [len(c) for _, c in galleries] == [30] * 5
    assert np.array_equal(np.concatenate([c for _, c in galleries]), np.arange(150))
    k = 4
    got = evaluate_two_stage((second, vocab), (first, vocab), split, "coco-1k-5fold", k).metrics
    folds = []
    for images, captions in galleries:
        block = np.ix_(images, captions)
        folds.append(reference_metrics(first_sims[block], second_sims[block], split.caption_images[captions] - images[0], k))
    expected = evaluation.average_folds(folds)
    expected["i2t_shortlist_recall"] = np.mean([f["i2t_shortlist_recall"] for f in folds])
    expected["t2i_shortlist_recall"] = np.mean([f["t2i_shortlist_recall"] for f in folds])
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_an_approximate_first_stage_runs_with_its_parameters(setup):
    _, split, vocab, first, second = setup
    got = evaluate_two_stage((second, vocab), (first, vocab), split, "f30k-1k", 5, index_spec="HNSW8",
                             search_params="efSearch=64").metrics
    exact = evaluate_two_stage((second, vocab), (first, vocab), split, "f30k-1k", 5).metrics
    # a tiny gallery: HNSW with a wide beam finds the exact shortlist
    assert got == exact


def test_models_without_pools_cannot_shortlist(setup):
    *_, second = setup
    assert "no pooled vector on the image and text side" in first_stage_problem(second)
    _, split, vocab, first, _ = setup
    with pytest.raises(ItmkitError, match="--first-stage"):
        evaluate_two_stage((first, vocab), (second, vocab), split, "f30k-1k", 5)


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoints(setup, tmp_path_factory):
    folder, split, vocab, first, second = setup
    out = tmp_path_factory.mktemp("twostage-ckpt")
    save_checkpoint(out / "vsepp.safetensors", first, vocab)
    save_checkpoint(out / "scan.safetensors", second, vocab)
    return folder, out / "vsepp.safetensors", out / "scan.safetensors"


def test_cli_json_holds_both_stages_and_full_scoring(setup, checkpoints):
    folder, vsepp, scan = checkpoints
    result = invoke("eval", str(scan), "--data", str(folder), "--split", "test", "--shortlist", "4",
                    "--first-stage", str(vsepp), "--compare-full", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    first_sims, second_sims = full_matrices(setup)
    expected = reference_metrics(first_sims, second_sims, setup[1].caption_images, 4)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert set(metrics["seconds"]) == {"encode", "shortlist", "rescore", "rank", "total"}
    assert metrics["full"]["rsum"] == pytest.approx(protocol_metrics(second_sims, "f30k-1k", 5)["rsum"], abs=1e-9)
    assert metrics["full"]["seconds"] > 0


def test_cli_table(checkpoints):
    folder, vsepp, scan = checkpoints
    result = invoke("eval", str(scan), "--data", str(folder), "--split", "test", "--shortlist", "3",
                    "--first-stage", str(vsepp), "--compare-full", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for text in ("two-stage", "recall@3", "re-score", "scoring", "faster"):  # words: the console wraps lines
        assert text in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--compare-full"], "give --shortlist K"),
    (["--shortlist", "3", "--rerank", "mtfn-rr"], "--rerank cannot go with it"),
    (["--shortlist", "0", "--first-stage", "VSEPP"], "at least 1"),
    (["--shortlist", "3"], "no pooled vector"),
    (["--shortlist", "3", "--first-stage", "VSEPP", "--index-type", "IVF9x"], "not a faiss index factory string"),
    (["--shortlist", "3", "--first-stage", "VSEPP", "--search-params", "nprobe=4"], "does not apply to this index"),
])
def test_cli_errors_are_one_clear_line(checkpoints, args, message):
    folder, vsepp, scan = checkpoints
    args = [str(vsepp) if a == "VSEPP" else a for a in args]
    result = invoke("eval", str(scan), "--data", str(folder), "--split", "test", "--device", "cpu", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
