"""Regenerate docs/recipes.md, the stage reference, from the registry: ``python docs/generate.py``.

It documents the built-in stages and the project's own plugins (the ``itmkit`` entry points in
pyproject.toml), whatever else is installed. ``python docs/generate.py --check`` writes nothing and
exits 1 when the file is out of date. tests/test_docs.py keeps the file in step with the code.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "recipes.md"


def project_plugins() -> list[str]:
    """Entry-point names of the project's own plugins, from pyproject.toml."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(pyproject.get("project", {}).get("entry-points", {}).get("itmkit", {}))


def reference() -> str:
    """The stage reference of the built-ins and the project's plugins, as Markdown."""
    from itmkit.docs import stage_reference_markdown
    from itmkit.plugins import load_registry

    names = project_plugins()
    saved = {k: os.environ.get(k) for k in ("ITMKIT_LOAD_PLUGINS", "ITMKIT_DISABLE_PLUGINS")}
    os.environ["ITMKIT_LOAD_PLUGINS"] = ",".join(names)
    os.environ.pop("ITMKIT_DISABLE_PLUGINS", None)
    try:
        registry = load_registry()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    loaded = {p.name: p for p in registry.plugins}
    missing = [n for n in names if n not in loaded]
    if missing:
        raise SystemExit(f"plugins listed in pyproject.toml but not installed: {', '.join(missing)}"
                         " (reinstall the project: pip install -e .)")
    failed = [f"{p.name}: {p.error}" for p in registry.plugins if p.error]
    if failed:
        raise SystemExit("plugins that failed to load:\n  " + "\n  ".join(failed))
    return stage_reference_markdown(registry)


def main(argv: list[str]) -> int:
    text = reference()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python docs/generate.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
