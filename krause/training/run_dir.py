"""One directory per run: the resolved config, metrics, checkpoints, figures, logs.

Layout (every path is derived from the run directory; nothing depends on the
current working directory once `out_dir` has been resolved):

    <out_dir>/config.json          the resolved config of the current launch
    <out_dir>/config.<n>.json      earlier configs, kept when a resumed launch changed one
    <out_dir>/launches.jsonl       one line per launch: time, host, world size, git commit, versions
    <out_dir>/metrics.jsonl        metrics, one JSON object per line (see metrics.py)
    <out_dir>/train.log            text log of rank 0
    <out_dir>/checkpoints/last.pt  latest checkpoint (resume point)
    <out_dir>/checkpoints/best.pt  best checkpoint by the family's selection metric
    <out_dir>/figures/*.png        figures (see plotting.py)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .config import RUNTIME_KEYS, config_diff, config_to_dict, format_config_diff
from .distributed import barrier, broadcast_object, get_world_size, is_main_process

__all__ = ["RunDir", "RunDirError", "prepare_run_dir", "atomic_write_text"]


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (another run's config, an unrelated folder...)."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class RunDir:
    """Paths of one run directory. `out_dir` is made absolute once, here."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    LAUNCHES = "launches.jsonl"
    LOG = "train.log"
    CHECKPOINTS = "checkpoints"
    FIGURES = "figures"

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir).expanduser().resolve()

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def path(self, *parts: str | os.PathLike) -> Path:
        """A path inside the run directory; absolute paths and '..' escapes are refused."""
        rel = Path(*parts)
        if rel.is_absolute():
            raise ValueError(f"run-directory paths must be relative, got {rel}")
        full = (self.root / rel).resolve()
        if full != self.root and self.root not in full.parents:
            raise ValueError(f"{rel} points outside the run directory {self.root}")
        return full

    @property
    def config_path(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.root / self.METRICS

    @property
    def log_path(self) -> Path:
        return self.root / self.LOG

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def figures_dir(self) -> Path:
        return self.root / self.FIGURES

    @property
    def last_checkpoint(self) -> Path | None:
        """checkpoints/last.pt if it exists."""
        p = self.checkpoint_dir / "last.pt"
        return p if p.is_file() else None

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        with open(self.config_path, encoding="utf-8") as f:
            return json.load(f)

    def make_dirs(self) -> None:
        for d in (self.root, self.checkpoint_dir, self.figures_dir):
            d.mkdir(parents=True, exist_ok=True)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _prepare_on_main(
    run: RunDir, cfg: dict[str, Any], resume: bool, overwrite: bool, ignore: Iterable[str]
) -> tuple[str, str]:
    """Checks and writes on rank 0. Returns ("ok"|"error", message)."""
    if run.root.exists() and not run.root.is_dir():
        return "error", f"out_dir {run.root} exists and is not a directory"
    old = run.read_config() if run.root.is_dir() else None
    if old is None and run.root.is_dir() and any(run.root.iterdir()) and not overwrite:
        return "error", (
            f"out_dir {run.root} is not empty and has no {RunDir.CONFIG}: it does not look like a run "
            "directory. Choose a new or empty out_dir (or pass overwrite to use it anyway)."
        )
    if old is not None:
        diff = config_diff(old, cfg, ignore)
        if diff and not (resume or overwrite):
            return "error", (
                f"out_dir {run.root} belongs to a run with a different config:\n{format_config_diff(diff)}\n"
                "Use a new out_dir, resume to continue this run with the new config, or overwrite to start over."
            )
        if not diff and not (resume or overwrite) and run.last_checkpoint is not None:
            return "error", (
                f"out_dir {run.root} already holds a checkpoint ({run.last_checkpoint}); pass resume to "
                "continue it or overwrite to start over"
            )
        if diff:
            # Keep the earlier config next to the new one rather than losing it.
            n = 1
            while (run.root / f"config.{n}.json").exists():
                n += 1
            os.replace(run.config_path, run.root / f"config.{n}.json")
    run.make_dirs()
    atomic_write_text(run.config_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    launch = {
        "time": time.time(),
        "host": socket.gethostname(),
        "world_size": get_world_size(),
        "resume": bool(resume),
        "overwrite": bool(overwrite),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    with open(run.root / RunDir.LAUNCHES, "a", encoding="utf-8") as f:
        f.write(json.dumps(launch, sort_keys=True) + "\n")
    return "ok", ""


def prepare_run_dir(
    out_dir: str | os.PathLike,
    config: Any,
    resume: bool = False,
    overwrite: bool = False,
    ignore: Iterable[str] = RUNTIME_KEYS,
) -> RunDir:
    """Create (or reopen) the run directory and write the resolved config. Call on every rank.

    resume: continue the run in `out_dir` (from checkpoints/last.pt when it exists; a
        first launch with resume=True simply starts). A changed config is accepted, the
        earlier one kept as config.<n>.json; the checkpoint's config fingerprint still
        decides whether its weights may be loaded (see checkpoint.load_checkpoint).
    overwrite: reuse `out_dir` for a new run even though it holds another one. Nothing
        is deleted; checkpoints and metrics are replaced as the new run writes them.
    Without either flag an existing run directory is refused when its config differs
    or when it already holds a checkpoint, so a run is never silently clobbered.
    """
    run = RunDir(out_dir)
    cfg = config_to_dict(config)
    status, message = ("ok", "")
    if is_main_process():
        try:
            status, message = _prepare_on_main(run, cfg, resume, overwrite, ignore)
        except OSError as e:
            status, message = "error", f"cannot prepare out_dir {run.root}: {e}"
    status, message = broadcast_object((status, message))
    if status != "ok":
        raise RunDirError(message)
    barrier()
    return run
