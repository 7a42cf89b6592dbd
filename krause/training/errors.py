"""One `UsageError` for every entry point, the checkpoint errors, and the one-line reporting of bad input."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

__all__ = ["UsageError", "CheckpointError", "CorruptCheckpointError", "CheckpointMismatchError",
           "one_line", "report_usage_errors", "USAGE_EXIT_CODE"]

USAGE_EXIT_CODE = 2


class UsageError(ValueError):
    """Bad input (an argument, a path, a run directory): reported as one line, exit code 2."""


class CheckpointError(RuntimeError):
    """Base class of checkpoint problems."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is missing, incomplete, truncated, not a checkpoint, or its checksums do not match."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another config or model."""


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (its lines joined with ' | ')."""
    text = " | ".join(s.strip() for s in str(e).splitlines() if s.strip())
    return text or type(e).__name__


def report_usage_errors(main: Callable[..., int], argv: Sequence[str] | None = None, *, prog: str = "error",
                        errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """Run `main(argv)`; an error of the given kinds prints `<prog>: <one line>` on stderr and returns 2.

    `errors` defaults to ValueError (UsageError, RunDirError's checks, bad values) and OSError
    (paths); checkpoint errors are RuntimeErrors and should be listed by the caller."""
    try:
        return main(argv) or 0
    except errors as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return USAGE_EXIT_CODE
