"""The command line: listing commands, build, data synth/check, and their errors.

Most commands run in-process through ``itmkit.cli.run`` (what the console script calls, including
the error-to-exit-1 conversion); ``--help`` and one ``build`` go through the installed console
script itself, in parallel, to check the real entry point.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cliutil import Result, assert_clean_failure, flat, invoke
from itmkit.build import DataPorts, build_model, count_parameters, stage_tree
from itmkit.core_stages import Triplet
from itmkit.datasets import data_ports, open_named_split, resolve_vocab
from itmkit.docs import stage_reference_markdown
from itmkit.plugins import get_registry
from itmkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
VSEPP_PATH = ROOT / "recipes" / "vsepp.toml"
ITMKIT = Path(sys.executable).with_name("itmkit")


def title_names(output: str) -> list[str]:
    """Registered stage names that start a line (the title of each stage's table)."""
    return [n for n in sorted(get_registry().stages) if re.search(rf"^{re.escape(n)}\s", output, re.M)]


# --------------------------------------------------------------------- through the console script


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_data) -> dict[str, Result]:
    data = tiny_data
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "ITMKIT_DEBUG")}
    env.update(NO_COLOR="1", ITMKIT_HOME=str(tmp_path_factory.mktemp("home")))
    commands = {
        "help": ["--help"],
        "build": ["build", str(VSEPP_PATH), "--data", str(data)],
    }
    procs = {
        name: subprocess.Popen([str(ITMKIT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=ROOT)
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = Result(proc.returncode, stdout, stderr)
    return results


def test_help_lists_the_commands(console):
    result = console["help"]
    assert result.returncode == 0, result.stderr
    for command in ("build", "train", "eval", "plugins", "stages", "data"):
        assert re.search(rf"│ {command}\s", result.stdout), command
    assert "--debug" in result.stdout


def test_build_prints_the_stage_tree_and_total(console, tiny_data):
    result = console["build"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = tiny_data
    recipe = load_recipe(VSEPP_PATH)
    train = open_named_split(data, "train")
    ports = data_ports(train, resolve_vocab(recipe.data.vocab, data, train))
    model = build_model(recipe, ports, seed=recipe.train.seed)
    lines = result.stdout.splitlines()
    for row in stage_tree(model):
        line = next((ln for ln in lines if f"│ {row['path']} " in ln), None)
        assert line is not None, f"no row for {row['path']} in\n{result.stdout}"
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        assert cells == [row["path"], row["stage"], row["consumes"], row["produces"], f"{row['params']:,}"]
    assert f"total parameters: {count_parameters(model):,}" in result.stdout
    assert f"{ports.feature_dim}-d regions, {ports.vocab_size} words" in result.stdout


# ---------------------------------------------------------------------------------- in-process


def test_data_help_lists_its_commands():
    result = invoke("data", "--help")
    assert result.returncode == 0
    assert "synth" in result.stdout and "check" in result.stdout


def test_build_without_data_folder_assumes_scan_dims(tmp_path):
    result = invoke("build", str(VSEPP_PATH), "--data", str(tmp_path / "absent"))
    assert result.returncode == 0, result.stderr
    model = build_model(load_recipe(VSEPP_PATH), DataPorts(2048, 8481, 36))
    out = flat(result.stdout)
    assert "not found: assuming 36 x 2048-d regions and 8481 words" in out
    assert f"total parameters: {count_parameters(model):,}" in out
    assert "x: Regions[2048]" in out and "x: Tokens[8481]" in out


def test_build_without_data_applies_the_encoders_vocabulary_hook(tmp_path):
    # gpo.bigru appends <mask> to the data's words, as the official GPO code does: 8481 + 1.
    recipe = VSEPP_PATH.parent / "gpo_f30k_bigru.toml"
    result = invoke("build", str(recipe), "--data", str(tmp_path / "absent"))
    assert result.returncode == 0, result.stderr
    assert "assuming 36 x 2048-d regions and 8482 words" in flat(result.stdout)
    assert "x: Tokens[8482]" in flat(result.stdout)


def test_stages_lists_every_registered_stage():
    result = invoke("stages")
    assert result.returncode == 0, result.stderr
    assert title_names(result.stdout) == sorted(get_registry().stages)
    assert len(get_registry().stages) >= 8


def test_stages_kind_lists_only_that_kind():
    result = invoke("stages", "--kind", "loss")
    assert result.returncode == 0, result.stderr
    losses = sorted(n for n, c in get_registry().stages.items() if c.kind == "loss")
    assert {"core.triplet", "core.infonce"} <= set(losses)
    assert title_names(result.stdout) == losses
    for name, cls in get_registry().stages.items():
        if cls.kind != "loss":
            assert name not in result.stdout


def test_stages_unknown_kind_suggests_one():
    result = invoke("stages", "--kind", "lose")
    message = assert_clean_failure(result)
    assert result.stderr.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    assert "--kind 'lose' is not a stage kind (did you mean 'loss'?)" in message


def test_stages_describe_shows_params_and_paper():
    result = invoke("stages", "--describe", "core.triplet")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert title_names(result.stdout) == ["core.triplet"]
    for name in ("margin", "max_violation", "warmup_epochs", "mask_same_image"):
        assert re.search(rf"│ {name}\s+│", result.stdout), name
    assert "hinge margin alpha (>= 0.0)" in out
    assert f"paper: {Triplet.paper}" in out
    assert "consumes: x: ScorePort" in out and "produces: LossPort" in out


def test_stages_describe_shows_the_kind():
    result = invoke("stages", "--describe", "core.triplet")
    assert "[loss]" in result.stdout


def test_stages_describe_unknown_stage_suggests_one():
    result = invoke("stages", "--describe", "core.tripplet")
    message = assert_clean_failure(result)
    assert result.stderr.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    assert "unknown stage 'core.tripplet' (did you mean 'core.triplet'?)" in message


def test_stages_markdown_is_the_stage_reference():
    result = invoke("stages", "--markdown")
    assert result.returncode == 0
    assert result.stdout == stage_reference_markdown(get_registry())


def test_plugins_lists_the_builtin_plugin_and_its_stages():
    result = invoke("plugins")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    line = next(ln for ln in result.stdout.splitlines() if "itmkit.core_stages" in ln)
    assert "built-in" in line
    builtin = [n for n, owner in get_registry().owners.items() if owner == "itmkit.core_stages"]
    assert len(builtin) >= 8
    for name in builtin:
        assert name in out


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Result, Path]:
    folder = tmp_path_factory.mktemp("synth") / "shapes"
    return invoke("data", "synth", str(folder), "--sizes", "train=20,dev=5,test=5"), folder


def test_data_synth_writes_the_dataset(synth):
    result, folder = synth
    assert result.returncode == 0, result.stderr
    assert "wrote train (20 images), dev (5 images), test (5 images)" in flat(result.stdout)
    for split, n in (("train", 20), ("dev", 5), ("test", 5)):
        feats = np.load(folder / f"{split}_ims.npy", mmap_mode="r")
        assert feats.shape[0] == n and feats.ndim == 3
        assert len((folder / f"{split}_caps.txt").read_text().splitlines()) == 5 * n
    assert (folder / "vocab.json").is_file() and (folder / "shapes.json").is_file()


def test_data_check_passes_a_good_dataset(synth):
    result = invoke("data", "check", str(synth[1]))
    assert result.returncode == 0, result.stderr
    assert "no problems found" in result.stdout
    assert re.search(r"│ train\s+│ precomp\s+│ 20\s+│ 100\s+│", result.stdout), result.stdout


def test_data_check_finds_a_planted_nan(synth, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(synth[1], folder)
    feats = np.load(folder / "dev_ims.npy", mmap_mode="r+")
    feats[3, 0, 0] = np.nan
    feats.flush()
    del feats
    result = invoke("data", "check", str(folder))
    assert_clean_failure(result)
    assert result.stderr.splitlines()[-1].startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    problems = flat(result.stderr)
    assert problems.startswith("problem: ")
    assert "error:" in problems and problems.endswith("1 problem found")
    assert "dev_ims.npy" in problems and "NaN" in problems and "the first is image 3" in problems
    assert "train_ims.npy" not in problems


def test_data_check_missing_folder(tmp_path):
    result = invoke("data", "check", str(tmp_path / "nowhere"))
    message = assert_clean_failure(result)
    assert result.stderr.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    assert "data folder not found" in message


@pytest.mark.parametrize("sizes", ["bogus", "train=many", "train=5,dev"])
def test_data_synth_rejects_bad_sizes(tmp_path, sizes):
    result = invoke("data", "synth", str(tmp_path / "out"), "--sizes", sizes)
    message = assert_clean_failure(result)
    assert result.stderr.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    assert "--sizes expects NAME=COUNT pairs" in message
    assert not (tmp_path / "out").exists()


def test_data_convert_and_vocab_commands(tmp_path):
    from typer.testing import CliRunner

    from itmkit.cli import app
    from itmkit.data.shapes import write_shapes
    from itmkit.data.split import open_split
    from itmkit.data.vocab import Vocabulary

    src = tmp_path / "src"
    write_shapes(src, sizes={"train": 12, "dev": 4})
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert", str(src), str(tmp_path / "h5" / "data.h5")])
    assert result.exit_code == 0, result.output
    a, b = open_split(src, "dev"), open_split(tmp_path / "h5", "dev")
    assert a.captions == b.captions and np.array_equal(np.asarray(a.features), b.features[:])
    result = runner.invoke(app, ["data", "vocab", str(src), "-o", str(tmp_path / "v.json"), "--threshold", "1"])
    assert result.exit_code == 0, result.output
    built = Vocabulary.load(tmp_path / "v.json")
    assert built == Vocabulary.build(open_split(src, "train").captions + open_split(src, "dev").captions, threshold=1)
    assert f"wrote {len(built)} words" in result.output
