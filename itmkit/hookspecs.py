"""The plugin hooks of itmkit: a plugin contributes stage spec classes and, optionally, importers of official checkpoints."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("itmkit")
hookimpl = pluggy.HookimplMarker("itmkit")


@hookspec
def register_stages() -> list[type]:
    """Return the ``Stage`` subclasses this plugin contributes."""


@hookspec
def register_importers() -> dict:
    """Return ``{name: convert}`` converters of official checkpoints for ``itmkit import NAME``.

    ``convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted`` (see
    ``itmkit.importing``) maps the paper's options to a recipe and its weights to our stages.
    A converter whose ``vocab`` is annotated ``Vocabulary | ModelDirectory`` also accepts a
    directory as ``--vocab`` (a pretrained text encoder's files, e.g. BERT's); one annotated
    ``VocabularyFile`` gets the file unread, reads it itself (a vocabulary outside the SCAN layout)
    and returns the words as ``Converted.vocab``.
    """
