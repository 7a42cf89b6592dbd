"""The one wrapper of every entry point: bad input ends as one line on stderr and exit 2.

    @entry_point
    def main(argv=None) -> int: ...

`entry_point` applies torch.distributed.elastic's `record` (torchrun reports a failing rank's
traceback from the error file it writes) around the one-line conversion: UsageError,
ValueError, OSError, checkpoint, run-directory and lock errors print `error: <one line>` and
return 2 (no traceback: they are the user's to fix); anything else is a bug and keeps its
traceback. A family raises; it never prints its own error lines.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from .distributed import record
from .errors import USAGE_EXIT_CODE, CheckpointError, UsageError, one_line
from .lock import RunLockError
from .run_dir import RunDirError

__all__ = ["entry_point", "EXPECTED_ERRORS", "run_one_line", "OneLineParser"]

# ValueError covers UsageError; OSError covers missing / unreadable paths
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, CheckpointError, RunDirError, RunLockError)



def run_one_line(main: Callable[..., int | None], *args, **kwargs) -> int:
    """`main(*args, **kwargs)`; an expected error prints `error: <one line>` on stderr and returns 2."""
    try:
        return main(*args, **kwargs) or 0
    except EXPECTED_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE


def entry_point(main: Callable[..., int | None]) -> Callable[..., int]:
    """`record` + the one-line conversion of expected errors (see the module docstring)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        return run_one_line(main, *args, **kwargs)

    return record(wrapped)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose bad-argument errors raise UsageError, so that `entry_point` reports them as the
    one `error: ...` line and exit 2 of every other bad input (argparse prints usage lines first)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")
