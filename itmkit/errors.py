"""Errors that the CLI reports as one clear message and exit code 1, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ItmkitError(Exception):
    """Base of every error itmkit reports to a user: the message says what, where and a hint."""


class DataError(ItmkitError):
    """A dataset on disk is missing, malformed or inconsistent."""


class CheckpointError(ItmkitError):
    """A checkpoint cannot be read or does not match what it claims to hold."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or the list of choices when none is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if not choices:
        return ""
    shown = ", ".join(repr(c) for c in choices[:12])
    more = ", ..." if len(choices) > 12 else ""
    return f" (choices: {shown}{more})"
