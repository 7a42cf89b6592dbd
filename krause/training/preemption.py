"""Graceful stop on SIGTERM / SIGUSR1 / SIGINT: set a flag, let the loop save and exit.

Usage in a train loop::

    with PreemptionHandler() as preempt:
        for step in ...:
            ...optimizer step...
            if preempt.should_stop():          # collective when distributed
                ckpt.save(model=..., step=step, ...)
                break
    # return normally, exit code 0

The handler only records the signal; it never raises inside the step, so a
checkpoint is always written between two complete optimizer steps.
`should_stop()` takes the maximum of the flag over all ranks, so every rank stops
at the same step even when only one of them was signalled (all ranks must call
it at the same points; `every=n` checks only at every n-th call to save the
collective). A second SIGTERM / SIGUSR1 is ignored: the save in progress finishes.

Ctrl-C (SIGINT, on by default) is a graceful stop too: the first one prints one line
and the loop saves at the next step boundary; a second one aborts at once (the
previous SIGINT handler, normally KeyboardInterrupt). DataLoader workers get the
terminal's SIGINT as well: give loaders `worker_init_fn=ignore_sigint` so they stay
quiet and let the main process stop them.

Slurm and torchrun:
- Slurm sends SIGTERM at preemption or time limit, then SIGKILL after KillWait
  (often 30 s). Ask for an earlier warning with `#SBATCH --signal=USR1@120`
  (to the job steps) or `--signal=B:USR1@120` (to the batch shell, which must then
  forward it; the templates' helper scripts/launch/job.sh does).
- torchrun forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT to its workers by default; add
  SIGUSR1 with `torchrun --signals-to-handle SIGTERM,SIGINT,SIGUSR1`, and give
  the workers time to save with `--shutdown-timeout` (default 30 s, then SIGKILL;
  the templates use 180, scripts/launch/torchrun.sh).
- Requeueing is the job script's business: after the workers saved and exited,
  `scontrol requeue $SLURM_JOB_ID` (scripts/launch/job.sh) starts the same script
  again, which resumes from the latest checkpoint. The Python side just exits cleanly.
  docs/launch.md has the whole path, tested on a real Slurm (tests/test_slurm.py).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Iterable

from .distributed import all_reduce_max, is_distributed, is_main_process

__all__ = ["PreemptionHandler", "DEFAULT_SIGNALS", "ignore_sigint"]


def ignore_sigint(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: workers ignore Ctrl-C (the main process stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)


class PreemptionHandler:
    """Flag set by the given signals (default SIGTERM and SIGUSR1); previous handlers restored on exit."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, every: int = 1, sigint: bool = True):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.signals = tuple(signal.Signals(s) for s in signals)
        if sigint and signal.SIGINT not in self.signals:
            self.signals += (signal.SIGINT,)
        self.every = every
        self.received: signal.Signals | None = None
        self._stop_agreed = False
        self._calls = 0
        self._previous: dict[signal.Signals, Any] = {}

    # -- installation
    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be installed from the main thread (a Python signal rule)")
        if self._previous:
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            # second Ctrl-C: abort now, the way the interrupted program would have
            previous = self._previous.get(signal.SIGINT)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)
            if signum == signal.SIGINT and is_main_process():
                print("\ninterrupt: saving at the next step boundary, then stopping (Ctrl-C again aborts)",
                      file=sys.stderr, flush=True)

    # -- queries
    @property
    def requested(self) -> bool:
        """True once this process received one of the signals (local, no communication)."""
        return self.received is not None

    @property
    def reason(self) -> str:
        """For log lines: the signal this rank received, or that another rank asked to stop."""
        if self.received is not None:
            return self.received.name
        return "stop requested by another rank" if self._stop_agreed else "none"

    def trigger(self, sig: int = signal.SIGTERM) -> None:
        """Set the flag by hand (tests, or a wall-clock budget)."""
        if self.received is None:
            self.received = signal.Signals(sig)

    def should_stop(self) -> bool:
        """Whether any rank has been signalled. Collective when distributed: call it on every
        rank at the same points. With every=n the ranks only communicate on every n-th call."""
        if self._stop_agreed:
            return True
        self._calls += 1
        if not is_distributed():
            self._stop_agreed = self.requested
        elif self._calls % self.every == 0:
            self._stop_agreed = bool(all_reduce_max(1.0 if self.requested else 0.0) > 0)
        return self._stop_agreed
