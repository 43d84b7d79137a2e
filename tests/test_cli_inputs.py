"""Inputs the command line used to take wrongly: an HDF5 file as the data path, ``data synth --sizes``,
an empty ``data.path``, ``stages --kind`` with ``--describe``."""

from __future__ import annotations

import shutil

import pytest

from cliutil import assert_clean_failure, flat, invoke
from itmkit.data import hdf5
from tinydata import write_recipe, write_tiny

CPU = ("--device", "cpu")


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    """A tiny dataset as one HDF5 file, data.h5, alone in its folder."""
    root = tmp_path_factory.mktemp("h5")
    hdf5.convert_precomp_to_hdf5(write_tiny(root / "precomp"), root / "h0" / "data.h5")
    return root / "h0" / "data.h5"


def test_an_hdf5_file_is_a_data_path_for_train_eval_and_check(h5, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", "shapes")
    run = tmp_path / "run"
    trained = invoke("train", str(recipe), "--data", str(h5), "--out", str(run), *CPU)
    assert trained.returncode == 0, trained.stderr
    scored = invoke("eval", str(run / "model_best.safetensors"), "--data", str(h5), "--json", *CPU)
    assert scored.returncode == 0, scored.stderr
    recorded = invoke("eval", str(run / "model_best.safetensors"), "--json", *CPU)  # the data.path it recorded
    assert recorded.returncode == 0 and recorded.stdout == scored.stdout, recorded.stderr
    checked = invoke("data", "check", str(h5))
    assert checked.returncode == 0 and "no problems found" in checked.stdout, checked.stderr
    assert invoke("build", str(recipe), "--data", str(h5)).returncode == 0


def test_naming_the_file_picks_one_of_several_hdf5_files(h5, tmp_path):
    folder = tmp_path / "twoh"
    folder.mkdir()
    shutil.copy(h5, folder / "a.h5")
    shutil.copy(h5, folder / "b.hdf5")
    assert "name the one to use" in flat(invoke("data", "check", str(folder)).stderr)
    checked = invoke("data", "check", str(folder / "b.hdf5"))
    assert checked.returncode == 0 and "no problems found" in checked.stdout, checked.stderr


def test_a_data_path_that_is_neither_folder_nor_hdf5_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    message = assert_clean_failure(invoke("data", "check", str(tmp_path / "notes.txt")))
    assert f"data path {tmp_path / 'notes.txt'} is a file but not an HDF5 file (.h5, .hdf5)" in message
    message = assert_clean_failure(invoke("data", "check", str(tmp_path / "gone.h5")))
    assert f"data folder not found: {tmp_path / 'gone.h5'}" in message


@pytest.mark.parametrize("sizes, expected", [
    ("train=99999999999999999999", "--sizes train=99999999999999999999: the image count must be a whole number"
                                   " from 1 to 1,000,000"),
    ("", "--sizes expects NAME=COUNT pairs like train=5000,test=1000, got an empty value"),
    ("train=0", "--sizes train=0: the image count must be a whole number from 1 to 1,000,000"),
    ("../up=3", "--sizes split name = '../up' must be a plain name"),
    ("train=2,train=3", "--sizes names split 'train' twice"),
    ("train", "got 'train'"),
])
def test_data_synth_sizes_are_checked(tmp_path, sizes, expected):
    assert expected in assert_clean_failure(invoke("data", "synth", str(tmp_path / "syn"), "--sizes", sizes))
    assert not (tmp_path / "syn").exists() and not (tmp_path / "up").exists()


@pytest.mark.parametrize("value", ['""', '"  "'])
def test_an_empty_data_path_is_refused(tmp_path, value):
    recipe = write_recipe(tmp_path / "tiny.toml", "shapes")
    result = invoke("build", str(recipe), "--set", f"data.path={value}")
    assert "names no dataset: give a dataset folder, an HDF5 file, or 'shapes'" in assert_clean_failure(result)
    assert f"data.path = {value.replace(chr(34), chr(39))} names no dataset" in result.stderr
    recipe.write_text(recipe.read_text().replace('path = "shapes"', f"path = {value}"))
    assert "names no dataset" in assert_clean_failure(invoke("build", str(recipe)))


def test_stages_describe_refuses_a_stage_of_another_kind():
    message = assert_clean_failure(invoke("stages", "--kind", "aggregator", "--describe", "core.triplet"))
    assert "--describe core.triplet is a stage of kind 'loss', not 'aggregator' (--kind)" in message
    shown = invoke("stages", "--kind", "loss", "--describe", "core.triplet")
    assert shown.returncode == 0 and "core.triplet" in shown.stdout
