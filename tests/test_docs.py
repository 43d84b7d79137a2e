"""docs/recipes.md is the stage reference generated from the registry, and stays in step with the code."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest

from itmkit.docs import stage_reference_markdown
from itmkit.plugins import load_registry
from itmkit.stage import KINDS, stage_params

ROOT = Path(__file__).resolve().parents[1]
RECIPES_MD = ROOT / "docs" / "recipes.md"
REGENERATE = "regenerate it with `python docs/generate.py` (from the repository root) and commit the result"


def project_plugins() -> list[str]:
    """Entry-point names of the project's own plugins (pyproject's `itmkit` entry points)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(pyproject.get("project", {}).get("entry-points", {}).get("itmkit", {}))


@pytest.fixture
def registry(monkeypatch):
    """Built-ins plus the project's own plugins only: a third-party plugin installed here is left out."""
    names = project_plugins()
    monkeypatch.setenv("ITMKIT_LOAD_PLUGINS", ",".join(names))
    monkeypatch.delenv("ITMKIT_DISABLE_PLUGINS", raising=False)
    registry = load_registry()
    loaded = {p.name: p for p in registry.plugins}
    missing = [n for n in names if n not in loaded]
    assert not missing, f"plugins in pyproject.toml but not installed: {missing}; reinstall: pip install -e ."
    failed = {p.name: p.error for p in registry.plugins if p.error}
    assert not failed, f"plugins failed to load: {failed}"
    return registry


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def test_recipes_md_is_up_to_date(registry):
    assert RECIPES_MD.is_file(), f"{RECIPES_MD} is missing: {REGENERATE}"
    text = RECIPES_MD.read_text()
    assert text == _generate().document(), f"docs/recipes.md is out of date: {REGENERATE}"
    # the stage reference is all of it after the measured-results table
    reference = stage_reference_markdown(registry)
    assert text.endswith(reference[reference.index("\n## "):])


def test_generate_script_writes_what_the_test_expects(registry, tmp_path, monkeypatch):
    generate = _generate()
    assert generate.project_plugins() == project_plugins()
    assert generate.reference() == stage_reference_markdown(registry)
    # --check says so when the file is stale, and writes nothing
    stale = tmp_path / "recipes.md"
    stale.write_text("old\n")
    monkeypatch.setattr(generate, "TARGET", stale)
    assert generate.main(["--check"]) == 1 and stale.read_text() == "old\n"
    assert generate.main([]) == 0 and stale.read_text() == generate.document()
    assert generate.main(["--check"]) == 0


def test_every_recorded_result_names_an_existing_recipe_and_appears_in_the_table():
    generate = _generate()
    records = [json.loads(p.read_text()) for p in sorted(generate.RESULTS.glob("*.json"))]
    assert records, "docs/results has no recorded runs"
    table = generate.results_section()
    for r in records:
        assert (ROOT / r["recipe"]).is_file(), r["recipe"]
        assert f"**{r['metrics']['rsum']:.1f}**" in table


def test_reference_documents_every_stage_and_parameter(registry):
    text = stage_reference_markdown(registry)
    headings = re.findall(r"^### `([^`]+)`$", text, re.M)
    assert sorted(headings) == sorted(registry.stages)
    kinds = re.findall(r"^## (\w+) stages$", text, re.M)
    assert kinds == [k for k in KINDS if registry.by_kind(k)]
    for name, cls in registry.stages.items():
        section = text.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        assert f"- plugin: `{registry.owners[name]}`" in section
        assert f"- paper: {cls.paper}" in section
        for p in stage_params(cls):
            assert f"| `{p.name}` |" in section, f"{name}.{p.name} undocumented"


def test_table_cells_escape_pipes(registry):
    """`int | None` must not split a Markdown table row."""
    text = stage_reference_markdown(registry)
    row = next(line for line in text.splitlines() if line.startswith("| `embed_dim` |"))
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 4 and "\\|" in cells[1], row
