"""Official options are read strictly, once, for every importer; training-only options never refuse an import.

The options decide the model's layers and its scores, so a value that is not what the official
argparse would have stored (``embed_size='abc'``, ``16.7``, ``bi_gru='False'``) is one clear
CheckpointError naming the file, the option, the value and what was expected. Training options
(margin, learning rate, batch size, ...) only shape the converted recipe: a value the recipe
cannot take falls back to the paper's default with a note.
"""

from __future__ import annotations

import importlib
import math
import tomllib

import pytest
import torch

from cliutil import assert_clean_failure, invoke
from itmkit.checkpoint import read_metadata
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint, option, read_official, training_options


def _plugin(name: str):
    return importlib.import_module(f"itmkit_{name}.tests.test_importer")


def _vsepp():
    return importlib.import_module("test_import_vsepp")


# importer -> (its tests' options(**overrides), weights of those options, the vocabulary's words)
SOURCES = {
    "vsepp": (lambda **o: _vsepp().options(**o), lambda opt: _vsepp().official_weights(opt), lambda: _vsepp().WORDS),
    "scan": (lambda **o: _plugin("scan").options(**o), lambda opt: _plugin("scan").official_weights(opt),
             lambda: [*Vocabulary.SPECIALS, *_plugin("scan").WORDS]),
    "bfan": (lambda **o: _plugin("bfan").options(**o),
             lambda opt: [m.state_dict() for m in _plugin("bfan").official_model(opt)],
             lambda: _plugin("bfan").VOCAB_WORDS),
    "pfan": (lambda **o: _plugin("pfan").options(**o), lambda opt: _plugin("pfan").official_state(opt),
             lambda: [*Vocabulary.SPECIALS, *_plugin("pfan").WORDS]),
    "sgraf": (lambda **o: _plugin("sgraf").options(**o), lambda opt: _plugin("sgraf").official_weights(opt),
              lambda: [*Vocabulary.SPECIALS, *_plugin("sgraf").WORDS]),
    "gpo": (lambda **o: _plugin("gpo").options(**o), lambda opt: _plugin("gpo").official_weights(opt),
            lambda: [*Vocabulary.SPECIALS, *_plugin("gpo").WORDS]),
}


def _save(tmp_path, name: str, weights_from=None, **overrides):
    """The importer's official checkpoint with option overrides (weights from the unchanged options)."""
    make_options, make_weights, words = SOURCES[name]
    opt = make_options(**overrides)
    source = tmp_path / f"{name}.pth.tar"
    torch.save({"epoch": 3, "model": make_weights(make_options(**(weights_from or {}))), "best_rsum": 400.0,
                "opt": opt, "Eiters": 10}, source)
    vocab = tmp_path / "vocab.json"
    Vocabulary(words()).save(vocab)
    return source, vocab


def _import(tmp_path, name: str, **overrides):
    source, vocab = _save(tmp_path, name, **overrides)
    notes: list[str] = []
    out = import_checkpoint(name, source, vocab, tmp_path / "out.safetensors", get_importers(), note=notes.append)
    return out, notes


def _recipe(path) -> dict:
    return tomllib.loads(read_metadata(path)["recipe"])


# ------------------------------------------------------------------------------------------- option()


@pytest.mark.parametrize("value, kind, expected", [
    (16, int, 16), (16.0, int, 16), (0.5, float, 0.5), (2, float, 2.0), (True, bool, True), (0, bool, False),
    (1, bool, True), ("t2i", str, "t2i"),
])
def test_option_accepts_what_argparse_stores(value, kind, expected):
    got = option({"x": value}, "x", "ckpt", kind)
    assert got == expected and type(got) is kind


@pytest.mark.parametrize("value, kind, expected", [
    ("abc", int, "an integer; found a str"),
    (None, int, "an integer; found None"),
    (math.inf, int, "an integer; found a non-finite float"),
    (16.7, int, "an integer; found a float with a fraction"),
    (True, int, "an integer; found a bool"),
    ("abc", float, "a finite number; found a str"),
    (math.nan, float, "a finite number; found a non-finite float"),
    (10**400, float, "x=an integer of about 400 digits is not a finite number; found a int"),
    ("no", bool, "a flag: True or False"),
    ("False", bool, "a flag: True or False"),
    (2, bool, "a flag: True or False"),
    (3, str, "text; found a int"),
])
def test_option_refuses_what_a_coercion_would_guess(value, kind, expected):
    with pytest.raises(CheckpointError) as caught:
        option({"x": value}, "x", "ckpt.pth.tar (options)", kind)
    message = str(caught.value)
    assert message.startswith("ckpt.pth.tar (options): option x=") and expected in message and "\n" not in message


def test_an_absent_option_with_a_default_is_the_default():
    assert option({}, "measure", "ckpt", str, "cosine") == "cosine"
    assert option({}, "vocab_size", "ckpt", int, None) is None


# ---------------------------------------------------------------------------------- every importer


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("value", ["abc", None, math.inf, 16.7])
def test_every_importer_refuses_a_malformed_size_option(tmp_path, name, value):
    with pytest.raises(CheckpointError, match=rf"{name}\.pth\.tar .*option embed_size=.* is not an integer"):
        _import(tmp_path, name, embed_size=value)


@pytest.mark.parametrize("name", ["scan", "pfan", "sgraf"])
def test_a_string_flag_is_not_true(tmp_path, name):
    with pytest.raises(CheckpointError, match=r"option bi_gru='False' is not a flag"):
        _import(tmp_path, name, bi_gru="False")


@pytest.mark.parametrize("name", SOURCES)
def test_training_options_the_recipe_cannot_take_fall_back_with_a_note(tmp_path, name):
    out, notes = _import(tmp_path, name, batch_size=1, learning_rate=-1, margin="abc", num_epochs=10**9)
    recipe = _recipe(out)
    assert (recipe["train"]["batch_size"], recipe["train"]["lr"], recipe["loss"]["margin"]) == (128, 2e-4, 0.2)
    assert recipe["train"]["epochs"] > 0 and recipe["train"]["epochs"] < 10**9
    assert len(notes) == 4 and all(n.startswith(f"{tmp_path / name}.pth.tar") for n in notes)
    assert any("batch_size=1 is not a valid train.batch_size (out of range: expected a value >= 2, got 1);"
               " the recipe has the default 128 instead" in n for n in notes)
    assert any("margin='abc' is not a valid loss.margin" in n for n in notes)
    assert read_metadata(out)["import_notes"].splitlines() == notes


def test_valid_training_options_are_carried_over(tmp_path):
    out, notes = _import(tmp_path, "vsepp", margin=0.05, learning_rate=1e-3, batch_size=64, max_violation=False)
    recipe = _recipe(out)
    assert notes == []
    assert (recipe["loss"]["margin"], recipe["loss"]["max_violation"]) == (0.05, False)
    assert (recipe["train"]["lr"], recipe["train"]["batch_size"]) == (1e-3, 64)


def test_a_string_max_violation_is_not_true(tmp_path):
    out, notes = _import(tmp_path, "vsepp", max_violation="no")
    assert _recipe(out)["loss"]["max_violation"] is False  # train.py's default, not bool("no")
    assert notes and "max_violation='no' is not a valid loss.max_violation" in notes[0]


def test_training_options_take_ints_for_floats_and_integral_floats_for_ints():
    training = training_options({"learning_rate": 1, "num_epochs": 20.0}, {"learning_rate": 2e-4, "num_epochs": 30},
                                "ckpt")
    assert training.train == {"lr": 1.0, "epochs": 20} and training.notes == ()


def test_the_cli_prints_the_notes_and_refuses_a_bad_size_in_one_line(tmp_path):
    source, vocab = _save(tmp_path, "vsepp", batch_size=1)
    result = invoke("import", "vsepp", str(source), "--vocab", str(vocab), "-o", str(tmp_path / "a.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "note:" in result.stderr and "batch_size=1" in result.stderr
    source, vocab = _save(tmp_path, "vsepp", embed_size="abc")
    result = invoke("import", "vsepp", str(source), "--vocab", str(vocab), "-o", str(tmp_path / "b.safetensors"))
    assert "option embed_size='abc' is not an integer" in assert_clean_failure(result)


# ------------------------------------------------------------------------------- not a checkpoint


@pytest.mark.parametrize("content, expected", [
    (b"", r"the file is empty \(0 bytes\), not a PyTorch checkpoint"),
    (b"\0" * 100, r"the file holds only zero bytes, not a PyTorch checkpoint"),
    (b"\0" * 10000, r"the file starts with 4096 zero bytes, not a PyTorch checkpoint"),
    (b"\x80\x02\x00\x00junk", r"not a readable PyTorch checkpoint"),
])
def test_an_empty_or_zeroed_file_is_not_called_a_refused_pickle(tmp_path, content, expected):
    path = tmp_path / "model_best.pth.tar"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as caught:
        read_official(path)
    assert "refused" not in str(caught.value) and "allow-list" not in str(caught.value)
    assert "Weights only load failed" not in str(caught.value)
