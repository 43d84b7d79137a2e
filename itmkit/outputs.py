"""Paths a command will write, checked before the work that produces them.

A command that writes a named output (``eval --save-sims``, ``data vocab -o``, ``import -o``,
``data convert DST``, ``train --out``) checks it first, so a folder given where a file is meant, a
parent folder that does not exist or cannot be written, or an output that would replace one of the
command's own inputs, is one clear line before minutes of scoring or converting, not an internal
error after them. Parent folders of an output file are not created: a typo in them (``/nonexist``)
should be an error, not a new folder somewhere. What makes a new folder of its own (a run folder,
a converted dataset) may create the folders above it, under a folder that can be written.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from itmkit.errors import ItmkitError
from itmkit.inputs import inside


class OutputPathError(ItmkitError):
    """An output path that cannot be written as asked."""


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _probe(folder: Path, option: str, path: Path) -> None:
    """Create and delete a file in ``folder``: the one sure test of writing there (permissions,
    read-only mounts, /proc). The name is an itmkit temporary's, so a kill here leaves nothing a
    run folder's cleanup would not remove."""
    probe = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OutputPathError(f"{option} {path}: cannot write into the folder {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def check_output_file(path: str | Path, option: str, *, inputs: tuple[str | Path, ...] = (), example: str = "NAME",
                      create_parents: bool = False) -> Path:
    """``path`` if a file can be written there: not a folder, in an existing folder that can be
    written (or, with ``create_parents``, under one), not one of ``inputs``; otherwise an
    OutputPathError naming ``option`` and the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; name the file to write (e.g. {path / example})")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{option} {path} exists and is not a regular file; name a file to write")
    for source in inputs:
        source = Path(source).expanduser()
        if _same(path, source):
            raise OutputPathError(f"{option} {path} is also an input of this command ({source}); write to another file")
        # A dataset folder is an input as a whole: any file already in it may be one a split reads
        # (features, captions, counts, boxes, an HDF5 file, its vocab.json). Rather than knowing every
        # layout's names, no existing file under an input folder is replaced; new files may be written.
        if path.is_file() and source.is_dir() and inside(path, source):
            raise OutputPathError(f"{option} {path} is a file of {source}, an input of this command; itmkit does"
                                  " not replace files of its input folders: write to a new file or elsewhere")
    _writable_parent(path, option, create_parents=create_parents)
    return path


def check_output_folder(path: str | Path, option: str, *, inputs: tuple[str | Path, ...] = (),
                        writes: tuple[str, ...] = (), create_parents: bool = False) -> Path:
    """``path`` if a folder can be made or written there: an existing folder that can be written, or a
    new one whose parent exists (or, with ``create_parents``, whose nearest existing ancestor is a
    folder that can be written); not an input folder or one inside it (files written there would be
    read as part of the input: ``data convert NPZ_DIR NPZ_DIR``), and not a folder where one of the
    file names in ``writes`` would replace an input file."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} exists and is not a folder")
    for source in inputs:
        source = Path(source).expanduser()
        if source.is_dir() and inside(path, source):
            where = "is" if _same(path, source) else "is inside"
            raise OutputPathError(f"{option} {path} {where} {source}, an input of this command; write the output"
                                  " to a folder outside it")
        clash = next((name for name in writes if _same(path / name, source)), None)
        if clash is not None:
            raise OutputPathError(f"{option} {path}: writing {clash} there would replace the input {source};"
                                  " write the output to another folder")
    if path.is_dir():
        _probe(path, option, path)
        return path
    _writable_parent(path, option, create_parents=create_parents)
    return path


def _writable_parent(path: Path, option: str, *, create_parents: bool = False) -> None:
    parent = path.parent
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise OutputPathError(f"{option} {path}: the folder {parent} does not exist (create it first;"
                              " itmkit does not create the folders above an output)")
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is not a folder")
    _probe(parent, option, path)
