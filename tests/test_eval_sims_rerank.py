"""``itmkit eval --sims`` (a saved matrix from any source) and ``--rerank mtfn-rr``, with and without checkpoints."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

from cliutil import assert_clean_failure, flat, invoke
from itmkit.evaluation import protocol_metrics
from itmkit.rerank import rerank_metrics
from tinydata import write_recipe, write_tiny

CPU = ("--device", "cpu")


def saved(tmp_path, sims, name="sims.npy"):
    path = tmp_path / name
    np.save(path, sims)
    return path


def matrix(n_images=12, seed=0, levels=None):
    sims = np.random.default_rng(seed).standard_normal((n_images, 5 * n_images)).astype(np.float32)
    return np.round(sims * levels) / levels if levels else sims


def test_a_saved_matrix_scores_as_the_metrics_of_the_matrix(tmp_path):
    sims = matrix()
    result = invoke("eval", "--sims", str(saved(tmp_path, sims)), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == protocol_metrics(sims, "f30k-1k")
    table = invoke("eval", "--sims", str(saved(tmp_path, sims)))
    assert table.returncode == 0 and "rSum" in table.stdout and "12 images x 60 captions" in flat(table.stdout)


def test_rerank_reports_both_and_says_it_reads_the_grouping(tmp_path):
    sims = matrix(levels=3)  # ties everywhere
    path = saved(tmp_path, sims.astype(np.float64))
    result = invoke("eval", "--sims", str(path), "--rerank", "mtfn-rr", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == rerank_metrics(sims, "f30k-1k")
    assert "ground-truth caption grouping" in flat(result.stderr)
    deeper = invoke("eval", "--sims", str(path), "--rerank", "mtfn-rr", "--rerank-k-i2t", "3", "--rerank-k-t2i", "4",
                    "--json")
    assert json.loads(deeper.stdout) == rerank_metrics(sims, "f30k-1k", k_i2t=3, k_t2i=4)
    table = invoke("eval", "--sims", str(path), "--rerank", "mtfn-rr")
    assert table.returncode == 0 and "re-ranked by mtfn-rr" in flat(table.stdout)
    assert flat(table.stdout).count("rSum") == 2


def test_ties_near_the_top_are_pointed_out(tmp_path):
    """Re-ranking orders ties as the official rerank.py, the plain metrics as VSE++: a one-deep
    re-ranking changes nothing but tie order, and the output says so."""
    tied = np.repeat(np.arange(10, dtype=np.float32)[:, None], 50, axis=1)  # every row one score
    result = invoke("eval", "--sims", str(saved(tmp_path, tied)), "--rerank", "mtfn-rr", "--rerank-k-i2t", "1",
                    "--rerank-k-t2i", "1", "--json")
    assert result.returncode == 0 and "lists hold tied scores" in flat(result.stderr)
    untied = invoke("eval", "--sims", str(saved(tmp_path, matrix(seed=3), "u.npy")), "--rerank", "mtfn-rr", "--json")
    assert untied.returncode == 0 and "tied" not in untied.stderr


def test_a_checkpoint_evaluates_with_rerank_beside_its_plain_metrics(tmp_path):
    data = write_tiny(tmp_path / "data")
    recipe = write_recipe(tmp_path / "tiny.toml", str(data))
    run = tmp_path / "run"
    assert invoke("train", str(recipe), "--out", str(run), *CPU).returncode == 0
    checkpoint = str(run / "model_best.safetensors")
    plain = json.loads(invoke("eval", checkpoint, "--json", *CPU).stdout)
    sims_path = tmp_path / "saved.npy"
    reranked = invoke("eval", checkpoint, "--rerank", "mtfn-rr", "--json", "--save-sims", str(sims_path), *CPU)
    assert reranked.returncode == 0, reranked.stderr
    out = json.loads(reranked.stdout)
    assert out["before_rerank"] == plain
    assert out == json.loads(invoke("eval", "--sims", str(sims_path), "--rerank", "mtfn-rr", "--json").stdout)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p, np.zeros((3, 14), np.float32)), "no whole number of captions per image"),
    (lambda p: np.save(p, np.zeros(15, np.float32)), r"shape \(15,\); expected \(images, captions\)"),
    (lambda p: np.save(p, np.array([[1, np.nan, 0, 0, 0]], np.float32)), r"1 similarity score\(s\) are NaN or inf"),
    (lambda p: np.save(p, np.zeros((1, 5), bool)), "dtype bool; expected real numbers"),
    (lambda p: np.save(p, np.array([[object()] * 5], dtype=object), allow_pickle=True),
     r"not a plain numeric \.npy array \(Array can.t be memory-mapped: Python objects in dtype\)"),
    (lambda p: p.write_bytes(pickle.dumps([[0.0] * 5])), r"not a \.npy file \(it does not start with numpy's magic"),
    (lambda p: p.write_text("0.1 0.2 0.3 0.4 0.5\n"), r"not a \.npy file"),
    (lambda p: np.save(p, np.zeros((50, 10), np.float32)), r"captions x images\? save its transpose"),
    (lambda p: np.savez(open(p, "wb"), a=np.zeros((1, 5))), r"an \.npz archive"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"), "sims.npy"),
])
def test_a_bad_matrix_is_one_clear_error(tmp_path, make, message):
    path = tmp_path / "sims.npy"
    make(path)
    text = assert_clean_failure(invoke("eval", "--sims", str(path)))
    assert str(path) in text
    assert re.search(message, text), text


def test_a_wrong_protocol_or_reranker_or_combination_is_one_clear_error(tmp_path):
    path = str(saved(tmp_path, matrix()))
    assert "needs the 5000-image COCO test split" in assert_clean_failure(
        invoke("eval", "--sims", path, "--protocol", "coco-5k"))
    assert "did you mean 'mtfn-rr'" in assert_clean_failure(invoke("eval", "--sims", path, "--rerank", "mtfn"))
    assert "must be at least 1" in assert_clean_failure(invoke("eval", "--sims", path, "--rerank", "mtfn-rr",
                                                               "--rerank-k-i2t", "0"))
    assert "checkpoints, --split cannot go with it" in assert_clean_failure(
        invoke("eval", "some.safetensors", "--sims", path, "--split", "dev"))
    assert "nothing to evaluate" in assert_clean_failure(invoke("eval"))
    assert "give --rerank mtfn-rr with it" in assert_clean_failure(invoke("eval", "--sims", path, "--rerank-k-i2t", "5"))
    assert "--device cannot go with it" in assert_clean_failure(invoke("eval", "--sims", path, "--device", "cpu"))
    assert f"use --sims {path}" in assert_clean_failure(invoke("eval", path))
    assert "does not exist" in assert_clean_failure(invoke("eval", "--sims", str(tmp_path / "none.npy")))
