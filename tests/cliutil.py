"""``itmkit`` run in-process for tests, as the console script runs it, and what a clean failure is.

``invoke`` calls ``itmkit.cli.run`` (the console script's entry point, with its error-to-exit-code
conversion) with stdout and stderr captured; a test that needs the installed script itself (a
fresh interpreter, the real entry point) uses ``subprocess`` instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import NamedTuple

from itmkit import cli


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str) -> Result:
    """``itmkit ARGS`` in this process through ``cli.run``, tracebacks off, output captured."""
    saved = sys.argv, cli._state["debug"], os.environ.pop("ITMKIT_DEBUG", None)
    sys.argv = ["itmkit", *args]
    cli._state["debug"] = False
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, cli._state["debug"] = saved[0], saved[1]
        if saved[2] is not None:
            os.environ["ITMKIT_DEBUG"] = saved[2]
    return Result(code, out.getvalue(), err.getvalue())


def flat(text: str) -> str:
    """``text`` with every run of white space (rich's line wrapping included) as one space."""
    return " ".join(text.split())


def assert_clean_failure(result: Result, code: int = 1) -> str:
    """Exit ``code``, no traceback, exactly one line starting 'error:' (a recipe error lists its
    problems below it), and for bad input (exit 1) no 'internal error'; returns the message flattened."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    if code == 1:
        assert "internal error" not in result.stderr, result.stderr
    return flat(result.stderr[result.stderr.index("error:"):])


def paused_itmkit(args: list[str], marker, *, file: str = "last", skip: int = 0, timeout: float = 240):
    """``itmkit ARGS`` in a fresh interpreter, paused inside the (skip+1)-th atomic write of a file whose name
    starts with ``file`` (temporary written, not yet renamed: ``checkpoint.atomic_write_bytes``'s test hook);
    returns the process once it is there, for the test to SIGKILL. Fails if it ends or never gets there."""
    import subprocess
    import time

    env = {**os.environ, "ITMKIT_TEST_PAUSE_BEFORE_RENAME": str(marker), "ITMKIT_TEST_PAUSE_FILE": file,
           "ITMKIT_TEST_PAUSE_SKIP": str(skip)}
    proc = subprocess.Popen([sys.executable, "-m", "itmkit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(marker) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if not os.path.exists(marker):
        proc.kill()
        raise AssertionError(f"itmkit {' '.join(args)} never reached write {skip + 1} of {file}*")
    return proc
