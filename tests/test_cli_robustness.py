"""Bad input through the real CLI ends in one clear line, never a traceback; and the small CLI fixes.

Every case runs in-process through ``itmkit.cli.run``, what the console script calls. Recipe input
that used to pass silently (NaN, infinity, a seed past what torch takes) or end in a traceback (a list
as a stage name, Latin-1 bytes, deep nesting, a negative --set index, an int of 23 digits) is a
located recipe problem with exit 1; an exception nobody expected is one `internal error` line with
exit 70, the traceback only under --debug or ITMKIT_DEBUG=1.
"""

from __future__ import annotations

import json
import re
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cliutil import Result, assert_clean_failure, flat, invoke
from itmkit import cli
from itmkit.data.vocab import Vocabulary
from itmkit.errors import ItmkitError
from itmkit.structure import MAX_INT

ROOT = Path(__file__).resolve().parents[1]
VSEPP = ROOT / "recipes" / "vsepp.toml"
SCAN = ROOT / "recipes" / "scan_shapes_t2i.toml"


def assert_error_first(result: Result, code: int = 1) -> str:
    """A clean failure whose stderr starts with its `error:` line (nothing printed before it)."""
    message = assert_clean_failure(result, code)
    assert result.stderr.startswith("error:"), result.stderr
    return message


def build(recipe: Path, *sets: str) -> Result:
    args = [arg for s in sets for arg in ("--set", s)]
    return invoke("build", str(recipe), "--data", "/nonexistent-itmkit-data", *args)


def write(tmp_path: Path, edit, base: Path = VSEPP, name: str = "r.toml") -> Path:
    path = tmp_path / name
    text = base.read_text()
    path.write_bytes(edit(text) if callable(edit) else edit)
    return path


# ----------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(("recipe", "setting", "where"), [
    (VSEPP, "match[0].weight=nan", "match[0].weight"),
    (VSEPP, "match[0].weight=-inf", "match[0].weight"),
    (VSEPP, "train.lr=inf", "train.lr"),
    (VSEPP, "loss.margin=nan", "loss.margin"),
    (SCAN, "match[0].cross.lambda_softmax=inf", "match[0].cross.lambda_softmax"),
])
def test_set_of_a_non_finite_number_is_refused(recipe, setting, where):
    message = assert_error_first(build(recipe, setting))
    value = setting.partition("=")[2]
    assert f"expected a finite number, got {value} (from --set {setting}) @ {where}" in message


def test_nan_written_in_the_recipe_file_is_refused(tmp_path):
    path = write(tmp_path, lambda t: re.sub(r"(?m)^lr = .*$", "lr = nan", t).encode())
    message = assert_error_first(build(path))
    assert f"{path}: 1 problem in the recipe: - expected a finite number, got nan @ train.lr" in message


def test_an_integer_beyond_any_float_is_not_finite():
    message = assert_error_first(build(VSEPP, "train.lr=1" + "0" * 400))
    assert "expected a finite number, got an integer of about 400 digits" in message and "@ train.lr" in message


# --------------------------------------------------------------------- integers too large


@pytest.mark.parametrize(("setting", "expected"), [
    ("train.seed=99999999999999999999999", "expected a value <= 4294967295, got 99999999999999999999999"),
    ("train.seed=4294967296", "expected a value <= 4294967295, got 4294967296"),
    ("recipe.embed_dim=1000000000000", f"expected a value <= {MAX_INT} (the bound of int parameters)"),
    ("text.encoder.word_dim=100000000", f"expected a value <= {MAX_INT} (the bound of int parameters)"),
    ("train.batch_size=" + "9" * 60, "got an integer of about 60 digits"),
])
def test_integers_too_large_for_their_field(setting, expected):
    message = assert_error_first(build(VSEPP, setting))
    assert expected in message, message
    assert f"@ {setting.partition('=')[0]}" in message


def test_the_largest_seed_torch_and_numpy_take_builds():
    result = build(VSEPP, "train.seed=4294967295", "recipe.embed_dim=64")
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------- stage names, encodings


@pytest.mark.parametrize(("old", "new", "where", "got"), [
    ('encoder = { stage = "core.precomp" }', 'encoder = { stage = ["core.precomp"] }', "image.encoder.stage",
     "got list ['core.precomp']"),
    ('stage = "core.triplet"', "stage = {a = 1}", "loss.stage", "got a table"),
    ('similarity = { stage = "core.cosine" }', "similarity = { stage = 3 }", "match[0].similarity.stage", "got int 3"),
])
def test_a_stage_that_is_not_a_name(tmp_path, old, new, where, got):
    path = write(tmp_path, lambda t: t.replace(old, new).encode())
    message = assert_error_first(build(path))
    assert str(path) in message
    assert f"stage (a string), {got} @ {where}" in message


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = write(tmp_path, lambda t: t.replace('description = "VSE++', 'description = "caf\xe9 VSE++').encode("latin-1"))
    message = assert_error_first(build(path))
    assert f"{path}: line 14: byte b'\\xe9' is not UTF-8; a recipe must be UTF-8 text" in message


def test_a_recipe_with_a_byte_order_mark_reads_fine(tmp_path):
    path = write(tmp_path, lambda t: b"\xef\xbb\xbf" + t.encode())
    result = build(path, "recipe.embed_dim=64")
    assert result.returncode == 0, result.stderr


def test_a_set_value_with_a_byte_order_mark_reads_fine():
    result = build(VSEPP, "\ufeffrecipe.embed_dim=64")
    assert result.returncode == 0, result.stderr
    assert "Global[64]" in result.stdout


# -------------------------------------------------------------------------------- nesting


def test_absurdly_deep_nesting_in_the_file(tmp_path):
    path = write(tmp_path, ("a = " + "[" * 100_000 + "]" * 100_000 + "\n").encode())
    message = assert_error_first(build(path))
    assert f"{path}: invalid TOML: tables and lists nested more than 16 deep" in message


def test_deep_nesting_that_toml_reads_is_refused_before_it_is_walked(tmp_path):
    path = write(tmp_path, lambda t: t.replace("[train]", "[train]\nwarm = " + "[" * 200 + "]" * 200).encode())
    message = assert_error_first(build(path))
    assert f"{path}: tables and lists nested more than 16 deep @ train.warm[0][0]" in message


@pytest.mark.parametrize(("setting", "expected"), [
    ("train." + ".".join(["a"] * 100_000) + "=1", "a key of 100001 parts (a recipe key has at most 16)"),
    ("train.lr=" + "[" * 100_000 + "]" * 100_000, "tables and lists nested more than 16 deep"),
    ("train.lr=" + "[" * 40 + "]" * 40, "the value nests tables and lists more than 16 deep"),
])
def test_absurdly_deep_set(setting, expected):
    message = assert_error_first(build(VSEPP, setting))
    assert expected in message and len(message) < 400, message[:1000]


# -------------------------------------------------------------------------- --set indexes


@pytest.mark.parametrize(("setting", "expected"), [
    ("match[-2].weight=1", "list index [-2] must be a whole number counting from 0"),
    ("match[-1].weight=1", "list index [-1] must be a whole number counting from 0"),
    ("match[5].weight=1", "there is only 1 entry here @ match[5]"),
    ("match[99999999999999999999999].weight=1", "there is only 1 entry here @ match[99999999999999999999999]"),
    ("image.reasoners[-1].stage=x", "list index [-1] must be a whole number counting from 0"),
    ("image.reasoners[0].stage=x", "the recipe has no list 'reasoners' here to index @ image.reasoners"),
    ("match[x].weight=1", "list index [x] must be a whole number counting from 0"),
    ("match[].weight=1", "list index [] must be a whole number counting from 0"),
    ("match[0.weight=1", "malformed key segment 'match[0'"),
    ("match]0[.weight=1", "malformed key segment 'match]0['"),
    ("match[²].weight=1", "list index [²] must be a whole number"),
    ("train..lr=1", "malformed key segment ''"),
    ("train[0].lr=1", "train is a table, not a list @ train[0]"),
])
def test_bad_set_indexes(setting, expected):
    message = assert_error_first(build(VSEPP, setting))
    assert f"--set {setting}" in message and expected in message, message


def test_good_set_indexes_still_work():
    result = build(VSEPP, "match[0].weight=2", "match.0.weight=3", "recipe.embed_dim=64")
    assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------- the command wrapper


def _explode(*args, **kwargs):
    raise ZeroDivisionError("an unexpected\nfailure")


def test_an_unexpected_exception_is_one_line_and_exit_70(monkeypatch):
    monkeypatch.setattr("itmkit.build.build_model", _explode)
    message = assert_error_first(build(VSEPP), code=cli.EXIT_BUG)
    assert message == ("error: internal error: ZeroDivisionError: an unexpected failure — this is a bug in itmkit;"
                       " rerun with --debug (or ITMKIT_DEBUG=1) for the traceback and report it")


@pytest.mark.parametrize("how", ["--debug", "ITMKIT_DEBUG"])
def test_debug_shows_the_traceback_of_an_unexpected_exception(monkeypatch, how):
    monkeypatch.setattr("itmkit.build.build_model", _explode)
    argv = ["itmkit", *(["--debug"] if how == "--debug" else []), "build", str(VSEPP), "--data", "/nonexistent"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(cli._state, "debug", False)
    if how == "ITMKIT_DEBUG":
        monkeypatch.setenv("ITMKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.run()


def test_running_out_of_memory_is_not_called_a_bug(monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory:"
                           " you tried to allocate 8192000000000000 bytes.")

    monkeypatch.setattr("itmkit.build.build_model", no_memory)
    message = assert_error_first(build(VSEPP))
    assert message.startswith("error: out of memory: [enforce fail") and "internal error" not in message


def test_usage_errors_stay_typers_exit_2():
    result = invoke("build")
    assert result.returncode == 2
    assert "Missing argument" in result.stderr and "Traceback" not in result.stderr


def test_itmkit_errors_still_exit_1(tmp_path):
    message = assert_error_first(invoke("build", str(tmp_path / "absent.toml")))
    assert "recipe not found" in message


def test_the_wrapper_passes_itmkit_errors_through_under_debug(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["itmkit", "--debug", "build", str(tmp_path / "absent.toml")])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(ItmkitError, match="recipe not found"):
        cli.run()


# ------------------------------------------------------------------------------ help text


@pytest.mark.parametrize("command", ["build", "train", "eval"])
def test_help_keeps_data_path_in_brackets(command):
    result = invoke(command, "--help")
    assert result.returncode == 0
    assert "[data].path" in result.stdout


def test_resume_is_a_flag_in_help_and_use():
    result = invoke("train", "--help")
    line = next(ln for ln in result.stdout.splitlines() if "--resume" in ln)
    assert "<bool>" not in line and "continue from OUT/last.safetensors" in line
    # A flag takes no value: `--resume true` is an extra argument, refused by typer as usage.
    result = invoke("train", str(VSEPP), "--resume", "true")
    assert result.returncode == 2 and "unexpected extra argument" in result.stderr


def test_no_flag_shows_a_value_in_help():
    for args, flag in ((["--help"], "--debug"), (["eval", "--help"], "--json"), (["stages", "--help"], "--markdown"),
                       (["data", "synth", "--help"], "--images")):
        result = invoke(*args)
        line = next(ln for ln in result.stdout.splitlines() if re.search(rf"{flag}\b", ln))
        assert "<bool>" not in line, line


# ------------------------------------------------------------------ build without generating


def test_build_on_the_builtin_data_generates_nothing(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ITMKIT_HOME", str(home))
    start = time.perf_counter()
    result = invoke("build", str(VSEPP))
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert list(home.iterdir()) == []
    assert seconds < 30  # generating would take minutes; the captions alone take seconds
    out = flat(result.stdout)
    assert "built-in 'shapes', not generated yet (36 x 256-d regions," in out
    assert "x: Regions[256]" in out


def test_the_builtin_words_are_those_generation_writes(tiny_data):
    from itmkit.datasets import builtin_words

    sizes = json.loads((tiny_data / "shapes.json").read_text())["sizes"]  # written by write_shapes
    assert builtin_words(sizes) == Vocabulary.load(tiny_data / "vocab.json")


# ------------------------------------------------------------------------------ packaging


def test_the_license_field_is_an_spdx_string():
    """A TOML-table license makes setuptools >= 77 print a deprecation warning on every install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]
