"""Sharded, resharding-safe checkpoints on torch.distributed.checkpoint (DCP).

    app = AppState(model=model, optimizer=opt, scheduler=sched, scaler=scaler, train_state=state)
    ckpt = Checkpointer(run.checkpoint_dir, config=cfg, keep_latest_k=3, mode="min")
    ckpt.load(app)                       # latest complete step (verified), or None for a fresh run
    ...
    ckpt.save(state.step, app, metric=test_bpd)   # collective; async=True returns after the CPU copy
    ckpt.close()                         # waits for an async save in flight

Layout of `directory`:

    step-000500/           one DCP checkpoint: __<rank>_<i>.distcp files, .metadata, checkpoint.json
    latest                 text file naming the newest complete step directory
    best/                  copy (hard links) of the step with the best metric
    .tmp-step-000600/      a save in progress; never read

Every rank writes only its own shards (`get_state_dict` gives DTensor shards under
FSDP2 and plain tensors under DDP / one process), so there is no rank-0 full-state
copy, and a checkpoint written by N ranks loads on M ranks (DCP reshards). A step is
written to `.tmp-step-*`, then `checkpoint.json` (the completion marker: step, config
and its fingerprint, metric, size and CRC-32 of every file) is written and the
directory renamed to `step-*`; `latest` moves only after that, so a crash mid-save
leaves the previous step as the resume point. `load` checks the marker, the config
fingerprint, the DCP metadata and every file's size and CRC (each rank checks a share
of the files) and names the step and the older complete one on corruption.
`export` writes one consolidated `torch.save` file (and safetensors of the weights).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .atomic import atomic_file, fsync_dir
from .config import RUNTIME_KEYS, config_diff, config_fingerprint, config_to_dict, format_config_diff
from .errors import CheckpointError, CheckpointMismatchError, CorruptCheckpointError
from .distributed import all_gather_object, barrier, broadcast_object, get_rank, get_world_size, is_distributed
from .seed import capture_rng_state, restore_rng_state

__all__ = ["AppState", "Checkpointer", "SaveInfo", "export_checkpoint", "find_checkpoint", "checkpoint_meta",
           "load_model_weights", "verify_checkpoint", "read_exported", "seal_directory", "verify_sealed",
           "MARKER", "FORMAT", "EXPORT_FORMAT", "SEAL"]

FORMAT = "krause.training.dcp/1"
EXPORT_FORMAT = "krause.training.export/1"
SEAL = "krause_integrity.json"  # sizes and CRC-32s of an exported folder (hf/, adapter/)
MARKER = "checkpoint.json"
LATEST = "latest"
BEST = "best"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{int(step):06d}"


# ----------------------------------------------------------------------------- app state


class AppState:
    """Everything a run needs to continue, as one DCP `Stateful`.

    model / optimizer go through `get_state_dict` / `set_state_dict` (wrapper prefixes
    of DDP, torch.compile and FSDP removed; FSDP2 parameters stay sharded DTensors).
    scheduler, scaler, train_state, data: anything with state_dict / load_state_dict
    (None to leave out). The LR schedule's shape stays the caller's: only counters are
    restored. RNG states of every rank are stored (python, numpy, torch, CUDA) and
    restored when the world size is unchanged (else a warning: the run stays correct
    but not bit-reproducible). trainable_only: keep only parameters with requires_grad
    (LoRA on a frozen base).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 scaler: Any = None, train_state: Any = None, data: Any = None, *, trainable_only: bool = False,
                 restore_rng: bool = True):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.train_state, self.data = train_state, data
        self.trainable_only = trainable_only
        self.restore_rng = restore_rng

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        sd: dict[str, Any] = {}
        if self.optimizer is not None:
            sd["model"], sd["optimizer"] = get_state_dict(self.model, self.optimizer, options=self._options())
        else:
            sd["model"] = get_model_state_dict(self.model, options=self._options())
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None and getattr(self.scaler, "is_enabled", lambda: True)():
            sd["scaler"] = self.scaler.state_dict()
        if self.train_state is not None:
            sd["train_state"] = self.train_state.state_dict()
        if self.data is not None:
            sd["data"] = self.data.state_dict()
        # one opaque blob (same on every rank): per-rank values under one key would be deduplicated
        sd["rng"] = pickle.dumps(all_gather_object(capture_rng_state()))
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is not None:
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optimizer"], options=self._options())
        else:
            set_model_state_dict(self.model, sd["model"], options=self._options())
        if self.scheduler is not None:
            state = dict(sd["scheduler"])
            if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR) and "lr_lambdas" in state:
                state["lr_lambdas"] = [None] * len(state["lr_lambdas"])  # keep the caller's schedule shape
            self.scheduler.load_state_dict(state)
        if "scaler" in sd and self.scaler is not None:
            self.scaler.load_state_dict(sd["scaler"])
        if self.train_state is not None:
            self.train_state.load_state_dict(sd["train_state"])
        if self.data is not None:
            self.data.load_state_dict(sd["data"])
        if self.restore_rng:
            states = pickle.loads(sd["rng"])
            if len(states) == get_world_size():
                restore_rng_state(states[get_rank()])
            else:
                warnings.warn(f"the checkpoint was written by {len(states)} rank(s) and this job has "
                              f"{get_world_size()}: RNG states are not restored (correct, not bit-reproducible)",
                              stacklevel=2)


# ----------------------------------------------------------------------------- files


def _crc32_file(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)



def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def _own_files(directory: Path, rank: int) -> list[Path]:
    """The files this rank wrote into a DCP directory (rank 0 also owns .metadata)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.startswith(f"__{rank}_"))
    if rank == 0 and (directory / ".metadata").is_file():
        files.append(directory / ".metadata")
    return files


def _file_table(files: Iterable[Path]) -> dict[str, dict[str, int]]:
    return {p.name: {"size": p.stat().st_size, "crc32": _crc32_file(p)} for p in files}


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


_DCP_ERRORS = _dcp_errors()


def _load_error_text(e: BaseException, limit: int) -> str:
    """One line: the first rank's underlying error of a DCP CheckpointException, else `e` itself."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]  # (exception, stack summary)
        e = first[0] if isinstance(first, tuple) else first
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:limit]


def _collective_status(status: tuple[str, str]) -> tuple[str, str]:
    """The first error of any rank, on every rank (a rank that failed must not leave the others hanging)."""
    statuses = all_gather_object(status)
    return next((s for s in statuses if s[0] != "ok"), ("ok", ""))


def verify_step_dir(path: str | os.PathLike, *, crc: bool = True, share: bool = False) -> dict[str, Any]:
    """Check one step directory (or `best/`) against its marker: every listed file present with
    its size and (crc=True) CRC-32, and readable DCP metadata; return the marker.
    CorruptCheckpointError (one line, naming the directory and the file) otherwise.
    share: each rank checksums only its share of the files (the caller gathers the verdicts)."""
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.is_dir():
        raise CorruptCheckpointError(f"{where} does not exist")
    try:
        meta = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where} is incomplete (no {MARKER}: the save did not finish)") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{where} has an unreadable {MARKER} ({e})") from None
    check_format(meta, FORMAT, where)
    files = meta.get("files") or {}
    if ".metadata" not in files:
        raise CorruptCheckpointError(f"{where} lists no .metadata file")
    for i, (name, want) in enumerate(sorted(files.items())):
        p = path / name
        if not p.is_file():
            raise CorruptCheckpointError(f"{where} is missing {name}")
        if p.stat().st_size != want["size"]:
            raise CorruptCheckpointError(f"{where}: {name} has {p.stat().st_size} bytes, "
                                         f"{want['size']} were written (truncated or replaced)")
        mine = not share or i % get_world_size() == get_rank()
        if crc and mine and _crc32_file(p) != want["crc32"]:
            raise CorruptCheckpointError(f"{where}: {name} is corrupted (CRC-32 mismatch)")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: unreadable DCP metadata ({type(e).__name__}: {str(e)[:200]})") from None
    return meta


def _tree_crc32(obj: Any, crc: int = 0) -> int:
    """CRC-32 over a nested structure: tensor dtype, shape and bytes; repr of other leaves (keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = zlib.crc32(f"T{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
        return crc
    if isinstance(obj, dict):
        crc = zlib.crc32(b"{", crc)
        for k in sorted(obj, key=repr):
            crc = _tree_crc32(obj[k], zlib.crc32(repr(k).encode(), crc))
        return zlib.crc32(b"}", crc)
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(b"[", crc)
        for v in obj:
            crc = _tree_crc32(v, crc)
        return zlib.crc32(b"]", crc)
    return zlib.crc32(repr(obj).encode(), crc)


# ----------------------------------------------------------------------------- checkpointer


class SaveInfo:
    """What `Checkpointer.save` reports: where, and how long the caller was blocked."""

    def __init__(self, step: int, path: Path, blocking_s: float, is_best: bool, asynchronous: bool):
        self.step, self.path, self.blocking_s, self.is_best, self.asynchronous = step, path, blocking_s, is_best, asynchronous

    def __repr__(self) -> str:
        return (f"SaveInfo(step={self.step}, path={str(self.path)!r}, blocking_s={self.blocking_s:.3f}, "
                f"is_best={self.is_best}, asynchronous={self.asynchronous})")


class Checkpointer:
    """Step directories of DCP checkpoints in `directory`, with `latest`, `best` and pruning.

    config: the run's resolved config; its fingerprint (without `config_ignore` keys) is
        stored in every step's marker and must match on load (CheckpointMismatchError with
        the readable diff otherwise).
    keep_latest_k: complete step directories kept (older ones are deleted after a save);
        `best/` is separate and always kept.
    mode: "min" or "max" for the selection metric given to `save(metric=...)`.
    async_save: `save` returns once the state is copied to CPU memory and writes in a
        background thread (`dcp.async_save`, on a separate gloo process group); the step
        is finalised (marker, rename, `latest`, pruning) at the next save, `wait()` or
        `close()`. The CPU copy (pinned on CUDA machines) is kept between saves: one
        more copy of this rank's state in host memory, no allocation per save.
    All methods that write or load are collective: call them on every rank.
    """

    def __init__(self, directory: str | os.PathLike, *, config: Any = None,
                 config_ignore: Iterable[str] = RUNTIME_KEYS, keep_latest_k: int = 2, mode: str = "min",
                 async_save: bool = False):
        if not isinstance(keep_latest_k, int) or keep_latest_k < 1:
            raise ValueError(f"keep_latest_k must be an integer >= 1, got {keep_latest_k!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = Path(directory).expanduser().resolve()
        self.config = config_to_dict(config) if config is not None else None
        self.config_ignore = tuple(config_ignore)
        self.keep_latest_k = keep_latest_k
        self.mode = mode
        self.async_save = bool(async_save)
        self.best_metric: float | None = None
        self._pending: dict[str, Any] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._async_group = None
        self._stager = None

    # ------------------------------------------------------------------ queries (no collectives)
    def step_dir(self, step: int) -> Path:
        return self.directory / step_dir_name(step)

    @property
    def best_dir(self) -> Path:
        return self.directory / BEST

    def steps(self) -> list[int]:
        """Steps with a completion marker, ascending (half-written saves never appear)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / MARKER).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def incomplete_dirs(self) -> list[Path]:
        """step-* directories without a marker (e.g. a marker deleted or lost) and .tmp-* leftovers."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and (
            p.name.startswith(".tmp-") or (_STEP_RE.match(p.name) and not (p / MARKER).is_file())))

    def latest_step(self) -> int | None:
        """The step `latest` names (else the newest complete step), or None when there is none."""
        pointer = self.directory / LATEST
        if pointer.is_file():
            m = _STEP_RE.match(pointer.read_text().strip())
            if m and (self.directory / m.group(0) / MARKER).is_file():
                return int(m.group(1))
        steps = self.steps()
        return steps[-1] if steps else None

    def has_checkpoint(self) -> bool:
        return self.latest_step() is not None

    def _older_than(self, step: int) -> str:
        older = [s for s in self.steps() if s < step]
        return (f"the previous complete checkpoint is {self.step_dir(older[-1])} (resume from it with "
                f"--resume_step {older[-1]}, or delete the damaged directory)" if older else "no older complete checkpoint exists")

    def read_marker(self, step: int | str | None = None) -> dict[str, Any]:
        """The marker (checkpoint.json) of a step, 'best' or the latest; CorruptCheckpointError if unsound."""
        path = self._resolve(step)
        marker = path / MARKER
        where = f"checkpoint {path}"
        if not marker.is_file():
            raise CorruptCheckpointError(f"{where} is incomplete (no {MARKER}: the save did not finish); "
                                         f"{self._older_than(self._step_of(path))}")
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{where} has an unreadable {MARKER} ({e}); "
                                         f"{self._older_than(self._step_of(path))}") from None
        check_format(meta, FORMAT, where)
        return meta

    def _step_of(self, path: Path) -> int:
        m = _STEP_RE.match(path.name)
        if m:
            return int(m.group(1))
        try:
            return int(json.loads((path / MARKER).read_text())["step"]) + 1
        except Exception:
            return 1 << 62

    def _resolve(self, step: int | str | None) -> Path:
        if step is None or step == "latest":
            latest = self.latest_step()
            if latest is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return self.step_dir(latest)
        if step == "best":
            return self.best_dir
        return self.step_dir(int(step))

    def check_config(self, config: Any, step: int | str | None = None) -> None:
        """CheckpointMismatchError (with the readable diff) when `config` differs from the step's."""
        meta = self.read_marker(step)
        cfg = config_to_dict(config)
        if meta.get("config_fingerprint") != config_fingerprint(cfg, self.config_ignore):
            diff = config_diff(meta.get("config") or {}, cfg, self.config_ignore)
            raise CheckpointMismatchError(
                f"checkpoint {self._resolve(step)} was written with another config:\n{format_config_diff(diff)}\n"
                "Resume with the original settings, or start a new run (a new out_dir, or overwrite)")

    def verify(self, step: int | str | None = None, *, crc: bool = True, collective: bool = True) -> dict[str, Any]:
        """Check a step's marker, DCP metadata, file sizes and (crc=True) CRC-32s; return the marker.

        Collective when distributed (each rank checksums a share of the files); collective=False
        checks every file in this process alone (prepare_run_dir on rank 0)."""
        share = is_distributed() and collective
        path = self._resolve(step)
        status, meta = ("ok", ""), {}
        try:
            self.read_marker(step)  # an incomplete step is named with the older one
            meta = verify_step_dir(path, crc=crc, share=share)
        except CheckpointError as e:
            msg = str(e)
            if "previous complete checkpoint" not in msg and "no older complete" not in msg:
                msg += f"; {self._older_than(self._step_of(path))}"
            status = ("error", msg)
        status = _collective_status(status) if share else status
        if status[0] != "ok":
            raise CorruptCheckpointError(status[1])
        return meta

    # ------------------------------------------------------------------ save
    def save(self, step: int, app_state: AppState, *, metric: float | None = None,
             async_save: bool | None = None) -> SaveInfo:
        """Write step `step` (collective). Returns SaveInfo with the time the caller was blocked."""
        use_async = self.async_save if async_save is None else bool(async_save)
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        self.wait()  # the previous async save must be finalised first (its rename, pruning, best)
        tmp = self.directory / f".tmp-{step_dir_name(step)}"
        status = ("ok", "")
        if get_rank() == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                status = ("error", f"cannot create {tmp}: {e}")
        status = broadcast_object(status)
        if status[0] != "ok":
            raise CheckpointError(status[1])
        is_best = metric is not None and self.is_better(float(metric))
        if is_best:
            self.best_metric = float(metric)  # type: ignore[arg-type]
        pending = dict(step=step, tmp=tmp, metric=None if metric is None else float(metric), is_best=is_best)
        state = {"app": app_state}
        if use_async:
            group = self._group_for_async()
            with _quiet_single_process():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group, no_dist=not is_distributed(),
                                        async_stager=self._get_stager())
            upload = getattr(future, "upload_completion", future)
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="krause-ckpt")
            rank = get_rank()
            pending["files"] = self._pool.submit(lambda: (upload.result(), _file_table(_own_files(tmp, rank)))[1])
            self._pending = pending
            blocking = time.perf_counter() - t0
        else:
            try:
                with _quiet_single_process():
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
                files = _file_table(_own_files(tmp, get_rank()))
                status = ("ok", "")
            except _DCP_ERRORS as e:  # reported on every rank
                files, status = {}, ("error", f"could not write {tmp}: {_load_error_text(e, 600)}")
            pending["files_done"] = files
            self._finalise(pending, status)
            blocking = time.perf_counter() - t0
        return SaveInfo(step, self.step_dir(step), blocking, is_best, use_async)

    def _get_stager(self):
        # one stager for the whole run: it keeps its CPU copies of the state between saves, so
        # a save's blocking part is a copy into memory that is already there (no page faults)
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        return self._stager

    def _group_for_async(self):
        # the background writer's collectives must not share a process group with training
        if is_distributed() and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def is_better(self, metric: float) -> bool:
        if metric != metric:
            return False
        if self.best_metric is None:
            return True
        return metric < self.best_metric if self.mode == "min" else metric > self.best_metric

    def wait(self) -> None:
        """Finish and finalise an async save in flight (collective; a no-op when there is none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending["files_done"] = pending["files"].result()
            status = ("ok", "")
        except _DCP_ERRORS as e:
            pending["files_done"], status = {}, ("error", f"could not write {pending['tmp']}: {_load_error_text(e, 600)}")
        self._finalise(pending, status)

    def _finalise(self, pending: dict[str, Any], status: tuple[str, str]) -> None:
        tables = all_gather_object(pending["files_done"])
        status = _collective_status(status)
        if status[0] == "ok" and get_rank() == 0:
            try:
                self._finalise_on_main(pending, {k: v for t in tables for k, v in t.items()})
            except OSError as e:
                status = ("error", f"could not finalise checkpoint step {pending['step']}: {e}")
        status = broadcast_object(status)
        if status[0] != "ok":
            raise CheckpointError(status[1])

    def _finalise_on_main(self, pending: dict[str, Any], files: dict[str, Any]) -> None:
        step, tmp = pending["step"], pending["tmp"]
        cfg = self.config or {}
        meta = {
            "format": FORMAT, "step": int(step), "time": time.time(), "world_size": get_world_size(),
            "metric": pending["metric"], "best_metric": self.best_metric, "mode": self.mode,
            "config": cfg, "config_fingerprint": config_fingerprint(cfg, self.config_ignore),
            "torch_version": str(torch.__version__), "files": files,
        }
        _atomic_write_text(tmp / MARKER, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        final = self.step_dir(step)
        if final.exists():  # the same step saved again (e.g. a stop right after an evaluation save)
            trash = self.directory / f".tmp-old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.directory)
        _atomic_write_text(self.directory / LATEST, final.name + "\n")
        if pending["is_best"]:
            self._copy_best(final)
        self._prune()

    def _copy_best(self, src: Path) -> None:
        tmp = self.directory / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)

        def link_or_copy(a: str, b: str) -> None:
            try:
                os.link(a, b)  # DCP files are never modified after the save: links are safe
            except OSError:
                shutil.copy2(a, b)

        shutil.copytree(src, tmp, copy_function=link_or_copy)
        old = self.directory / ".tmp-old-best"
        shutil.rmtree(old, ignore_errors=True)
        if self.best_dir.exists():
            os.replace(self.best_dir, old)
        os.replace(tmp, self.best_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        for step in self.steps()[:-self.keep_latest_k]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, app_state: AppState, step: int | str | None = None, *, check_config: bool = True,
             verify: bool = True) -> int | None:
        """Restore `app_state` from a step ('latest' / None, 'best' or a number); return its step.

        None (and nothing restored) when there is no checkpoint yet and `step` is None.
        Verifies the files first (CorruptCheckpointError naming the step and the older one)
        and the config fingerprint (CheckpointMismatchError with the diff). Collective.
        """
        import torch.distributed.checkpoint as dcp

        self.wait()
        if step in (None, "latest") and self.latest_step() is None:
            bad = self.incomplete_dirs()
            bad = [p for p in bad if not p.name.startswith(".tmp-")]
            if bad:
                raise CorruptCheckpointError(f"checkpoint {bad[-1]} is incomplete (no {MARKER}) and no complete "
                                             "checkpoint exists; delete it to start over")
            return None
        meta = self.verify(step) if verify else self.read_marker(step)
        if check_config and self.config is not None:
            self.check_config(self.config, step)
        path = self._resolve(step)
        try:
            with _quiet_single_process():
                dcp.load({"app": app_state}, checkpoint_id=str(path), no_dist=not is_distributed())
        except _DCP_ERRORS as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointMismatchError(f"checkpoint {path} does not fit this model / optimizer "
                                          f"({_load_error_text(e, 600)})") from None
        self.best_metric = meta.get("best_metric")
        return int(meta["step"])

    # ------------------------------------------------------------------ misc
    def close(self) -> None:
        """Wait for an async save in flight and release the writer thread (collective)."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def export(self, out_file: str | os.PathLike, step: int | str | None = None,
               safetensors_file: str | os.PathLike | None = None) -> Path:
        """One consolidated torch.save file of a step (rank 0 only; see export_checkpoint)."""
        return export_checkpoint(self._resolve(step), out_file, safetensors_file=safetensors_file)


def export_checkpoint(step_dir: str | os.PathLike, out_file: str | os.PathLike,
                      safetensors_file: str | os.PathLike | None = None) -> Path:
    """Consolidate a DCP step directory (verified first) into one `torch.save` file (no process group).

    The file holds {"format", "app": {"model": ..., "optimizer": ..., ...}, "meta": <checkpoint.json>,
    "checksum"}: a CRC-32 over app and meta that every reader checks (`read_exported`), since
    torch.load alone does not notice bytes changed inside tensor data. `safetensors_file` also
    writes the model weights alone as safetensors (for sharing)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step_dir = Path(step_dir)
    meta = verify_step_dir(step_dir)
    out_file = Path(out_file).expanduser().resolve()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with _quiet_single_process():
        dcp_to_torch_save(str(step_dir), str(tmp))
    payload = torch.load(tmp, map_location="cpu", weights_only=False)
    payload["app"].pop("rng", None)
    payload = {"format": EXPORT_FORMAT, "app": payload["app"], "meta": meta}
    payload["checksum"] = _tree_crc32({"app": payload["app"], "meta": payload["meta"]})
    torch.save(payload, tmp)
    os.replace(tmp, out_file)
    fsync_dir(out_file.parent)
    if safetensors_file is not None:
        from safetensors.torch import save_file

        weights = {k: v.contiguous().clone() for k, v in payload["app"]["model"].items() if isinstance(v, torch.Tensor)}
        save_file(weights, str(safetensors_file), metadata={"step": str(meta.get("step", ""))})
    return out_file


def check_format(record: Any, expected: str, where: str) -> None:
    """CorruptCheckpointError unless `record` carries `expected` ("<kind>/<version>"); another version
    of the same kind gets its own message (it is not damaged, this krause cannot read it)."""
    found = record.get("format") if isinstance(record, dict) else None
    if found == expected:
        return
    kind, _, version = expected.rpartition("/")
    if isinstance(found, str) and found.rpartition("/")[0] == kind:
        raise CorruptCheckpointError(
            f"{where} was written with version {found.rpartition('/')[2]} of the integrity record ({found}); this "
            f"krause reads version {version} only: read it with the krause version that wrote it")
    shown = found if found is not None else type(record).__name__ if not isinstance(record, dict) else "none"
    raise CorruptCheckpointError(f"{where} is not a {expected} record (format: {shown!r})")


def read_exported(path: str | os.PathLike) -> dict[str, Any]:
    """An exported file's payload after checking its format and checksum; CorruptCheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}): the file is "
                                     "truncated, corrupted or not a torch checkpoint") from None
    check_format(payload, EXPORT_FORMAT, f"checkpoint {path}")
    if _tree_crc32({"app": payload.get("app"), "meta": payload.get("meta")}) != payload.get("checksum"):
        raise CorruptCheckpointError(f"checkpoint {path} is corrupted (checksum mismatch)")
    return payload


def seal_directory(directory: str | os.PathLike) -> Path:
    """Write `directory`/krause_integrity.json: the size and CRC-32 of every file in it (a
    save_pretrained export, an adapter), so that readers can check it as resume checks a step."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SEAL)
    table = {str(p.relative_to(directory)): {"size": p.stat().st_size, "crc32": _crc32_file(p)} for p in files}
    _atomic_write_text(directory / SEAL, json.dumps({"format": EXPORT_FORMAT, "files": table}, indent=1,
                                                    sort_keys=True) + "\n")
    return directory / SEAL


def verify_sealed(directory: str | os.PathLike, *, required: bool = True) -> bool:
    """Check a sealed folder's files against its krause_integrity.json (CorruptCheckpointError naming
    the file). Without a seal: CorruptCheckpointError when `required`, else False (not checked)."""
    directory = Path(directory)
    where = f"{directory}"
    try:
        record = json.loads((directory / SEAL).read_text())
    except FileNotFoundError:
        if required:
            raise CorruptCheckpointError(f"{where} has no {SEAL} (an incomplete export, or not written by "
                                         "krause.training): export it again") from None
        return False
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{where} has an unreadable {SEAL} ({e})") from None
    check_format(record, EXPORT_FORMAT, f"{where}/{SEAL}")
    for name, want in sorted((record.get("files") or {}).items()):
        p = directory / name
        if not p.is_file():
            raise CorruptCheckpointError(f"{where} is missing {name}")
        if p.stat().st_size != want["size"]:
            raise CorruptCheckpointError(f"{where}: {name} has {p.stat().st_size} bytes, {want['size']} were "
                                         "written (truncated or replaced)")
        if _crc32_file(p) != want["crc32"]:
            raise CorruptCheckpointError(f"{where}: {name} is corrupted (CRC-32 mismatch)")
    return True


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The one check every reader makes: a step directory (sizes, CRC-32s, DCP metadata) or an
    exported file (format, checksum). Returns the checkpoint's marker; CorruptCheckpointError
    (one line naming the file) when anything is damaged."""
    path = Path(path)
    return verify_step_dir(path) if path.is_dir() else read_exported(path)["meta"]


# ----------------------------------------------------------------------------- trained models (tools)


def find_checkpoint(run_dir: str | os.PathLike | None, which: str = "best") -> Path:
    """A checkpoint of a run for tools (evaluate, generate, compare): `which` is "best", "last"
    (the latest complete step), a step directory or an exported .pt file. ValueError (one line) if none."""
    if which in ("best", "last"):
        if run_dir is None:
            raise ValueError("give a run directory (or a checkpoint path)")
        root = Path(run_dir).expanduser().resolve()
        ck = Checkpointer(root / "checkpoints")
        if which == "best":
            if (ck.best_dir / MARKER).is_file():
                return ck.best_dir
            raise ValueError(f"no best checkpoint in {root} (train a model there first)")
        step = ck.latest_step()
        if step is None:
            raise ValueError(f"no last checkpoint in {root} (train a model there first)")
        return ck.step_dir(step)
    path = Path(which).expanduser().resolve()
    if path.is_dir() and (path / MARKER).is_file():
        return path
    if path.is_file():
        return path
    raise ValueError(f"checkpoint {path} does not exist (or is not a step directory / exported file)")


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The marker of a step directory, or the "meta" of an exported file (config, step, ...).

    Reads the marker only (a step directory's files are checked when its weights are loaded)."""
    path = Path(path)
    if path.is_dir():
        try:
            meta = json.loads((path / MARKER).read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"checkpoint {path} has no readable {MARKER} ({e})") from None
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"checkpoint {path} has no readable {MARKER}")
        return meta
    return read_exported(path)["meta"]


def load_model_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """Load only the model weights of a step directory or exported file into a plain `model`
    (one process, no optimizer), after `verify_checkpoint`; returns the checkpoint's marker.
    CorruptCheckpointError when a file is damaged, CheckpointMismatchError (one line) when
    the weights do not fit."""
    path = Path(path)
    if path.is_dir():
        meta = verify_step_dir(path)
        sd = model.state_dict()
    else:
        payload = read_exported(path)
        meta, sd = payload["meta"], payload["app"]["model"]
    try:
        if path.is_dir():
            import torch.distributed.checkpoint as dcp

            with _quiet_single_process():
                dcp.load({"app": {"model": sd}}, checkpoint_id=str(path), no_dist=True)
        model.load_state_dict(sd, strict=strict)
    except _DCP_ERRORS as e:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit this model ({_load_error_text(e, 300)})") from None
    return meta
