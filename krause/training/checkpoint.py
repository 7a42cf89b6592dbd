"""Atomic, verifiable, resumable checkpoints.

A checkpoint is one ordinary `torch.save` file (so `torch.load(path)` opens it)
holding a dict:

    format            "krause.training.checkpoint/1"
    model             state dict of the plain module (DDP / torch.compile wrappers
                      removed; FSDP models give their full, unsharded state dict),
                      or only its trainable parameters (model_subset "trainable")
    optimizer, scheduler, scaler    state dicts, or None
    step, epoch, best_metric
    config, config_fingerprint      the resolved config and its fingerprint (config.py)
    rng               one capture_rng_state() per rank (list indexed by rank)
    world_size, extra, torch_version, time
    checksum          CRC-32 over every other entry (tensor bytes included)

It is written to a temporary file in the target directory, flushed, fsynced and
renamed over the target (`os.replace` is atomic on POSIX), so a crash or
preemption during a save leaves the previous checkpoint intact. Loading checks
the checksum (torch.load alone does not notice flipped bytes inside tensor data),
the config fingerprint, and the model's keys and shapes, and raises
`CorruptCheckpointError` / `CheckpointMismatchError` with a message saying what
is wrong. Files are read with `weights_only=True`: `extra` may hold only
tensors, numbers, strings, None and lists / tuples / dicts of these.

In a distributed job `save_checkpoint` and `load_checkpoint` are collective:
every rank calls them (RNG states are gathered; FSDP state dicts are gathered);
rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_file, fsync_dir
from .config import RUNTIME_KEYS, config_diff, config_fingerprint, config_to_dict, format_config_diff
from .distributed import all_gather_object, broadcast_object, get_rank, get_world_size, is_main_process, unwrap_model
from .seed import capture_rng_state, restore_rng_state

__all__ = [
    "FORMAT",
    "CheckpointError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "CheckpointState",
    "atomic_torch_save",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "model_state_dict",
    "CheckpointManager",
]

FORMAT = "krause.training.checkpoint/1"


class CheckpointError(RuntimeError):
    """Base class of checkpoint problems."""


class CorruptCheckpointError(CheckpointError):
    """The file is missing, truncated, not a checkpoint, or its checksum does not match."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another config or model."""


@dataclasses.dataclass
class CheckpointState:
    """What `load_checkpoint` returns besides restoring the objects it was given."""

    path: Path
    step: int
    epoch: int | float | None
    best_metric: float | None
    config: dict[str, Any]
    extra: dict[str, Any]
    world_size: int


# ----------------------------------------------------------------------------- helpers


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


_PLAIN_LEAVES = (type(None), bool, int, float, complex, bytes, torch.dtype, torch.device, torch.Size)


def _to_cpu(obj: Any, where: str = "checkpoint") -> Any:
    """Detached CPU copies of tensors; numpy values to tensors / Python numbers; containers rebuilt.

    Raises TypeError for anything `torch.load(weights_only=True)` could not read back,
    so a bad `extra` entry fails at save time rather than at resume time.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)  # str subclasses (e.g. torch.__version__) are not weights-only loadable
    if type(obj) in _PLAIN_LEAVES:
        return obj
    if isinstance(obj, Mapping):
        items = [(k, _to_cpu(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        if isinstance(obj, OrderedDict):  # module state dicts: keep their version metadata
            out = OrderedDict(items)
            if hasattr(obj, "_metadata"):
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            return out
        return dict(items)
    if isinstance(obj, list):
        return [_to_cpu(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_to_cpu(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_to_cpu(v, where) for v in obj)
    raise TypeError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which a weights-only torch.load cannot "
        "read back; store tensors, numbers, strings, None and lists / tuples / dicts of these"
    )


def _checksum(obj: Any, crc: int = 0) -> int:
    """CRC-32 over a nested structure: tensor dtype, shape and bytes; repr of other leaves."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = zlib.crc32(f"T{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
        return crc
    if isinstance(obj, Mapping):
        crc = zlib.crc32(b"{", crc)
        for k, v in obj.items():
            crc = zlib.crc32(repr(k).encode(), crc)
            crc = _checksum(v, crc)
        return zlib.crc32(b"}", crc)
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(b"[" if isinstance(obj, list) else b"(", crc)
        for v in obj:
            crc = _checksum(v, crc)
        return zlib.crc32(b"]", crc)
    return zlib.crc32(repr(obj).encode(), crc)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)
    return path


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_file(dst) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, length=16 * 1024 * 1024)


def model_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, Any]:
    """The model's state dict with wrapper prefixes removed (full and on CPU for FSDP, rank 0 only).

    trainable_only: keep only parameters with requires_grad (e.g. LoRA adapters, gates and
        log_sigma of a frozen 8B model) and drop frozen parameters and buffers.
    Collective for FSDP models; for other models it can be called on any rank alone.
    """
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = unwrap_model(model).state_dict()
    if trainable_only:
        trainable = _trainable_names(model)
        sd = OrderedDict((k, v) for k, v in sd.items() if k in trainable)
    return sd


def _trainable_names(model: nn.Module) -> set[str]:
    plain = unwrap_model(model)
    names = {n for n, p in plain.named_parameters() if p.requires_grad}
    # FSDP(1) may prefix names with its wrapper; strip the ones DCP strips
    return {n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "") for n in names}


def _optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def _summarise_load_error(e: Exception) -> str:
    msg = str(e).strip()
    return msg if len(msg) < 2000 else msg[:2000] + " ..."


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int,
    epoch: int | float | None = None,
    best_metric: float | None = None,
    config: Any = None,
    config_ignore: Iterable[str] = RUNTIME_KEYS,
    extra: Mapping[str, Any] | None = None,
    trainable_only: bool = False,
) -> Path:
    """Write a checkpoint atomically (rank 0) after gathering what every rank must contribute.

    trainable_only: store only parameters with requires_grad (see model_state_dict); loading
        then restores those and checks that every trainable parameter is covered.
    Collective: call it on every rank. Raises CheckpointError on every rank if rank 0
    could not write.
    """
    path = Path(path).expanduser().resolve()
    fsdp = _is_fsdp(model)
    rng_states = all_gather_object(capture_rng_state())
    model_sd = model_state_dict(model, trainable_only) if (fsdp or is_main_process()) else None
    optim_sd = None
    if optimizer is not None and (fsdp or is_main_process()):
        optim_sd = _optimizer_state_dict(model, optimizer)

    status = ("ok", "")
    if is_main_process():
        try:
            cfg = config_to_dict(config)
            payload: dict[str, Any] = {
                "format": FORMAT,
                "model": _to_cpu(model_sd, "model state"),
                "model_subset": "trainable" if trainable_only else "full",
                "optimizer": _to_cpu(optim_sd, "optimizer state") if optim_sd is not None else None,
                "optimizer_keys": "fqn" if fsdp else "index",
                "scheduler": _to_cpu(scheduler.state_dict(), "scheduler state") if scheduler is not None else None,
                "scaler": _to_cpu(scaler.state_dict(), "scaler state") if scaler is not None else None,
                "step": int(step),
                "epoch": _to_cpu(epoch, "epoch"),
                "best_metric": None if best_metric is None else float(best_metric),
                "config": _to_cpu(cfg, "config"),
                "config_fingerprint": config_fingerprint(cfg, config_ignore),
                "rng": [_to_cpu(s, "rng state") for s in rng_states],
                "world_size": get_world_size(),
                "extra": _to_cpu(dict(extra or {}), "extra"),
                "torch_version": str(torch.__version__),
                "time": time.time(),
            }
            payload["checksum"] = _checksum(payload)
            atomic_torch_save(payload, path)
        except Exception as e:  # reported to every rank below, then re-raised
            status = ("error", f"could not write checkpoint {path}: {type(e).__name__}: {e}")
            if get_world_size() == 1:
                raise
    status = broadcast_object(status)
    if status[0] != "ok":
        raise CheckpointError(status[1])
    return path


# ----------------------------------------------------------------------------- load


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> dict[str, Any]:
    """Read and verify a checkpoint file; raise CorruptCheckpointError if it is not a sound one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); the file is truncated, "
            "corrupted or not a torch checkpoint. Delete it to start over or point to another checkpoint."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CorruptCheckpointError(f"{path} is not a {FORMAT} checkpoint (format: {found!r})")
    if verify:
        stored = payload.pop("checksum", None)
        actual = _checksum(payload)
        payload["checksum"] = stored
        if stored != actual:
            raise CorruptCheckpointError(
                f"checkpoint {path} is corrupted: checksum {actual:#010x} does not match the stored {stored!r}"
            )
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    config: Any = None,
    config_ignore: Iterable[str] = RUNTIME_KEYS,
    strict_config: bool = True,
    strict: bool = True,
    restore_rng: bool = True,
    map_location: Any = "cpu",
) -> CheckpointState:
    """Restore the given objects from a checkpoint and return its step / epoch / best metric.

    config: the current run's config. When given, its fingerprint must equal the
        checkpoint's (CheckpointMismatchError listing the differing keys otherwise)
        unless strict_config=False, which only warns.
    strict: passed to the model's load_state_dict (missing / unexpected keys,
        and always shapes, raise CheckpointMismatchError).
    restore_rng: restore this rank's python / numpy / torch / CUDA RNG states (skipped
        with a warning when the world size changed).
    The LR schedule's shape (warmup, total steps) comes from the scheduler object
    built by the caller; only its counters and base LRs come from the checkpoint.
    Collective for FSDP models; otherwise every rank reads the file itself.
    """
    payload = read_checkpoint(path, map_location=map_location)
    path = Path(path).expanduser().resolve()

    if config is not None:
        current = config_fingerprint(config, config_ignore)
        if current != payload["config_fingerprint"]:
            diff = config_diff(payload["config"], config, config_ignore)
            detail = format_config_diff(diff) if diff else "  (fingerprints differ; the ignored keys changed?)"
            message = (
                f"checkpoint {path} was written by a run with a different config (checkpoint -> current):\n{detail}"
            )
            if strict_config:
                raise CheckpointMismatchError(
                    message + "\nUse a new out_dir, or allow the change explicitly (strict_config=False)."
                )
            warnings.warn(message, stacklevel=2)

    if model is not None:
        fsdp = _is_fsdp(model)
        subset = payload.get("model_subset", "full") == "trainable"
        try:
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                result = set_model_state_dict(
                    model, payload["model"], options=StateDictOptions(full_state_dict=True, strict=strict and not subset)
                )
            else:
                result = unwrap_model(model).load_state_dict(payload["model"], strict=strict and not subset)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit this model:\n{_summarise_load_error(e)}"
            ) from e
        if subset and strict:
            # a trainable-only checkpoint must cover exactly the trainable parameters
            missing = sorted(set(result.missing_keys) & _trainable_names(model))
            if result.unexpected_keys or missing:
                raise CheckpointMismatchError(
                    f"checkpoint {path} (trainable parameters only) does not fit this model: "
                    f"unexpected {sorted(result.unexpected_keys)[:10]}, trainable but missing {missing[:10]}"
                )
        if optimizer is not None:
            if payload["optimizer"] is None:
                raise CheckpointMismatchError(f"checkpoint {path} has no optimizer state")
            wanted = "fqn" if fsdp else "index"
            if payload.get("optimizer_keys") != wanted:
                raise CheckpointMismatchError(
                    f"checkpoint {path} holds an optimizer state saved {'with' if wanted == 'index' else 'without'} "
                    "FSDP; resume it with the same parallelism"
                )
            try:
                if fsdp:
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                    set_optimizer_state_dict(
                        model, optimizer, payload["optimizer"], options=StateDictOptions(full_state_dict=True)
                    )
                else:
                    optimizer.load_state_dict(payload["optimizer"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise CheckpointMismatchError(
                    f"checkpoint {path}: the optimizer state does not fit this optimizer (parameter groups "
                    f"or sizes differ):\n{_summarise_load_error(e)}"
                ) from e
    elif optimizer is not None:
        raise ValueError("restoring an optimizer needs the model too (pass model=...)")

    if scheduler is not None:
        if payload["scheduler"] is None:
            raise CheckpointMismatchError(f"checkpoint {path} has no scheduler state")
        sd = dict(payload["scheduler"])
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and "lr_lambdas" in sd:
            sd["lr_lambdas"] = [None] * len(sd["lr_lambdas"])  # keep the caller's schedule shape
        scheduler.load_state_dict(sd)
    if scaler is not None:
        if payload["scaler"] is None:
            raise CheckpointMismatchError(f"checkpoint {path} has no grad-scaler state")
        scaler.load_state_dict(payload["scaler"])

    if restore_rng:
        states = payload.get("rng") or []
        if len(states) == get_world_size():
            restore_rng_state(states[get_rank()])
        else:
            warnings.warn(
                f"checkpoint {path} was written by {len(states)} rank(s) but this job has {get_world_size()}; "
                "RNG states are not restored (the run stays correct but is not bit-reproducible)",
                stacklevel=2,
            )

    return CheckpointState(
        path=path,
        step=int(payload["step"]),
        epoch=payload.get("epoch"),
        best_metric=payload.get("best_metric"),
        config=payload.get("config") or {},
        extra=payload.get("extra") or {},
        world_size=int(payload.get("world_size", 1)),
    )


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """`last.pt` (resume point) and `best.pt` (by a selection metric) in one directory.

    mode: "max" (e.g. accuracy) or "min" (e.g. loss, bits/dim) for the selection metric.
    trainable_only: save only trainable parameters (LoRA on a frozen base model).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Any = None,
        mode: str = "max",
        config_ignore: Iterable[str] = RUNTIME_KEYS,
        trainable_only: bool = False,
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.directory = Path(directory).expanduser().resolve()
        self.config = config
        self.mode = mode
        self.config_ignore = tuple(config_ignore)
        self.trainable_only = trainable_only
        self.best_metric: float | None = None

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def has_last(self) -> bool:
        return self.last_path.is_file()

    def is_better(self, metric: float) -> bool:
        if metric != metric:  # NaN is never better
            return False
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.mode == "max" else metric < self.best_metric

    def save(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        step: int,
        epoch: int | float | None = None,
        metric: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save `last.pt`; when `metric` is given and beats the best so far, also `best.pt`.

        Collective. Returns whether this save became the new best.
        """
        is_best = metric is not None and self.is_better(float(metric))
        if is_best:
            self.best_metric = float(metric)  # type: ignore[arg-type]
        save_checkpoint(
            self.last_path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            epoch=epoch,
            best_metric=self.best_metric,
            config=self.config,
            config_ignore=self.config_ignore,
            extra=extra,
            trainable_only=self.trainable_only,
        )
        if is_best:
            status = ("ok", "")
            if is_main_process():
                try:
                    _atomic_copy(self.last_path, self.best_path)
                except OSError as e:
                    status = ("error", f"could not write {self.best_path}: {e}")
            status = broadcast_object(status)
            if status[0] != "ok":
                raise CheckpointError(status[1])
        return is_best

    def _load(self, path: Path, **kwargs: Any) -> CheckpointState:
        kwargs.setdefault("config", self.config)
        kwargs.setdefault("config_ignore", self.config_ignore)
        state = load_checkpoint(path, **kwargs)
        self.best_metric = state.best_metric
        return state

    def load_last(self, **kwargs: Any) -> CheckpointState | None:
        """Restore from `last.pt` (arguments as load_checkpoint); None when there is none yet."""
        if not self.has_last():
            return None
        return self._load(self.last_path, **kwargs)

    def load_best(self, **kwargs: Any) -> CheckpointState:
        """Restore from `best.pt` (e.g. for a final evaluation); usually with restore_rng=False."""
        kwargs.setdefault("restore_rng", False)
        return self._load(self.best_path, **kwargs)
