"""Regenerate docs/recipes.md from the registry and the recorded runs: ``python docs/generate.py``.

It documents the built-in stages and the project's own plugins (the ``itmkit`` entry points in
pyproject.toml), whatever else is installed, after a table of the recipes measured on the
built-in data (``docs/results/*.json``, written by ``docs/record_result.py``), and draws that table's rSum
column into docs/images/recipes_rsum.png. ``python docs/generate.py --check`` writes nothing and
exits 1 when the file is out of date, or the figure's values (carried in the PNG) are not the results'.
tests/test_docs.py keeps the file in step with the code.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "recipes.md"
RESULTS = ROOT / "docs" / "results"
FIGURE = "images/recipes_rsum.png"  # the results table's figure, beside TARGET
KIND_ORDER = ("baseline", "paper", "cross-paper")  # docs/record_result.py --kind


def project_plugins() -> list[str]:
    """Entry-point names of the project's own plugins, from pyproject.toml."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(pyproject.get("project", {}).get("entry-points", {}).get("itmkit", {}))


def reference(header: str | None = None) -> str:
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
    return stage_reference_markdown(registry) if header is None else stage_reference_markdown(registry, header)


def papers_of(recipe_path: Path) -> list[str]:
    """The plugins (papers) whose stages a recipe uses, built-in core stages left out."""
    from itmkit.testing import recipe_plugins

    return sorted(recipe_plugins(recipe_path))


def result_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def results_section() -> str:
    """The recorded built-in-data runs as one table: the baseline, one-paper recipes, then cross-paper ones;
    the figure of their rSum below it."""
    records = result_records()
    if not records:
        return ""
    rows = []
    for r in records:
        papers = papers_of(ROOT / r["recipe"])
        m = r["metrics"]
        rows.append((KIND_ORDER.index(r["kind"]), -m["rsum"], (
            f"| [`{Path(r['recipe']).name}`](../{r['recipe']}){' + re-ranking `' + r['rerank'] + '`' if r.get('rerank') else ''}"
            f" | {', '.join(papers) or 'VSE++ (core)'}"
            f" | {r['best_epoch']} of {r['epochs']}"
            f" | {m['i2t_r1']:.1f} / {m['i2t_r5']:.1f} / {m['i2t_r10']:.1f}"
            f" | {m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f} | **{m['rsum']:.1f}**"
            f" | {r['run_date']}, {r['note'] or '-'} |\n")))
    lines = [
        "## Measured on the built-in data\n\n",
        "Test split of the built-in *shapes* data (1000 images, 5000 captions, `f30k-1k` protocol), each recipe\n",
        "trained as it stands in `recipes/` on the 2-core CPU machine; recorded with `docs/record_result.py`.\n",
        "The baseline first, then each paper's recipe, then the cross-paper combinations, each by rSum. A row\n",
        "`+ re-ranking` is the same run's best checkpoint re-ranked (`itmkit eval --rerank`; its t2i step reads the\n",
        "test set's caption grouping, see docs/plugins/mtfn.md).\n\n",
        "| recipe | papers | best epoch | i2t R@1 / R@5 / R@10 | t2i R@1 / R@5 / R@10 | rSum | run |\n",
        "|---|---|---|---|---|---|---|\n",
    ]
    lines += [row for *_, row in sorted(rows)]
    lines += [
        "\nThe rSum column as a figure (drawn by `docs/generate.py`): one paper's recipes blue, cross-paper recipes\n",
        "orange, the VSE++ baseline grey with a dashed line at its rSum.\n\n",
        f"![Test rSum of each recipe in the table, highest first]({FIGURE})\n",
    ]
    return "".join(lines) + "\n"


def figure_png() -> bytes:
    """The figure of the results' rSum (itmkit.plots.recipes_chart), its bars' values in the PNG's Description."""
    from itmkit.plots import bars_metadata, figure_bytes, recipes_chart

    chart = recipes_chart(result_records())
    return figure_bytes(chart.figure, "png", description=bars_metadata(chart.bars))


def figure_problem(path: Path) -> str | None:
    """Why the figure at ``path`` is not the one of docs/results (missing, or other values), or None.

    The values it carries are compared, not its pixels: another matplotlib draws other pixels."""
    from PIL import Image

    from itmkit.plots import bars_metadata, recipe_bars

    if not path.is_file():
        return f"{path} is missing"
    with Image.open(path) as image:
        carried = image.text.get("Description")  # type: ignore[attr-defined]
    if carried != bars_metadata(recipe_bars(result_records())):
        return f"{path} draws other values than docs/results/*.json"
    return None


def document() -> str:
    """The whole of docs/recipes.md."""
    from itmkit.docs import HEADER

    return reference(HEADER + results_section())


def main(argv: list[str]) -> int:
    text = document()
    figure = TARGET.parent / FIGURE
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python docs/generate.py", file=sys.stderr)
            return 1
        problem = figure_problem(figure)
        if problem:
            print(f"{problem}: run python docs/generate.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    from itmkit.checkpoint import atomic_write_bytes

    atomic_write_bytes(figure, figure_png())
    print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
