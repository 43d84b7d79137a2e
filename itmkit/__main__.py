"""``python -m itmkit`` runs the command line."""

from itmkit.cli import run

run()
