"""Hand-broken recipes through the real CLI: exit code 1, one clear message on stderr, no traceback.

Each broken recipe runs on its own in-process through ``itmkit.cli.run`` (exactly what the console
script calls). The same ten kinds of mistake also run end-to-end through the installed console
script (`itmkit build FILE`): the seven that recipe structuring finds share one file (which also
shows that every problem is reported at once), the port, dimension and TOML ones get a file each.
Four processes in parallel instead of ten keeps the slow part (importing torch) to a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cliutil import Result, assert_clean_failure, invoke
from itmkit import cli
from itmkit.errors import ItmkitError

# recipes/vsepp.toml as of this writing, kept here so that tuning that file cannot change these tests.
VSEPP = """\
[recipe]
name = "vsepp"
description = "VSE++ baseline: mean-pooled regions, GRU caption, cosine, hardest-negative hinge"
embed_dim = 1024

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 300, bidirectional = false }
pool = { stage = "core.last" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"
margin = 0.2
max_violation = true

[data]
path = "shapes"
protocol = "f30k-1k"

[train]
epochs = 6
batch_size = 128
lr = 2e-4
lr_update = 4
grad_clip = 2.0
seed = 0
"""
ITMKIT = Path(sys.executable).with_name("itmkit")




def broken(old: str, new: str, text: str = VSEPP) -> str:
    """``text`` with ``old`` replaced once; fails loudly if the base recipe no longer has ``old``."""
    assert text.count(old) == 1, f"the base recipe should contain {old!r} exactly once"
    return text.replace(old, new)


TOML_ERROR_LINE = VSEPP.splitlines().index("margin = 0.2") + 1

# name -> (recipe text, extra CLI args, fragments that must appear in the message)
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "unknown_stage": (
        broken('encoder = { stage = "core.precomp" }', 'encoder = { stage = "core.precmp" }'),
        [],
        ["unknown stage 'core.precmp'", "did you mean 'core.precomp'", "@ image.encoder.stage"],
    ),
    "misspelled_param": (
        broken("margin = 0.2", "margn = 0.2"),
        [],
        ["unknown parameter 'margn'", "core.triplet", "did you mean 'margin'", "@ loss.margn"],
    ),
    "wrong_type": (
        broken("margin = 0.2", 'margin = "big"'),
        [],
        ["expected float, got str 'big'", "@ loss.margin"],
    ),
    "out_of_range": (
        broken("epochs = 6", "epochs = 0", broken("margin = 0.2", "margin = -1")),
        [],
        ["2 problems", "expected a value >= 0.0, got -1.0 @ loss.margin",
         "expected a value >= 1, got 0 @ train.epochs"],
    ),
    "port_mismatch_no_pools": (
        broken('pool = { stage = "core.last" }\n', "", broken('pool = { stage = "core.mean" }\n', "")),
        [],
        ["port mismatch", "core.cosine", "Aligned", "add a `pool` to [image] and [text]", "@ match[0].similarity"],
    ),
    "port_mismatch_score_into_aggregator": (
        broken('similarity = { stage = "core.cosine" }',
               'similarity = { stage = "core.cosine" }\naggregate = { stage = "core.mean" }'),
        [],
        ["port mismatch", "core.mean", "expects LocalPort or PairSimsPort",
         "Score[1] from match[0].similarity (core.cosine)", "@ match[0].aggregate"],
    ),
    "dim_mismatch": (
        broken('encoder = { stage = "core.precomp" }', 'encoder = { stage = "core.precomp", embed_dim = 512 }'),
        [],
        ["image global dim 512 differs from text global dim 1024",
         "image=Global[512] from [image] pool", "text=Global[1024] from [text] pool", "@ match[0].similarity"],
    ),
    "missing_slot": (
        broken('encoder = { stage = "core.bigru", word_dim = 300, bidirectional = false }\n', ""),
        [],
        ["missing required slot 'encoder' in [text]", "@ text.encoder"],
    ),
    "unknown_section": (
        broken("[train]", "[trian]"),
        [],
        ["unknown section [trian]", "did you mean 'train'", "@ trian"],
    ),
    "bad_toml": (
        broken("margin = 0.2", "margin = 0.2 0.3"),
        [],
        ["invalid TOML", f"line {TOML_ERROR_LINE}"],
    ),
    "set_unknown_key": (
        VSEPP,
        ["--set", "train.epohcs=2"],
        ["unknown parameter 'epohcs'", "did you mean 'epochs'", "(from --set train.epohcs=2)", "@ train.epohcs"],
    ),
}

# The structuring mistakes above (and one more) in one file: every one is reported in one run.
# [train] is renamed, so the range error goes to [recipe] and the --set recreates a [train] table.
COMBINED = broken("[train]", "[trian]", broken("embed_dim = 1024", "embed_dim = 0", broken(
    'encoder = { stage = "core.bigru", word_dim = 300, bidirectional = false }\n', "", broken(
        'protocol = "f30k-1k"', 'protocol = "f30k"', broken(
            "margin = 0.2", 'margn = 0.2\nmargin = "big"', broken(
                'encoder = { stage = "core.precomp" }', 'encoder = { stage = "core.precmp" }'))))))
COMBINED_ARGS = ["--set", "train.epohcs=2"]
COMBINED_PROBLEMS = [
    "unknown stage 'core.precmp' (did you mean 'core.precomp'?) @ image.encoder.stage",  # unknown_stage
    "unknown parameter 'margn' of stage core.triplet",  # misspelled_param
    "(did you mean 'margin'?) @ loss.margn",
    "expected float, got str 'big' @ loss.margin",  # wrong_type
    "out of range: expected a value >= 1, got 0 @ recipe.embed_dim",  # out_of_range
    "missing required slot 'encoder' in [text] @ text.encoder",  # missing_slot
    "unknown section [trian] (did you mean 'train'?) @ trian",  # unknown_section
    "unknown parameter 'epohcs' of [train] (did you mean 'epochs'?) (from --set train.epohcs=2) @ train.epohcs",
    "(did you mean 'f30k-1k'?) @ data.protocol",
]
COMBINED_COUNT = 8  # the margn line above is one problem in two fragments

# What runs through the console script: name -> (recipe text, extra args, fragments).
END_TO_END = {
    "combined": (COMBINED, COMBINED_ARGS, [f"{COMBINED_COUNT} problems in the recipe", *COMBINED_PROBLEMS]),
    **{name: CASES[name] for name in ("port_mismatch_no_pools", "dim_mismatch", "bad_toml")},
}


def assert_only_the_error(result: Result) -> str:
    """A clean failure that prints nothing else: stdout empty, stderr the one 'error:' message alone."""
    message = assert_clean_failure(result)
    assert result.stdout.strip() == ""
    assert result.stderr.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    return message


# ------------------------------------------------------------------------ through the console script


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_data) -> dict[str, Result]:
    """Run the END_TO_END recipes through the installed console script, all processes at once."""
    data = tiny_data
    folder = tmp_path_factory.mktemp("broken")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "ITMKIT_DEBUG")}
    env.update(NO_COLOR="1", ITMKIT_HOME=str(folder / "home"))
    procs = {}
    for name, (text, args, _) in END_TO_END.items():
        path = folder / f"{name}.toml"
        path.write_text(text)
        procs[name] = subprocess.Popen(
            [str(ITMKIT), "build", str(path), "--data", str(data), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=folder,
        )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = Result(proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", sorted(END_TO_END))
def test_console_script_reports_broken_recipe(console, case):
    message = assert_only_the_error(console[case])
    assert f"{case}.toml" in message
    for fragment in END_TO_END[case][2]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_several_problems_are_all_reported_at_once(console):
    message = assert_only_the_error(console["combined"])
    assert message.count(" - ") == COMBINED_COUNT, message


def test_the_ten_cases_are_covered_end_to_end():
    """Guard for the split above: every kind of mistake goes through the console script once."""
    alone = {"port_mismatch_no_pools", "dim_mismatch", "bad_toml"}
    in_combined = {"unknown_stage", "misspelled_param", "wrong_type", "out_of_range", "missing_slot",
                   "unknown_section", "set_unknown_key"}
    assert alone <= set(END_TO_END) and len(alone | in_combined) == 10
    assert in_combined | alone | {"port_mismatch_score_into_aggregator"} == set(CASES)


def test_port_mismatch_without_pools_names_what_is_available(console):
    message = assert_only_the_error(console["port_mismatch_no_pools"])
    assert "(inputs: )" not in message
    assert "Local[1024] from [image] fragments" in message and "Local[1024] from [text] fragments" in message


def test_each_problem_is_one_line_on_stderr(console):
    lines = console["port_mismatch_no_pools"].stderr.splitlines()
    line = next(ln for ln in lines if "port mismatch" in ln)
    assert line.rstrip().endswith("@ match[0].similarity"), lines


# ------------------------------------------------------------------- in-process through cli.run


@pytest.fixture(scope="module")
def data_dir(tiny_data) -> Path:
    return tiny_data


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_recipe_is_one_clear_error(tmp_path, data_dir, case):
    text, args, fragments = CASES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    message = assert_only_the_error(invoke("build", str(path), "--data", str(data_dir), *args))
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if case != "bad_toml":  # a TOML error stops before any recipe problem is collected
        count = 2 if case == "out_of_range" else 1
        assert f"{count} problem{'s' if count > 1 else ''} in the recipe" in message


def test_the_unedited_base_recipe_builds(tmp_path, data_dir):
    """So each failure above is the edit's doing."""
    path = tmp_path / "vsepp.toml"
    path.write_text(VSEPP)
    result = invoke("build", str(path), "--data", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert "total parameters" in result.stdout


def test_recipe_file_not_found(tmp_path):
    missing = tmp_path / "nothere.toml"
    message = assert_only_the_error(invoke("build", str(missing), "--data", str(tmp_path)))
    assert f"recipe not found: {missing}" in message


def test_recipe_path_is_a_folder(tmp_path):
    message = assert_only_the_error(invoke("build", str(tmp_path)))
    assert f"recipe {tmp_path} is a folder; expected a regular file" in message


@pytest.fixture
def vsepp_path(tmp_path) -> Path:
    path = tmp_path / "vsepp.toml"
    path.write_text(VSEPP)
    return path


def test_set_without_equals(vsepp_path, data_dir):
    result = invoke("build", str(vsepp_path), "--data", str(data_dir), "--set", "train.epochs")
    message = assert_only_the_error(result)
    assert "--set expects KEY=VALUE, got 'train.epochs'" in message


def test_set_on_a_branch_that_does_not_exist(vsepp_path, data_dir):
    result = invoke("build", str(vsepp_path), "--data", str(data_dir), "--set", "match[3].weight=2")
    message = assert_only_the_error(result)
    assert "--set match[3].weight=2" in message
    assert "only 1 entry" in message and "@ match[3]" in message


def test_set_on_an_unknown_section(vsepp_path, data_dir):
    result = invoke("build", str(vsepp_path), "--data", str(data_dir), "--set", "trian.epochs=2")
    message = assert_only_the_error(result)
    assert "no section 'trian'" in message and "did you mean 'train'" in message


def test_set_problems_and_file_problems_are_reported_together(tmp_path, data_dir):
    path = tmp_path / "r.toml"
    path.write_text(CASES["wrong_type"][0])
    result = invoke("build", str(path), "--data", str(data_dir), "--set", "train.lr=-1", "--set", "data.protocol=coco")
    message = assert_only_the_error(result)
    assert "3 problems" in message
    assert "@ loss.margin" in message
    assert "(from --set train.lr=-1) @ train.lr" in message
    assert "(from --set data.protocol=coco) @ data.protocol" in message


def test_debug_flag_shows_the_exception(monkeypatch, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(CASES["unknown_section"][0])
    monkeypatch.setattr(sys, "argv", ["itmkit", "--debug", "build", str(path)])
    monkeypatch.setitem(cli._state, "debug", False)  # restored after the test
    with pytest.raises(ItmkitError, match=r"unknown section \[trian\]"):
        cli.run()
