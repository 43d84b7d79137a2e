"""The plugin hooks of itmkit. One hook for now: a plugin contributes stage spec classes."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("itmkit")
hookimpl = pluggy.HookimplMarker("itmkit")


@hookspec
def register_stages() -> list[type]:
    """Return the ``Stage`` subclasses this plugin contributes."""
