"""Pre-flight checks: problems found before the work, by one set of functions for train, eval and data check."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cliutil import flat, invoke
from itmkit.evaluation import protocol_problem
from itmkit.preflight import Need, fit_problems
from itmkit.stage import DataNeeds
from itmkit.recipe import load_recipe
from itmkit.train import train
from tinydata import train_tiny, write_recipe, write_tiny

SGRAF_POOL = 'pool = { stage = "core.mean" }\n\n[text]'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("run"), data)


def test_eval_on_features_of_another_width_is_one_line_before_scoring(run, tmp_path):
    wide = write_tiny(tmp_path / "wide", width=12)
    best = run / "model_best.safetensors"
    result = invoke("eval", str(best), "--data", str(wide), "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "scored" not in result.stderr
    assert (f"{wide / 'test_ims.npy'} has 12-d features, but {best} takes 8-d image features"
            " (features from another extractor?)") in flat(result.stderr)
    assert result.stderr.count("\n") == 1 and "(found before scoring; nothing was run)" in flat(result.stderr)


def test_an_ensemble_names_the_member_that_does_not_fit(run, data, tmp_path):
    other = tmp_path / "other"
    train(load_recipe(write_recipe(tmp_path / "tiny.toml", write_tiny(tmp_path / "wide", width=12))), out_dir=other,
          log=lambda *a: None)
    result = invoke("eval", str(run / "model_best.safetensors"), str(other / "model_best.safetensors"),
                    "--data", str(data), "--device", "cpu")
    stderr = flat(result.stderr)
    assert result.returncode == 1 and stderr.count("error:") == 1 and "(found before scoring; nothing was run)" in stderr
    assert f"but {other / 'model_best.safetensors'} takes 12-d image features" in stderr


def test_resume_on_features_of_another_width_is_refused_before_training(data, tmp_path):
    # The run's data.path, rewritten with wider features (--resume refuses another data.path before this check).
    copy, wide = tmp_path / "run", tmp_path / "data"
    recipe = write_recipe(tmp_path / "tiny.toml", shutil.copytree(data, wide))
    train(load_recipe(recipe), out_dir=copy, log=lambda *a: None)
    before = (copy / "last.safetensors").read_bytes()
    shutil.rmtree(wide)
    write_tiny(wide, width=12)
    result = invoke("train", str(recipe), "--out", str(copy), "--resume", "--set", "train.epochs=2", "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"{wide / 'train_ims.npy'} has 12-d features, but {copy / 'last.safetensors'} (--resume) takes 8-d image"
            " features") in flat(result.stderr)
    assert (copy / "last.safetensors").read_bytes() == before


def test_a_model_built_for_a_fixed_region_count_is_checked_before_epoch_1(data, tmp_path):
    pytest.importorskip("itmkit_sgraf")
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    recipe.write_text(recipe.read_text().replace(SGRAF_POOL, SGRAF_POOL.replace(
        '{ stage = "core.mean" }', '{ stage = "sgraf.visual_sa", num_regions = 2 }')))
    result = invoke("train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu")
    stderr = flat(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "epoch 1/" not in stderr
    assert (f"{data / 'train_ims.npy'} has images with 3 regions, but the model of tiny (image.pool: sgraf.visual_sa)"
            " was built for at most 2.") in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_fit_problems_and_declared_region_bounds():
    bound = lambda n: (Need("m", "image.pool", "sgraf.visual_sa", DataNeeds(max_regions=n)),)  # noqa: E731

    class Parts:
        features = np.zeros((2, 10, 4), np.float32)
        name, source, boxes, image_sizes = "test", "DIR", None, None

    assert fit_problems(Parts, 4, (), "m") == []
    assert fit_problems(Parts, 4, bound(36), "m") == []  # fewer regions than slots are masked
    assert fit_problems(Parts, 4, bound(8), "m") == [
        "split 'test' of DIR (features) has images with 10 regions, but m (image.pool: sgraf.visual_sa) was built"
        " for at most 8."]

    class Counted(Parts):  # stored 10 wide, but no image has more than 6 real regions
        region_counts = np.array([6, 3])

    assert fit_problems(Counted, 4, bound(8), "m") == []
    assert fit_problems(Counted, 4, bound(5), "m") == [
        "split 'test' of DIR (features) has images with 6 regions, but m (image.pool: sgraf.visual_sa) was built"
        " for at most 5."]


@pytest.mark.parametrize("protocol, images, ok", [
    ("f30k-1k", 7, True), ("coco-5k", 5000, True), ("coco-5k", 1000, False), ("coco-1k-5fold", 1000, False),
    ("coco-1k-5fold", 5000, True), ("coco-5k", 5001, False), ("f30k", 1000, False),
])
def test_protocol_fits_the_test_split(protocol, images, ok):
    assert (protocol_problem(protocol, images) is None) == ok


def _problem_lines(text: str) -> set[str]:
    """The problem sentences of train's '  - ' lines or data check's 'problem:' lines."""
    found = re.findall(r"(?:^  - |^problem: )(.*?)(?=\n(?:  - |problem: |error: )|\Z)", text, re.M | re.S)
    return {flat(p) for p in found}


def test_data_check_with_the_recipe_reports_what_train_reports(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    write_tiny(bad, {"train": 1, "test": 6}, width=12)
    (bad / "dev_caps.txt").write_text("too few\n")
    recipe = write_recipe(tmp_path / "tiny.toml", bad)
    trained = invoke("train", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.protocol=coco-5k")
    checked = invoke("data", "check", str(bad), "--recipe", str(recipe), "--set", "data.protocol=coco-5k")
    assert trained.returncode == checked.returncode == 1
    problems = _problem_lines(trained.stderr)
    assert len(problems) == 4, trained.stderr  # dev captions, width, one batch, protocol
    assert problems == _problem_lines(checked.stderr)


def test_data_check_takes_coco_testall_as_the_test_split(data, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(data, coco)
    for suffix in ("ims.npy", "caps.txt"):
        (coco / f"test_{suffix}").rename(coco / f"testall_{suffix}")
    assert invoke("data", "check", str(coco)).returncode == 0
    (coco / "testall_ims.npy").unlink()
    (coco / "testall_caps.txt").unlink()
    result = invoke("data", "check", str(coco))
    assert result.returncode == 1 and "has no test split 'test' or 'testall'" in flat(result.stderr)


def test_global_features_are_checked_as_one_region_per_image(tmp_path):
    # VSE++'s layout: one 2-D row of width F per image; the batch and protocol checks still apply.
    data = write_tiny(tmp_path / "global", {"train": 1, "dev": 6, "test": 6})
    for split, n in (("train", 1), ("dev", 6), ("test", 6)):
        np.save(data / f"{split}_ims.npy", np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32))
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    result = invoke("train", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.protocol=coco-5k")
    stderr = flat(result.stderr)
    assert result.returncode == 1 and "fewer than one batch" in stderr and "coco-5k needs the 5000-image" in stderr
