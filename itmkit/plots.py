"""Pictures of runs and results (issue 16): training curves from run folders, and the recipes' rSum figure.

Each drawing function returns the matplotlib Figure with the exact numbers it plotted, so a test can hold
the picture to its source (``metrics.jsonl``, ``docs/results/*.json``); ``save_figure`` writes it. Figures are
made with ``matplotlib.figure.Figure``, not pyplot: no display, no backend to choose, no global state
(a figure is freed when dropped, and two threads may draw at once).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from itmkit.errors import ItmkitError

METRICS_NAME = "metrics.jsonl"
# metrics.jsonl keys of an epoch's record (itmkit.train) drawn by `itmkit plot`, one panel each, with their titles.
CURVE_PANELS = (
    ("train_loss", "training loss (epoch mean)"),
    ("rsum", "dev rSum"),
    ("i2t_r1", "dev R@1, image → text"),
    ("t2i_r1", "dev R@1, text → image"),
)
KIND_COLOURS = {"baseline": "tab:gray", "paper": "tab:blue", "cross-paper": "tab:orange"}
KIND_LABELS = {"baseline": "VSE++ baseline", "paper": "one paper's recipe", "cross-paper": "cross-paper recipe"}


# ----------------------------------------------------------------------------- run folders


@attrs.frozen
class RunMetrics:
    """A run folder's per-epoch records, epochs ascending (a repeated epoch: the last record wins)."""

    folder: Path
    label: str
    epochs: tuple[dict[str, Any], ...]


def read_run(folder: str | Path) -> RunMetrics:
    """The epoch records of ``folder``'s metrics.jsonl, read as ``--resume`` reads it (a torn last line is
    dropped); an ItmkitError naming the file when it is missing, empty or holds no finished epoch yet."""
    from itmkit.train import read_metrics  # the reader train itself uses: one rule for a torn last line

    folder = Path(folder)
    path = folder / METRICS_NAME
    if not folder.exists():
        raise ItmkitError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise ItmkitError(f"{folder} is not a folder: give a run folder (one that `itmkit train` wrote, holding"
                          f" {METRICS_NAME})")
    if not path.is_file():
        raise ItmkitError(f"{folder} is not a run folder: expected its metrics at {path}, which"
                          f" {'is not a file' if path.exists() else 'does not exist'} (`itmkit train` writes it"
                          " from the first logged step on)")
    try:
        records = read_metrics(path)
    except OSError as exc:
        raise ItmkitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not records:
        raise ItmkitError(f"{path} is empty: the run has logged nothing yet (or was started afresh and killed"
                          " before its first step)")
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in records:
        if "split" in record and isinstance(record.get("epoch"), int):  # an epoch's record, not a step's
            by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise ItmkitError(f"{path} holds no finished epoch yet ({len(records)} step record(s)): the curves are"
                          " drawn per epoch, from each epoch's dev record")
    return RunMetrics(folder, folder.resolve().name, tuple(by_epoch[e] for e in sorted(by_epoch)))


def _labels(folders: Sequence[Path]) -> list[str]:
    """Each run's folder name; runs whose names clash are told apart by the paths as given."""
    names = [Path(f).resolve().name for f in folders]
    return [str(f) if names.count(n) > 1 else n for f, n in zip(folders, names)]


def _number(value: Any) -> float:
    """A record's value as a float; null (a non-finite value, as train writes it) or a missing key: NaN, a gap."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


# ----------------------------------------------------------------------------- training curves


@attrs.frozen
class Curves:
    """The figure, and per panel (a metrics.jsonl key) per run label, the (epochs, values) it plotted.

    Epochs are 1-based, as the training log counts them (a record's ``epoch`` + 1)."""

    figure: Figure
    points: dict[str, dict[str, tuple[tuple[int, ...], tuple[float, ...]]]]


def training_curves(runs: Sequence[RunMetrics]) -> Curves:
    """One panel per CURVE_PANELS key, each run a line of its own colour in every panel, one legend for all."""
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    labels = _labels([run.folder for run in runs])
    points: dict[str, dict[str, tuple[tuple[int, ...], tuple[float, ...]]]] = {}
    for ax, (key, title) in zip(axes, CURVE_PANELS):
        points[key] = {}
        for i, (run, label) in enumerate(zip(runs, labels)):
            xs = tuple(record["epoch"] + 1 for record in run.epochs)
            ys = tuple(_number(record.get(key)) for record in run.epochs)
            points[key][label] = (xs, ys)
            ax.plot(xs, ys, marker="o", markersize=3, color=f"C{i % 10}", label=label)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        epochs = sorted({x for xs, _ in points[key].values() for x in xs})
        if len(epochs) == 1:  # one epoch: a whole-number tick, not 0.96 .. 1.04
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        if all(math.isnan(y) for _, ys in points[key].values() for y in ys):
            ax.text(0.5, 0.5, f"no values of {key!r} in metrics.jsonl", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")
        ax.grid(alpha=0.3)
    losses = [y for _, ys in points["train_loss"].values() for y in ys if not math.isnan(y)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        # The first epochs' loss can be orders of magnitude above the rest (VSE++'s 1790 then 53 on shapes).
        axes[0].set_yscale("log")
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize=9)
    return Curves(figure, points)


# ----------------------------------------------------------------------------- recipes figure


@attrs.frozen
class Bar:
    label: str
    kind: str  # docs/record_result.py --kind: baseline, paper, cross-paper
    rsum: float


@attrs.frozen
class RecipesChart:
    """The figure, and its bars top to bottom (highest rSum first)."""

    figure: Figure
    bars: tuple[Bar, ...]


def recipe_bars(records: Sequence[dict[str, Any]]) -> tuple[Bar, ...]:
    """One bar per recorded result (docs/results/*.json), highest test rSum first; a re-ranked row is its own bar."""
    bars = [Bar(Path(r["recipe"]).stem + (f" + {r['rerank']}" if r.get("rerank") else ""), r["kind"],
                float(r["metrics"]["rsum"])) for r in records]
    return tuple(sorted(bars, key=lambda b: (-b.rsum, b.label)))


def recipes_chart(records: Sequence[dict[str, Any]]) -> RecipesChart:
    """Test rSum of each recorded recipe on the built-in data, one horizontal bar each, coloured by kind, the
    VSE++ baseline's rSum drawn as a line across."""
    bars = recipe_bars(records)
    figure = Figure(figsize=(8, 0.26 * len(bars) + 1.6), layout="constrained")
    ax = figure.subplots()
    rows = range(len(bars))[::-1]  # the best at the top
    ax.barh(list(rows), [b.rsum for b in bars], color=[KIND_COLOURS[b.kind] for b in bars], height=0.7)
    ax.set_yticks(list(rows), [b.label for b in bars], fontsize=8)
    for row, bar in zip(rows, bars):
        ax.text(bar.rsum + 3, row, f"{bar.rsum:.1f}", va="center", fontsize=7)
    for bar in bars:
        if bar.kind == "baseline":
            ax.axvline(bar.rsum, color=KIND_COLOURS["baseline"], linestyle="--", linewidth=1)
    ax.set_xlim(0, max((b.rsum for b in bars), default=600) * 1.1)
    ax.set_ylim(-0.6, len(bars) - 0.4)
    ax.set(xlabel="test rSum (the six recalls, max 600)", title="Recipes on the built-in shapes data (f30k-1k test)")
    from matplotlib.patches import Patch

    kinds = [k for k in KIND_COLOURS if any(b.kind == k for b in bars)]
    ax.legend([Patch(color=KIND_COLOURS[k]) for k in kinds], [KIND_LABELS[k] for k in kinds], loc="lower right",
              fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return RecipesChart(figure, bars)


def bars_metadata(bars: Sequence[Bar]) -> str:
    """The bars as the JSON a PNG of the chart carries in its ``Description`` text chunk, so that a committed
    picture can be checked against docs/results without comparing pixels."""
    return json.dumps([[b.label, b.kind, b.rsum] for b in bars])


# ----------------------------------------------------------------------------- writing


def image_format(path: str | Path, option: str = "-o") -> str:
    """The image format named by ``path``'s suffix (png, pdf, svg, ...), or an ItmkitError listing the choices."""
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        choices = ", ".join(f".{f}" for f in sorted(formats))
        what = f"unknown image type '.{suffix}'" if suffix else "no image suffix"
        raise ItmkitError(f"{option} {path}: {what}; name the file with one of {choices}")
    return suffix


def figure_bytes(figure: Figure, fmt: str = "png", *, dpi: int = 110, description: str | None = None) -> bytes:
    """``figure`` rendered as ``fmt``; a PNG's ``Description`` text chunk holds ``description`` when given."""
    buffer = io.BytesIO()
    metadata = {"Description": description} if description is not None and fmt == "png" else None
    figure.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 110, description: str | None = None) -> Path:
    """Write ``figure`` to ``path`` atomically (a reader never sees half a picture), in the suffix's format."""
    from itmkit.checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, figure_bytes(figure, image_format(path), dpi=dpi, description=description))
    return path
