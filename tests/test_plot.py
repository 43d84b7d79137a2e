"""`itmkit plot` (training curves from run folders) and the recipes' rSum figure of docs/recipes.md (issue 16)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from PIL import Image

from cliutil import assert_clean_failure, invoke
from itmkit.plots import (CURVE_PANELS, bars_metadata, image_format, read_run, recipe_bars, recipes_chart,
                          training_curves)
from itmkit.train import read_metrics
from tinydata import RECIPE, write_tiny

ROOT = Path(__file__).resolve().parents[1]


def _train(folder: Path, data: Path, epochs: int, seed: int) -> Path:
    from itmkit.recipe import load_recipe
    from itmkit.train import train

    folder.mkdir()
    recipe = folder / "tiny.toml"
    recipe.write_text(RECIPE.replace("DATA", str(data)).replace("epochs = 1", f"epochs = {epochs}\nseed = {seed}"))
    train(load_recipe(recipe), out_dir=folder / "run", log=lambda *a: None)
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny trained runs: 2 epochs, and 3 epochs from another seed (a second each)."""
    root = tmp_path_factory.mktemp("plot")
    data = write_tiny(root / "data")
    first = _train(root / "first", data, epochs=2, seed=0)
    second = _train(root / "second", data, epochs=3, seed=1)
    return first, second


def _epoch_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "dev"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_curves_plot_exactly_the_epoch_records(runs):
    first, _ = runs
    records = _epoch_records(first)
    assert [r["epoch"] for r in records] == [0, 1]
    curves = training_curves([read_run(first)])
    label = first.resolve().name
    axes = curves.figure.axes
    for ax, (key, _) in zip(axes, CURVE_PANELS):
        xs, ys = curves.points[key][label]
        assert xs == (1, 2)  # epochs counted from 1, as the training log does
        assert ys == tuple(r[key] for r in records)  # exactly, no rounding
        (line,) = ax.get_lines()
        assert tuple(line.get_xdata()) == xs and tuple(line.get_ydata()) == ys and line.get_label() == label


def test_plot_command_writes_a_png(runs, tmp_path):
    first, _ = runs
    out = tmp_path / "curves.png"
    result = invoke("plot", str(first), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert _png_size(out) == (1210, 825)  # 11 x 7.5 inches at 110 dpi
    assert "wrote" in result.stdout and not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left
    result = invoke("plot", str(first), "-o", str(out), "--dpi", "50")  # replaces its own earlier picture
    assert result.returncode == 0 and _png_size(out) == (550, 375)
    assert invoke("plot", str(first), "-o", str(tmp_path / "curves.svg")).returncode == 0
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")


def test_two_runs_overlaid_one_line_each_per_panel(runs, tmp_path):
    first, second = runs
    # both folders are named "run": told apart by their paths
    curves = training_curves([read_run(first), read_run(second)])
    labels = [str(first), str(second)]
    for ax, (key, _) in zip(curves.figure.axes, CURVE_PANELS):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == labels
        for line, run in zip(lines, runs):
            records = _epoch_records(run)
            assert tuple(line.get_ydata()) == tuple(r[key] for r in records)
            assert tuple(line.get_xdata()) == tuple(r["epoch"] + 1 for r in records)
    legend = curves.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == labels

    # distinct folder names are the labels
    a, b = tmp_path / "vsepp-a", tmp_path / "vsepp-b"
    shutil.copytree(first, a)
    shutil.copytree(second, b)
    curves = training_curves([read_run(a), read_run(b)])
    assert list(curves.points["rsum"]) == ["vsepp-a", "vsepp-b"]
    assert [len(xs) for xs, _ in curves.points["rsum"].values()] == [2, 3]
    assert invoke("plot", str(a), str(b), "-o", str(tmp_path / "both.png")).returncode == 0


def test_step_records_and_a_torn_last_line_are_left_out(runs, tmp_path):
    first, _ = runs
    run = tmp_path / "torn"
    shutil.copytree(first, run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    step = json.dumps({"epoch": 2, "iteration": 21, "loss": 1.5, "lr": 0.1}) + "\n"
    (run / "metrics.jsonl").write_text("".join(lines) + step + '{"epoch": 2, "iter')  # killed mid-write
    loaded = read_run(run)
    assert [r["epoch"] for r in loaded.epochs] == [0, 1]
    assert invoke("plot", str(run), "-o", str(tmp_path / "c.png")).returncode == 0


def test_a_null_value_is_a_gap(tmp_path):
    run = tmp_path / "nulls"
    run.mkdir()
    records = [{"epoch": e, "iteration": e, "split": "dev", "train_loss": loss, "rsum": 1.0, "i2t_r1": 1.0,
                "t2i_r1": 2.0} for e, loss in enumerate([2.0, None, 1.0])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ys = training_curves([read_run(run)]).points["train_loss"]["nulls"][1]
    assert ys[0] == 2.0 and math.isnan(ys[1]) and ys[2] == 1.0


def test_gaps_are_said_and_one_epoch_gets_a_whole_number_tick(tmp_path):
    run = tmp_path / "one"
    run.mkdir()
    record = {"epoch": 0, "iteration": 5, "split": "dev", "train_loss": 2.0, "rsum": "NaN", "i2t_r1": 1.0, "t2i_r1": 2.0}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    result = invoke("plot", str(run), "-o", str(tmp_path / "one.png"))
    assert result.returncode == 0, result.stderr
    assert "note: one: no rsum at epoch(s) 1" in result.stdout
    figure = training_curves([read_run(run)]).figure
    rsum_panel = figure.axes[1]
    assert [t.get_text() for t in rsum_panel.texts] == ["no values of 'rsum' in metrics.jsonl"]
    assert list(figure.axes[0].get_xticks()) == [1]


@pytest.mark.parametrize("case", ["missing", "not-a-run", "a-file", "empty", "steps-only", "bad-line"])
def test_bad_run_folders_are_one_error_line(case, tmp_path):
    run = tmp_path / "run"
    expected = {"missing": "does not exist", "not-a-run": f"expected its metrics at {run / 'metrics.jsonl'}",
                "a-file": "is not a folder", "empty": "is empty", "steps-only": "holds no finished epoch yet",
                "bad-line": "line 1: not a metrics record"}[case]
    if case == "a-file":
        run.write_text("x")
    elif case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    elif case == "steps-only":
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "iteration": 50, "loss": 3.0, "lr": 2e-4}) + "\n")
    elif case == "bad-line":
        (run / "metrics.jsonl").write_text("not json\n" + json.dumps({"epoch": 0, "split": "dev"}) + "\n")
    out = tmp_path / "curves.png"
    message = assert_clean_failure(invoke("plot", str(run), "-o", str(out)))
    assert expected in message, message
    assert not out.exists()


def test_bad_outputs_are_one_error_line(runs, tmp_path):
    first, _ = runs
    before = (first / "metrics.jsonl").read_bytes()
    cases = {
        str(tmp_path): "is a folder",
        str(first / "metrics.jsonl"): "is also an input of this command",
        str(tmp_path / "curves.txt"): "unknown image type '.txt'",
        str(tmp_path / "curves"): "no image suffix; name the file with one of",
        str(tmp_path / "nonexistent" / "curves.png"): "does not exist",
    }
    for output, expected in cases.items():
        message = assert_clean_failure(invoke("plot", str(first), "-o", output))
        assert expected in message, message
    assert (first / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert image_format("a/b.PNG") == "png"


# ----------------------------------------------------------------------------- the recipes' figure


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def _results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "docs" / "results").glob("*.json"))]


def test_recipes_chart_draws_the_recorded_rsums():
    records = _results()
    chart = recipes_chart(records)
    assert sorted(b.rsum for b in chart.bars) == sorted(r["metrics"]["rsum"] for r in records)
    assert [b.rsum for b in chart.bars] == sorted((b.rsum for b in chart.bars), reverse=True)
    by_label = {b.label: b for b in chart.bars}
    assert by_label["vsepp"].kind == "baseline" and by_label["mtfn_shapes + mtfn-rr"].kind == "paper"
    assert {b.kind for b in chart.bars} == {"baseline", "paper", "cross-paper"}
    (ax,) = chart.figure.axes
    patches = ax.patches
    assert [p.get_width() for p in patches] == [b.rsum for b in chart.bars]
    ticks = {t.get_position()[1]: t.get_text() for t in ax.get_yticklabels()}
    assert [ticks[p.get_y() + p.get_height() / 2] for p in patches] == [b.label for b in chart.bars]
    colours = {b.kind: p.get_facecolor() for b, p in zip(chart.bars, patches)}
    assert len(set(colours.values())) == 3  # baseline, one paper, cross-paper told apart
    (baseline,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert tuple(baseline.get_xdata()) == (by_label["vsepp"].rsum,) * 2


def test_the_committed_figure_carries_the_recorded_rsums(tmp_path, monkeypatch):
    generate = _generate()
    figure = ROOT / "docs" / "images" / "recipes_rsum.png"
    with Image.open(figure) as image:
        carried = json.loads(image.text["Description"])
    assert carried == json.loads(bars_metadata(recipe_bars(_results())))
    assert sorted(rsum for _, _, rsum in carried) == sorted(r["metrics"]["rsum"] for r in _results())
    assert generate.figure_problem(figure) is None
    assert f"]({generate.FIGURE})" in (ROOT / "docs" / "recipes.md").read_text()
    assert (ROOT / "docs" / generate.FIGURE) == figure
    # a figure of other values is caught by --check
    stale = tmp_path / "images" / "recipes_rsum.png"
    stale.parent.mkdir()
    with Image.open(figure) as image:
        image.save(stale, pnginfo=None)
    assert "draws other values" in generate.figure_problem(stale)
    assert "is missing" in generate.figure_problem(tmp_path / "none.png")
