"""``itmkit index`` and ``itmkit search``: a faiss index of a gallery and queries against it (issue 14)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the retrieval commands to the ``itmkit`` command line."""
