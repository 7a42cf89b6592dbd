"""One directory per run: the resolved config, metrics, checkpoints, figures, logs.

Layout (every path is derived from the run directory; nothing depends on the
current working directory once `out_dir` has been resolved):

    <out_dir>/config.json          the resolved config of the current launch
    <out_dir>/config.<n>.json      earlier configs, kept when a resumed launch changed one
    <out_dir>/launches.jsonl       one line per launch: time, host, world size, git commit, versions
    <out_dir>/metrics.jsonl        metrics, one JSON object per line (see metrics.py)
    <out_dir>/train.log            text log of rank 0
    <out_dir>/checkpoints/         step-NNNNNN/ DCP checkpoints, latest, best/ (checkpointer.py)
    <out_dir>/.lock                the trainer holding the directory (lock.py)
    <out_dir>/figures/*.png        figures (see plotting.py)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .atomic import FILE_MODE, atomic_file  # noqa: F401  (FILE_MODE re-exported)
from .errors import CheckpointError
from .config import RUNTIME_KEYS, config_diff, config_to_dict, format_config_diff
from .distributed import barrier, broadcast_object, get_world_size, is_main_process
from .lock import RunLock, RunLockError
from .paths import escaping_symlinks

__all__ = ["RunDir", "RunDirError", "prepare_run_dir", "atomic_write_text", "FILE_MODE"]



class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (another run's config, an unrelated folder...)."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, fsync, then rename."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


class RunDir:
    """Paths of one run directory. `out_dir` is made absolute once, here."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    LAUNCHES = "launches.jsonl"
    LOG = "train.log"
    CHECKPOINTS = "checkpoints"
    FIGURES = "figures"

    LOCK = ".lock"

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir).expanduser().resolve()
        self.lock: RunLock | None = None
        # what this launch created, so that a failed start can be undone (undo_start)
        self._created_root = False
        self._config_before: str | None = None  # "absent", or the name the earlier config was moved to

    def undo_start(self) -> None:
        """Undo what prepare_run_dir wrote for a launch that failed before training began (rank 0;
        a no-op elsewhere): a directory it created is removed; otherwise the earlier config.json is
        restored (or the new one removed), so the corrected retry is not refused as another run."""
        if not is_main_process():
            return
        import shutil

        if self._created_root:
            self.release()
            shutil.rmtree(self.root, ignore_errors=True)
            return
        if self._config_before == "absent":
            self.config_path.unlink(missing_ok=True)
        elif self._config_before is not None:
            os.replace(self.root / self._config_before, self.config_path)
        self._config_before = None
        self.release()

    def release(self) -> None:
        """Release the run-directory lock (also done at interpreter exit)."""
        if self.lock is not None:
            self.lock.release()

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
        """The resume point: the latest complete DCP step directory, or None."""
        from .checkpointer import Checkpointer

        ck = Checkpointer(self.checkpoint_dir)
        step = ck.latest_step()
        return None if step is None else ck.step_dir(step)

    def started(self) -> str | None:
        """Why this directory looks like a run that trained (a checkpoint trace or logged steps), or None."""
        from .checkpointer import Checkpointer

        ck = Checkpointer(self.checkpoint_dir)
        if ck.best_dir.is_dir():
            return "a best checkpoint"
        if [p for p in ck.incomplete_dirs() if not p.name.startswith(".tmp-")]:
            return "an incomplete checkpoint"
        if self.metrics_path.is_file():
            from .metrics import read_metrics

            try:
                if any(isinstance(r.get("step"), (int, float)) and r["step"] > 0 for r in read_metrics(self.metrics_path)):
                    return "metrics of trained steps"
            except ValueError:
                return "a metrics file"
        return None

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


def _check_resume(run: RunDir, cfg: dict[str, Any], ignore: Iterable[str], resume_step: int | None = None) -> str | None:
    """Read-only checks of a resume target; the error message, or None when it may proceed."""
    from .checkpointer import Checkpointer

    ck = Checkpointer(run.checkpoint_dir, config_ignore=ignore)
    step = ck.latest_step() if resume_step is None else int(resume_step)
    if resume_step is not None and step not in ck.steps():
        have = ", ".join(str(s) for s in ck.steps()) or "none"
        return f"--resume_step {step}: {run.checkpoint_dir} has no complete step {step} (complete steps: {have})"
    if step is not None:
        try:
            ck.verify(step, collective=False)  # a damaged step is named (with the older one) before any write
            ck.check_config(cfg, step)
        except CheckpointError as e:
            return str(e).replace("(a new out_dir, or overwrite)", "(a new out_dir, or overwrite to start over in this one)")
        return None
    why = run.started()
    if why is not None:
        return (f"out_dir {run.root} holds {why} but no complete checkpoint to resume from; "
                "pass overwrite to start the run over there (or choose a new out_dir)")
    return None


def _prepare_on_main(
    run: RunDir, cfg: dict[str, Any], resume: bool, overwrite: bool, ignore: Iterable[str], lock: bool = True,
    resume_step: int | None = None,
) -> tuple[str, str]:
    """Checks (read-only), then the lock, then writes, on rank 0. Returns ("ok"|"error", message)."""
    if run.root.exists() and not run.root.is_dir():
        return "error", f"out_dir {run.root} exists and is not a directory"
    escaping = escaping_symlinks(run.root) if run.root.is_dir() else []
    if escaping:  # a run writes only inside its directory: following such a link would write elsewhere
        link = escaping[0]
        return "error", (f"out_dir {run.root} holds a symlink that points outside it ({link.relative_to(run.root.resolve())} "
                         f"-> {link.resolve()}); remove it (a run writes only inside its own directory)")
    if lock and run.root.is_dir():  # a live second writer is named first, whatever else is wrong
        run.lock = RunLock(run.root / RunDir.LOCK)
        try:
            run.lock.acquire()
        except RunLockError as e:
            run.lock = None
            return "error", str(e)
    status, message = _check_on_main(run, cfg, resume, overwrite, ignore, resume_step)
    if status != "ok":
        if run.lock is not None:
            run.lock.release()
            run.lock = None
        return status, message
    return _write_on_main(run, cfg, resume, overwrite, ignore, lock)


def _check_on_main(run: RunDir, cfg: dict[str, Any], resume: bool, overwrite: bool, ignore: Iterable[str],
                   resume_step: int | None) -> tuple[str, str]:
    old = run.read_config() if run.root.is_dir() else None
    if old is None and run.root.is_dir() and any(p.name != RunDir.LOCK for p in run.root.iterdir()) and not overwrite:
        return "error", (
            f"out_dir {run.root} is not empty and has no {RunDir.CONFIG}: it does not look like a run "
            "directory. Choose a new or empty out_dir (or pass overwrite to use it anyway)."
        )
    diff = config_diff(old, cfg, ignore) if old is not None else []
    if old is not None and not overwrite:
        if resume:
            problem = _check_resume(run, cfg, ignore, resume_step)
            if problem:
                return "error", problem
        elif diff:
            return "error", (
                f"out_dir {run.root} belongs to a run with a different config:\n{format_config_diff(diff)}\n"
                "Use a new out_dir, or overwrite to start a new run there (resume only continues the same config)."
            )
        elif run.last_checkpoint is not None:
            return "error", (
                f"out_dir {run.root} already holds a checkpoint ({run.last_checkpoint}); pass resume to "
                "continue it or overwrite to start over"
            )
    return "ok", ""


def _write_on_main(run: RunDir, cfg: dict[str, Any], resume: bool, overwrite: bool, ignore: Iterable[str],
                   lock: bool) -> tuple[str, str]:
    old = run.read_config() if run.root.is_dir() else None
    diff = config_diff(old, cfg, ignore) if old is not None else []
    run._created_root = not run.root.exists()
    if lock and run.lock is None:
        run.lock = RunLock(run.root / RunDir.LOCK)
        try:
            run.lock.acquire()
        except RunLockError as e:
            return "error", str(e)
    if old is not None and diff:
        # Keep the earlier config next to the new one rather than losing it.
        n = 1
        while (run.root / f"config.{n}.json").exists():
            n += 1
        os.replace(run.config_path, run.root / f"config.{n}.json")
        run._config_before = f"config.{n}.json"
    elif old is None:
        run._config_before = "absent"
    if overwrite and run.checkpoint_dir.is_dir() and any(run.checkpoint_dir.iterdir()):
        # the new run must never resume from or prune the old run's steps: set them aside
        aside = run.root / "checkpoints.replaced"
        if aside.exists():
            import shutil

            shutil.rmtree(aside)
        os.replace(run.checkpoint_dir, aside)
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
    lock: bool = True,
    resume_step: int | None = None,
) -> RunDir:
    """Create (or reopen) the run directory and write the resolved config. Call on every rank.

    resume: continue the run in `out_dir`. Before anything is touched the latest
        checkpoint is checked against `config` (fingerprint; the readable diff on a
        mismatch) and its marker read (a damaged step is named, with the older one); a
        directory that trained (best checkpoint, logged steps) but has no complete
        checkpoint is refused instead of silently started over. A first launch with
        resume=True simply starts (launch templates always pass it).
    overwrite: reuse `out_dir` for a new run even though it holds another one. The old
        checkpoints are moved to checkpoints.replaced/; metrics are replaced.
    lock: take the run-directory lock (lock.py) on rank 0, so a second trainer refuses.
    resume_step: with resume, the step to continue from instead of the latest (the one a
        damaged latest checkpoint's message names); it is checked instead of the latest.
    Without either flag an existing run directory is refused when its config differs
    or when it already holds a checkpoint, so a run is never silently clobbered.
    """
    run = RunDir(out_dir)
    cfg = config_to_dict(config)
    status, message = ("ok", "")
    if is_main_process():
        try:
            status, message = _prepare_on_main(run, cfg, resume, overwrite, ignore, lock, resume_step)
        except OSError as e:
            status, message = "error", f"cannot prepare out_dir {run.root}: {e}"
    status, message = broadcast_object((status, message))
    if status != "ok":
        raise RunDirError(message)
    barrier()
    return run
