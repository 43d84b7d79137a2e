"""``itmkit plot``: training curves of one or more run folders in one picture (issue 16)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def register(app: typer.Typer) -> None:
    """Add ``itmkit plot`` to the ``itmkit`` command line."""
    app.command("plot")(plot)


def plot(
    runs: Annotated[list[Path], typer.Argument(help="run folders of `itmkit train` (each holding metrics.jsonl),"
                                               " drawn over one another")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the picture to write; its suffix names the"
                                         " format: .png, .pdf, .svg, ...")],
    dpi: Annotated[int, typer.Option(min=20, max=1200, help="dots per inch of a raster picture (.png, .jpg)")] = 110,
) -> None:
    """Draw per epoch the training loss, the dev rSum and the dev R@1 of both directions, one panel each."""
    from itmkit.cli import out as console
    from itmkit.outputs import check_output_file
    from itmkit.plots import METRICS_NAME, image_format, read_run, save_figure, training_curves

    check_output_file(output, "-o", inputs=tuple(run / METRICS_NAME for run in runs), example="curves.png")
    image_format(output)
    loaded = [read_run(run) for run in runs]
    curves = training_curves(loaded)
    save_figure(curves.figure, output, dpi=dpi)
    epochs = ", ".join(f"{label} {len(xs)}" for label, (xs, _) in curves.points["rsum"].items())
    console.print(escape(f"wrote {output} (epochs drawn: {epochs})"), soft_wrap=True, highlight=False)
    for key, runs_points in curves.points.items():  # gaps are drawn as gaps: say where they are
        for label, (xs, ys) in runs_points.items():
            missing = [x for x, y in zip(xs, ys) if math.isnan(y)]
            if missing:
                console.print(escape(f"note: {label}: no {key} at epoch(s) {', '.join(map(str, missing))} (null,"
                                     " missing or not a number in metrics.jsonl): a gap in its curve"),
                              soft_wrap=True, highlight=False)
