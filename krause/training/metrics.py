"""Metrics as JSON lines, a tolerant reader, rank-0 progress bars and text logging.

Each `MetricsLogger.log` call writes one JSON object on its own line, with at
least "step", "time" (Unix seconds) and, when given, "epoch", then flushes, so a
crash loses nothing that was logged. Only rank 0 writes. Values may be Python
numbers, numpy scalars, 0-d tensors, or lists / 1-d tensors (e.g. sigma per layer).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_file
from .distributed import is_main_process

__all__ = ["MetricsLogger", "read_metrics", "series", "progress_bar", "setup_logging", "close_logging"]


def _plain(value: Any, key: str) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; log numbers, tensors, lists or dicts")


class MetricsLogger:
    """Append-only JSON-lines metrics file, written by rank 0 only.

    resume_step: when resuming from a checkpoint taken at this step, records with a
        larger step (written after that checkpoint by the interrupted launch) are
        dropped first, so the file never holds two histories for one step range.
    fsync: also fsync every line (survives a machine crash, costs a disk sync per line).
    live: also send numeric metrics to a live sink: "tensorboard" (needs the tensorboard
        package; events under <metrics dir>/tensorboard) or None (default). The JSONL
        file stays the record; the sink is for watching a run.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        enabled: bool | None = None,
        resume_step: int | None = None,
        fsync: bool = False,
        live: str | None = None,
    ):
        self.path = Path(path)
        self.enabled = is_main_process() if enabled is None else bool(enabled)
        self.fsync = fsync
        self._file = None
        self._live = None
        if live not in (None, "none", "tensorboard"):
            raise ValueError(f"live sink must be None or 'tensorboard', got {live!r}")
        if not self.enabled:
            return
        if live == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("live sink 'tensorboard' needs the tensorboard package (pip install tensorboard)") from None
            self._live = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"), purge_step=resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists() and self.path.stat().st_size > 0:
            # a fresh run in a reused directory (overwrite): start a new file
            self.path.replace(self.path.with_name(self.path.name + ".old"))
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if not (isinstance(r.get("step"), (int, float)) and r["step"] > step)]
        with atomic_file(self.path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def log(self, metrics: Mapping[str, Any] | None = None, *, step: int, epoch: float | None = None, **kwargs: Any) -> dict | None:
        """Write one record; returns it (None on ranks that do not write)."""
        if not self.enabled:
            return None
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = _plain(epoch, "epoch")
        record["time"] = time.time()
        for source in (metrics or {}), kwargs:
            for k, v in source.items():
                if k in ("step", "epoch", "time"):
                    raise ValueError(f"metric name {k!r} is reserved")
                record[k] = _plain(v, k)
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        if self._live is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._live.add_scalar(k, v, record["step"])
        return record

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file. A truncated last line (a crash mid-write) is skipped
    with a warning; a malformed line elsewhere raises ValueError naming its line number."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # a file written by log() ends with "\n", so the last element is "" unless truncated
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring an incomplete last line (interrupted write)", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def series(
    records: Iterable[Mapping[str, Any]],
    key: str,
    x: str = "step",
    where: Callable[[Mapping[str, Any]], bool] | None = None,
) -> tuple[list[Any], list[Any]]:
    """(xs, ys) of every record that has both `x` and `key` (and passes `where`)."""
    xs, ys = [], []
    for r in records:
        if key in r and x in r and (where is None or where(r)):
            xs.append(r[x])
            ys.append(r[key])
    return xs, ys


NON_TTY_INTERVAL_S = 10.0  # a log file gets one progress line per this many seconds


class _LinesNotCarriageReturns:
    """A stream for tqdm that turns its in-place redraws into whole lines (for log files, Slurm output)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **kwargs: Any) -> Iterator | tqdm:
    """tqdm on rank 0 (and only when `enabled`), a silent pass-through bar elsewhere.

    On a terminal it redraws in place; otherwise (a pipe, a log file) it writes a line with the
    rate and ETA at most every ``NON_TTY_INTERVAL_S`` seconds, so long work is never silent.
    """
    stream = kwargs.pop("file", None) or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    kwargs.setdefault("dynamic_ncols", interactive)
    kwargs.setdefault("mininterval", 1.0 if interactive else NON_TTY_INTERVAL_S)
    kwargs.setdefault("maxinterval", max(NON_TTY_INTERVAL_S, kwargs["mininterval"]))
    if not interactive:
        kwargs.setdefault("ncols", 100)
        stream = _LinesNotCarriageReturns(stream)
    return tqdm(iterable, disable=not (enabled and is_main_process()), file=stream, **kwargs)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (test runners swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout


def close_logging(name: str = "krause") -> None:
    """Remove and close the handlers `setup_logging` added to logger `name`."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        if getattr(h, "_krause_training", False):
            logger.removeHandler(h)
            h.close()


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO, name: str = "krause") -> logging.Logger:
    """Logger `name`: INFO to stdout (and `log_file`) on rank 0, WARNING and up on other ranks."""
    close_logging(name)
    logger = logging.getLogger(name)
    main = is_main_process()
    rank_tag = "" if main else f"[rank {os.environ.get('RANK', '?')}] "
    fmt = logging.Formatter(f"%(asctime)s {rank_tag}%(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_StdoutHandler()]
    if log_file is not None and main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._krause_training = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(level if main else max(level, logging.WARNING))
    logger.propagate = False
    return logger
