"""Files a user names as input, checked before they are opened, and read with a size cap.

Every file itmkit reads because a user named it (a recipe, a vocabulary, a checkpoint, an
official checkpoint, a converter source, a ``--stages`` file, a dataset's own files) goes through
``input_file`` first. Opening a FIFO blocks until something writes to it, forever at a prompt;
reading ``/dev/zero`` or ``/dev/urandom`` never ends and grows until memory runs out; a folder
or a dangling link is neither "missing" nor a file. Each is one clear line, naming the file,
before anything is opened. The check is by ``stat`` (links followed), which never blocks.

Text inputs that are small by nature (a recipe, a vocabulary) are read with ``read_input``'s
cap: a 64 MiB recipe or vocabulary is a wrong file, not a big one (the largest official
vocabulary, COCO's, is under 1 MB), and reading it whole to find that out would cost the memory.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from itmkit.errors import DataError, ItmkitError

MAX_TEXT_BYTES = 64 * 2**20  # a recipe or a vocabulary larger than this is refused unread


def input_file(path: str | Path, what: str, *, error: type[ItmkitError] = DataError,
               optional: bool = False, missing: str = "{what} {path} does not exist") -> Path | None:
    """``path`` if it is a regular file (or a link to one); None if ``optional`` and nothing is there;
    otherwise ``error`` naming ``what`` and the path: missing (said as ``missing``), a dangling link, a
    folder, a FIFO, a device or a socket."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode  # follows links; never opens, so never blocks
    except FileNotFoundError:
        if path.is_symlink():
            raise error(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist") from None
        if optional:
            return None
        raise error(missing.format(what=what, path=path)) from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISREG(mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise error(f"{what} {path} is {kind}; expected a regular file")


def read_input(path: str | Path, what: str, *, error: type[ItmkitError] = DataError,
               limit: int | None = MAX_TEXT_BYTES, missing: str = "{what} {path} does not exist") -> bytes:
    """The bytes of the regular file ``path`` (checked by ``input_file``), refused unread when it is
    larger than ``limit`` bytes (None: no cap)."""
    path = input_file(path, what, error=error, missing=missing)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if limit is not None and size > limit:
                raise error(f"{what} {path} is {size / 2**20:,.0f} MiB; a {what} is at most {limit // 2**20} MiB"
                            " (is this the right file?)")
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    if limit is not None and len(data) > limit:  # grew while being read
        raise error(f"{what} {path} is over {limit // 2**20} MiB; a {what} is at most {limit // 2**20} MiB")
    return data


# ASCII digits, an optional minus (a negative count gets its own message from the caller). Python's
# int() also takes '٣' (Arabic-Indic 3), '1_0', '+5' and ' 5': in a data file each is a typo or
# another tool's convention, read silently as a number it may not mean.
_INTEGER = re.compile(r"-?[0-9]{1,30}")


def strict_int(text: str) -> int | None:
    """The integer ``text`` spells in ASCII digits (optionally after a '-'), nothing else around it; else None."""
    return int(text) if _INTEGER.fullmatch(text) else None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one existing file (links and other spellings resolved)."""
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies in ``folder`` (at any depth), comparing resolved paths."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())
    except (OSError, RuntimeError):
        return False
