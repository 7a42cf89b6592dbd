"""One writer per run directory: a lock file naming its holder (host, pid, start time).

A second trainer on the same run directory refuses with one line naming the holder.
A lock left by a process that no longer exists on this host (killed with -9, a crashed
node that came back) is stale and taken over; a lock held from another host cannot be
checked from here and is reported with the advice to delete it if that job is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLock", "RunLockError", "process_start_time"]


class RunLockError(RuntimeError):
    """Another live process holds the run directory."""


def process_start_time(pid: int) -> float | None:
    """Start time (Unix seconds) of a process on this host, or None when it does not exist."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except ImportError:  # pragma: no cover - psutil ships with the stack
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0.0
        return 0.0
    except Exception:  # NoSuchProcess, AccessDenied on zombies
        return None


def _alive(holder: dict) -> bool:
    started = process_start_time(int(holder.get("pid", -1)))
    if started is None:
        return False
    want = holder.get("start_time")
    # a recycled pid belongs to a process started after the lock was written
    return not (want and started and abs(started - float(want)) > 2.0)


class RunLock:
    """Exclusive lock file `path` (created atomically); `release()` removes it if it is still ours."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.held = False
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "start_time": process_start_time(os.getpid()) or time.time(), "locked_at": time.time()}

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _busy_message(self, holder: dict | None) -> str | None:
        """Why `holder` (another process) keeps the directory, or None when its lock is stale."""
        if holder is not None and holder.get("host") != self.info["host"]:
            return (f"run directory {self.path.parent} is in use by pid {holder.get('pid')} on host "
                    f"{holder.get('host')} (since {time.ctime(holder.get('locked_at', 0))}); if that job is gone, "
                    f"delete {self.path}")
        if holder is not None and _alive(holder):
            return (f"run directory {self.path.parent} is in use by another trainer (pid {holder.get('pid')}, "
                    f"started {time.ctime(holder.get('start_time') or 0)}); stop it first or use another out_dir")
        return None

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:  # being written right now, or garbage: look again
                    time.sleep(0.05)
                    holder = self.holder()
                if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == self.info["host"]:
                    self.held = True  # re-entrant within one process
                    return self
                busy = self._busy_message(holder)
                if busy:
                    raise RunLockError(busy)
                try:  # stale: its process is gone
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            atexit.register(self.release)
            return self
        raise RunLockError(f"could not take the lock {self.path} (another process keeps recreating it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self.holder()
        if holder is not None and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
