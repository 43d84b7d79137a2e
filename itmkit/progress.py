"""Progress bars (rich) for long work: encoding, scoring, training epochs, data generation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not console.is_terminal,  # logs get the summary lines instead of redraws
    )


@contextlib.contextmanager
def task(progress: Progress | None, description: str, total: int | None) -> Iterator:
    """A callback ``update(done, total=None, info='')`` for one task on ``progress`` (no-op if None)."""
    if progress is None:
        yield lambda done, total=None, info="": None
        return
    task_id = progress.add_task(description, total=total, info="")

    def update(done: int, total: int | None = None, info: str = "") -> None:
        fields = {"info": info} if info else {}
        progress.update(task_id, completed=done, **({"total": total} if total and total > 0 else {}), **fields)

    try:
        yield update
    finally:
        progress.update(task_id, visible=True)
