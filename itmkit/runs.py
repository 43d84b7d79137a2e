"""Run folders and caches: plain names, one owner at a time, leftovers of dead writers removed.

A run folder belongs to one ``itmkit train`` at a time: ``own_run_folder`` holds an exclusive
``flock`` on ``.itmkit.lock`` inside it for the whole run and writes its PID there, so a second
run into the same folder stops at once and names the holder. The kernel drops the lock when its
process dies, however it dies, so a stale lock never blocks. (``flock`` is POSIX; on NFS, Linux
maps it onto byte-range locks, which the server must support.)

Temporary files (``.NAME.PID.HEX.tmp``) are what an atomic write leaves when its process is
killed between writing and renaming. Only a writer that is gone may lose its temporary: every
atomic writer (``itmkit.checkpoint.atomic_write_bytes``, ``itmkit.data.split.atomic_path``) puts
its PID and eight hex digits in the name, so a temporary is removed only once that process is dead
(``itmkit eval --save-sims`` into a run folder keeps its file while it writes). Any other ``.tmp``
name is not itmkit's, and stays: a run folder may be a folder of the user's.

A folder is taken as a run folder only if it is empty or an itmkit run made it
(``check_run_folder``): ``--out`` naming a folder of other files is refused rather than filling it
with checkpoints and replacing a ``metrics.jsonl`` that may be the user's.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from itmkit.errors import ItmkitError

LOCK_NAME = ".itmkit.lock"
RUNS_DIR = "runs"
# Exactly the names atomic_write_bytes and split.atomic_path give: .NAME.PID.HEX.tmp, eight hex digits.
_PID_TEMP = re.compile(r"^\.(.+)\.([1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp$")
# What an itmkit run leaves in its folder; a checkpoint counts when its metadata says itmkit wrote it.
RUN_CHECKPOINTS = ("last.safetensors", "model_best.safetensors")
RUN_OUTPUTS = (*RUN_CHECKPOINTS, "metrics.jsonl", "test_metrics.json")


class RunFolderBusy(ItmkitError):
    """Another process holds the run folder."""


def name_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not a plain file or folder name (no separators, not '.' or '..'), or None."""
    if not isinstance(value, str) or not value.strip():
        return f"{what} = {value!r} must be a non-empty name"
    reasons = []
    if value in (".", ".."):
        reasons.append("it names a folder above or this one")
    if any(sep in value for sep in ("/", "\\")):
        reasons.append("it holds a path separator")
    if any(ord(c) < 32 for c in value):
        reasons.append("it holds a control character")
    if not reasons:
        return None
    return f"{what} = {value!r} must be a plain name, not a path ({'; '.join(reasons)})"


def plain_name(value: str, what: str) -> str:
    """``value`` if it is a plain name, else an ItmkitError saying why; ``what`` names the key."""
    problem = name_problem(value, what)
    if problem:
        raise ItmkitError(problem)
    return value


def default_run_folder(recipe_name: str) -> Path:
    """runs/<recipe name>: the name is checked, so it can never point outside runs/."""
    return Path(RUNS_DIR) / plain_name(recipe_name, "recipe.name (the run folder's name; or pass --out)")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return f"PID {text}" if text.isdigit() else "a process that has not written its PID yet"


@contextmanager
def hold_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive flock on ``path`` (created if missing); yields whether it was taken.

    ``wait=False`` yields False at once when another process holds it. The lock file stays: to
    delete it safely would need a second lock, and an empty file costs nothing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextmanager
def own_run_folder(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` for one run: refuse if another process holds it, then clear dead writers' temporaries."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ItmkitError(f"cannot use {folder} as a run folder: {exc.strerror or exc} (choose another with --out)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(
                f"run folder {folder} is in use by another itmkit train ({_holder(fd)}, from {folder / LOCK_NAME});"
                " wait for it to finish, or train into another folder with --out"
            ) from None
        except OSError as exc:
            raise ItmkitError(f"cannot lock run folder {folder} ({folder / LOCK_NAME}): {exc.strerror or exc};"
                              " its file system does not support flock: train into a local folder with --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_temporaries(folder)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)  # the next reader must not take our PID for a live holder
    finally:
        os.close(fd)


def temp_owner(name: str) -> int | None:
    """The writer's PID if ``name`` is an itmkit temporary (``.NAME.PID.HEX.tmp``), else None."""
    match = _PID_TEMP.match(name)
    return int(match.group(2)) if match else None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of itmkit writers that died; call only while holding the folder's lock.

    Only names of the exact form the atomic writers give are touched, and only once their PID is
    dead: a ``.notes.tmp`` or ``.a.b.tmp`` of the user's stays.
    """
    removed = []
    for tmp in folder.glob(".*.tmp"):
        owner = temp_owner(tmp.name)
        if owner is None or (owner != os.getpid() and pid_alive(owner)) or not tmp.is_file():
            continue  # not itmkit's, or a live process is writing it
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _written_by_itmkit(checkpoint: Path) -> bool:
    from itmkit.checkpoint import read_metadata  # imported here: checkpoint imports the model stack

    try:
        return "itmkit_version" in read_metadata(checkpoint)
    except ItmkitError:
        return False


def check_run_folder(folder: str | Path, *, resume: bool = False) -> list[str]:
    """What of an earlier itmkit run ``folder`` holds (checkpoints, metrics); [] for a new or empty folder.

    An existing folder holding other files, without the lock file every run creates or a checkpoint
    itmkit wrote, is not a run folder: training into it would replace a ``metrics.jsonl`` or
    ``recipe.toml`` of the user's, so it is refused naming what is there. With ``resume``, a
    ``last.safetensors`` is enough: resuming reads it first and says what is wrong with it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        raise ItmkitError(f"cannot use {folder} as a run folder: {exc.strerror or exc} (choose another with --out)") from None
    if not entries:
        return []
    is_run = (LOCK_NAME in entries or (resume and RUN_CHECKPOINTS[0] in entries)
              or any(_written_by_itmkit(folder / name) for name in RUN_CHECKPOINTS if name in entries))
    if not is_run:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise ItmkitError(f"--out {folder} is a folder of other files, not an itmkit run folder (it holds {shown});"
                          " train into a new or empty folder with --out, so nothing there is overwritten")
    return [name for name in RUN_OUTPUTS if name in entries]


# Folders named before generators put their PID in the name are another's only while recent.
LEGACY_TEMP_AGE_S = 3600


def temp_dir_prefix(stem: str) -> str:
    """``.STEM-PID-``: a temporary folder name that says which process is filling it."""
    return f".{stem}-{os.getpid()}-"


def remove_dead_temp_dirs(parent: Path, stem: str) -> list[Path]:
    """Delete ``.STEM-*`` folders whose creating process is gone; call only while holding the
    lock that every writer of such folders takes (so none of them is half-made by a live one)."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(stem)}-(\d+)-")
    for tmp in parent.glob(f".{stem}-*"):
        if not tmp.is_dir():
            continue
        match = pattern.match(tmp.name)
        if match:
            owner = int(match.group(1))
            if owner != os.getpid() and pid_alive(owner):
                continue
        elif time.time() - tmp.stat().st_mtime < LEGACY_TEMP_AGE_S:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed
