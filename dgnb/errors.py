"""Expected failures and how both command lines (`dgnb`, `python -m data_tools`) report them.

An expected failure (a bad value, a missing or broken file, a folder that cannot be written) is printed
as one line that names the file or value and the fix; anything else is a bug and keeps its traceback.
`--debug` shows the traceback of expected failures too.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class DgnbError(Exception):
    """An expected failure whose message names the file or value and the fix."""


class CheckpointError(DgnbError):
    """A checkpoint cannot be read or does not fit the run's model."""


class RunCacheError(DgnbError):
    """A file of the run cache is broken (metrics.json, config.json)."""


# What to do about an OSError, by errno.
_OS_FIXES = {
    errno.EACCES: "no permission: make it writable (chmod u+w) or choose another location",
    errno.EPERM: "not permitted: choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.EISDIR: "this is a folder where a file is expected: give a file path",
    errno.ENOTDIR: "part of this path is a file where a folder is expected: point it at a folder",
    errno.ENOSPC: "the disk is full: free some space or choose another location",
    errno.ENOENT: "it does not exist: check the path",
    errno.EEXIST: "it already exists: remove it or choose another path",
}
_LOCATIONS = " (data: --data-root / --root / --dst; runs: $DGNB_HOME; outputs: --out)"


def describe(e: BaseException) -> str:
    """The one-line message of an expected failure."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        path = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        fix = _OS_FIXES.get(e.errno, "check the path and its permissions")
        where = _LOCATIONS if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC) else ""
        return f"{e.strerror}: {path}; {fix}{where}." if e.filename else f"{e.strerror}; {fix}."
    if type(e).__name__ == "OutOfMemoryError":
        return (f"out of GPU memory ({str(e).splitlines()[0]}); lower data.batch_per_domain or data.crop "
                "(--set data.batch_per_domain=2), or use a larger GPU.")
    return str(e)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types the command lines report in one line (their messages name the file or value and the fix)."""
    out: list[type[BaseException]] = [DgnbError, ValueError, OSError]
    try:
        import torch

        out.append(torch.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return tuple(out)


def run_cli(prog: str, fn: Callable[[], int | None], debug: bool,
            extra: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command line's body: expected failures become `prog: error: ...` (exit 2), Ctrl-C exit 130."""
    try:
        return fn() or 0
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except expected_errors() + extra as e:
        if debug:
            raise
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 2


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove `--debug` from anywhere in argv (it may follow the subcommand)."""
    return [a for a in argv if a != "--debug"], "--debug" in argv
