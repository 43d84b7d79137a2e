"""``itmkit index build``: what an index folder holds, that a killed build leaves nothing that loads, that
an approximate index finds what the exact one finds, and the clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import save_checkpoint
from itmkit.data.shapes import write_shapes
from itmkit.data.vocab import Vocabulary
from itmkit.datasets import open_named_split
from itmkit.errors import ItmkitError
from itmkit.index import MANIFEST, Index, file_sha256
from itmkit.recipe import parse_recipe

from cliutil import invoke

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def make_checkpoints(folder: Path) -> tuple[Path, Path]:
    """30 built-in test images (150 captions) in ``folder/data``; untrained VSE++ (a first stage) and SCAN
    t-i (no pools) checkpoints beside them. Returns (folder, data folder)."""
    data = write_shapes(folder / "data", seed=0, sizes={"train": 40, "test": 30})
    split = open_named_split(data, "test")
    vocab = Vocabulary.load(data / "vocab.json")
    ports = DataPorts(split.features.shape[-1], len(vocab), split.features.shape[1])
    vsepp = build_model(parse_recipe((RECIPES / "vsepp.toml").read_text()), ports, seed=0)
    scan = build_model(parse_recipe((RECIPES / "scan_shapes_t2i.toml").read_text()), ports, seed=1)
    save_checkpoint(folder / "vsepp.safetensors", vsepp, vocab)
    save_checkpoint(folder / "scan.safetensors", scan, vocab)
    return folder, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("index"))


def build(setup, out: Path, *args: str):
    folder, data = setup
    return invoke("index", "build", str(folder / "scan.safetensors"), "--first-stage", str(folder / "vsepp.safetensors"),
                  "--data", str(data), "--split", "test", "-o", str(out), "--device", "cpu", *args)


def test_an_index_holds_both_sides_and_what_built_it(setup, tmp_path):
    folder, data = setup
    result = build(setup, tmp_path / "idx", "--shard-size", "7")
    assert result.returncode == 0, result.stderr
    assert "30 images" in result.stdout and "150 captions" in result.stdout
    index = Index(tmp_path / "idx")
    manifest = index.manifest
    assert manifest["sides"] == {"images": {"items": 30}, "captions": {"items": 150}}
    assert manifest["model"]["sha256"] == file_sha256(folder / "scan.safetensors")
    assert manifest["first_stage"]["sha256"] == file_sha256(folder / "vsepp.safetensors")
    assert manifest["split"] == "test" and manifest["builtin_data"] == {"seed": 0}
    assert index.image_ids()[:2] == ["shapes-test-000000", "shapes-test-000001"]
    assert index.captions() == open_named_split(data, "test").captions
    assert index.caption_images().tolist() == [c // 5 for c in range(150)]
    assert index.faiss("images").ntotal == 30 and index.faiss("captions").ntotal == 150
    assert len(index.store("captions")) == 150 and index.store("images").num_shards == 5  # 30 items, 7 a shard
    vectors = index.vectors("images")
    assert vectors.shape == (30, manifest["dim"]) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert not list(tmp_path.glob(".idx.building-*"))  # the temporary folder was renamed into place


def test_one_side_only(setup, tmp_path):
    assert build(setup, tmp_path / "idx", "--side", "images").returncode == 0
    index = Index(tmp_path / "idx")
    assert index.sides == {"images"}
    assert not (tmp_path / "idx" / "captions.txt").exists()
    with pytest.raises(ItmkitError, match="no captions side"):
        index.require("captions", "--image retrieves captions")


def test_an_existing_index_is_replaced_only_with_force(setup, tmp_path):
    assert build(setup, tmp_path / "idx").returncode == 0
    again = build(setup, tmp_path / "idx")
    assert again.returncode == 1 and "--force" in again.stderr
    assert build(setup, tmp_path / "idx", "--force", "--side", "images").returncode == 0
    assert Index(tmp_path / "idx").sides == {"images"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.building")] == []


def test_a_folder_of_other_files_is_never_replaced(setup, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = build(setup, tmp_path / "mine", "--force")
    assert result.returncode == 1 and "not an itmkit index" in result.stderr and "notes.txt" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_killed_build_leaves_nothing_that_loads_and_the_next_build_cleans_up(setup, tmp_path):
    folder, data = setup
    marker = tmp_path / "paused"
    env = {**os.environ, "ITMKIT_TEST_PAUSE_BEFORE_RENAME": str(marker), "ITMKIT_TEST_PAUSE_FILE": MANIFEST,
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-m", "itmkit", "index", "build", str(folder / "scan.safetensors"),
                             "--first-stage", str(folder / "vsepp.safetensors"), "--data", str(data), "--split",
                             "test", "-o", str(out), "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no pause before the manifest"
    os.kill(proc.pid, signal.SIGKILL)  # every file written, the manifest not yet in place
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".idx.building-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "images.faiss").exists()
    with pytest.raises(ItmkitError, match="not an itmkit index"):
        Index(leftovers[0])
    assert build(setup, out).returncode == 0
    assert not list(tmp_path.glob(".idx.building-*"))  # the dead build's folder was removed
    assert Index(out).sides == {"images", "captions"}


def test_a_damaged_index_says_what_is_wrong(setup, tmp_path):
    assert build(setup, tmp_path / "idx").returncode == 0
    (tmp_path / "idx" / "captions.faiss").write_bytes(b"truncated")
    with pytest.raises(ItmkitError, match="captions.faiss is 9 bytes"):
        Index(tmp_path / "idx")
    (tmp_path / "idx" / MANIFEST).write_text("{not json")
    with pytest.raises(ItmkitError, match="manifest.json is damaged"):
        Index(tmp_path / "idx")
    with pytest.raises(ItmkitError, match="index folder not found"):
        Index(tmp_path / "nowhere")


def test_an_approximate_index_finds_what_the_exact_one_finds(setup, tmp_path):
    assert build(setup, tmp_path / "flat").returncode == 0
    exact = Index(tmp_path / "flat")  # the gallery: 150 captions; the queries: the 30 images
    queries = np.ascontiguousarray(exact.vectors("images"))
    _, truth = exact.faiss("captions").search(queries, 10)

    def recall(index: Index, params: str | None = None) -> float:
        _, found = index.faiss("captions", params).search(queries, 10)
        return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))

    # The stored search parameters apply; wider ones find more; an IVF probing every list is exact.
    cases = (("hnsw", "HNSW8", "efSearch=16", 0.9, "efSearch=64"), ("ivf", "IVF4,Flat", "nprobe=3", 0.75, "nprobe=4"))
    for name, spec, params, floor, wider in cases:
        result = build(setup, tmp_path / name, "--index-type", spec, "--search-params", params)
        assert result.returncode == 0, result.stderr
        approx = Index(tmp_path / name)
        assert (approx.manifest["index_type"], approx.manifest["search_params"]) == (spec, params)
        stored = recall(approx)
        assert floor <= stored <= recall(approx, wider), (name, stored)
    assert recall(Index(tmp_path / "ivf"), "nprobe=4") == 1.0
    assert recall(Index(tmp_path / "ivf"), "nprobe=1") < 1.0  # the parameter is really applied


@pytest.mark.parametrize("args, message", [
    (["--index-type", "Flaat"], "not a faiss index factory string"),
    (["--index-type", "IVF64,Flat"], "cannot be trained on 30 vectors"),
    (["--search-params", "nprobe=4"], "does not apply to this index"),
    (["--side", "image"], "did you mean 'images'"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
])
def test_build_errors_are_one_clear_line(setup, tmp_path, args, message):
    result = build(setup, tmp_path / "idx", *args)
    assert result.returncode == 1, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "idx").exists() and not list(tmp_path.glob(".idx.building-*"))


def test_a_model_without_pools_needs_a_first_stage(setup, tmp_path):
    folder, data = setup
    result = invoke("index", "build", str(folder / "scan.safetensors"), "--data", str(data), "--split", "test",
                    "-o", str(tmp_path / "idx"), "--device", "cpu")
    assert result.returncode == 1 and "--first-stage" in result.stderr and "no pooled vector" in result.stderr


def test_the_manifest_is_plain_json_and_lists_every_file(setup, tmp_path):
    assert build(setup, tmp_path / "idx").returncode == 0
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    on_disk = {str(p.relative_to(tmp_path / "idx")) for p in (tmp_path / "idx").rglob("*") if p.is_file()}
    assert on_disk - set(manifest["files"]) == {MANIFEST}
