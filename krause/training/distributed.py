"""Process-group setup and small collectives, for torchrun and for a plain process.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we read
them and never hard-code a GPU id, address or port. Without torchrun (no
WORLD_SIZE, or WORLD_SIZE=1) everything here works as a world of one process and
no process group is created.

Backend: NCCL when the device is CUDA, gloo otherwise. The CUDA device is the
one named by LOCAL_RANK (torchrun starts one process per GPU on each node).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DistEnv",
    "init_distributed",
    "get_dist_env",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "all_reduce_mean",
    "all_reduce_max",
    "all_gather_object",
    "broadcast_object",
    "cleanup",
    "per_rank_batch_size",
    "wrap_ddp",
    "unwrap_model",
    "die_with_parent",
    "record",
]

try:  # torchrun reports the failing rank's traceback from the error file @record writes
    from torch.distributed.elastic.multiprocessing.errors import record
except ImportError:  # pragma: no cover - builds without distributed
    def record(fn):  # type: ignore[no-redef]
        return fn


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (world of one)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout_s: float = 1800.0,
    process_group_for_one: bool = False,
) -> DistEnv:
    """Set up this process from torchrun's environment and return its `DistEnv`.

    device: "cuda", "cpu" or None (CUDA when available). A CUDA device index is
        never taken from the caller: it is LOCAL_RANK.
    backend: override the default (nccl on CUDA, gloo on CPU).
    process_group_for_one: also create a process group when the world is one process
        (FSDP's fully_shard needs one); without torchrun it uses an in-memory store,
        so no address or port is needed.
    Safe to call twice; a process group that already exists is reused.
    """
    global _ENV
    die_with_parent()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")

    if world_size == 1 and not process_group_for_one and not dist.is_initialized():
        _ENV = DistEnv(rank=0, local_rank=local_rank, world_size=1, device=dev, backend=None)
        return _ENV

    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if world_size == 1 and missing:
            kwargs_one: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs_one)
            _ENV = DistEnv(rank=0, local_rank=local_rank, world_size=1, device=dev, backend=backend)
            return _ENV
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; launch with torchrun "
                "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
            )
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    else:
        backend = dist.get_backend()
    _ENV = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)
    return _ENV


_WATCHING_PARENT = False


def die_with_parent(sig: int | None = None, poll_s: float = 1.0) -> bool:
    """Under torchrun, make this worker stop when its launcher dies (even by SIGKILL).

    Linux: prctl(PR_SET_PDEATHSIG) delivers `sig` (default SIGTERM: the preemption handler
    saves at the next step boundary and exits) when the parent dies; elsewhere (and as a
    backstop) a daemon thread polls the parent pid. Returns whether a watch was set up
    (only for processes started by torchrun: TORCHELASTIC_RUN_ID or LOCAL_RANK set).
    """
    global _WATCHING_PARENT
    import signal
    import sys
    import threading
    import time

    if _WATCHING_PARENT or not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK")):
        return _WATCHING_PARENT
    sig = signal.SIGTERM if sig is None else sig
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)
                time.sleep(120.0)  # a stop that has not finished its save by now: leave for good
                os._exit(1)

    threading.Thread(target=watch, name="krause-parent-watch", daemon=True).start()
    _WATCHING_PARENT = True
    return True


def get_dist_env() -> DistEnv:
    """The `DistEnv` from `init_distributed`, or one read from the environment if it was not called."""
    if _ENV is not None and (_ENV.backend is None or dist.is_initialized()):
        return _ENV
    if dist.is_initialized():
        backend = dist.get_backend()
        local_rank = _env_int("LOCAL_RANK", 0)
        dev = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single process)."""
    return get_rank() == 0


def barrier() -> None:
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: Any, op: "dist.ReduceOp", mean: bool = False) -> Any:
    is_tensor = isinstance(value, torch.Tensor)
    if is_tensor:
        tensor = value.detach().clone()
    elif isinstance(value, (bool, int, float)):
        tensor = torch.tensor(float(value), dtype=torch.float64)
    else:
        raise TypeError(f"all_reduce expects a tensor or a Python number, got {type(value).__name__}")
    if is_distributed():
        comm = tensor.to(_comm_device())
        if mean and not comm.is_floating_point():
            comm = comm.double()
        dist.all_reduce(comm, op=op)
        if mean:
            comm = comm / dist.get_world_size()
        tensor = comm.to(tensor.device)
    elif mean and not tensor.is_floating_point():
        tensor = tensor.double()
    if is_tensor:
        return tensor
    result = tensor.item()
    if isinstance(value, int) and not isinstance(value, bool) and not mean:
        return int(round(result))
    return result


def all_reduce_sum(value: Any) -> Any:
    """Sum over ranks. A tensor gives a new tensor on its own device; a number gives a number."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_reduce_mean(value: Any) -> Any:
    """Mean over ranks (integers are promoted to float)."""
    return _all_reduce(value, dist.ReduceOp.SUM, mean=True)


def all_reduce_max(value: Any) -> Any:
    """Maximum over ranks."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, indexed by rank (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(synchronize: bool = False) -> None:
    """Destroy the process group if there is one.

    ``synchronize=True`` (for a normal exit) first waits for every rank: a rank that tears
    down gloo and exits while a peer is still finishing can abort the peer at exit
    ("terminate called without an active exception"). Leave it False on error paths,
    where a dead peer would never reach the barrier.
    """
    global _ENV
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    _ENV = None


def per_rank_batch_size(global_batch_size: int, world_size: int | None = None, name: str = "batch_size") -> int:
    """`global_batch_size // world_size`, or ValueError when it does not divide evenly."""
    world_size = get_world_size() if world_size is None else world_size
    if global_batch_size < 1:
        raise ValueError(f"{name}={global_batch_size} must be a positive integer")
    if global_batch_size % world_size != 0:
        raise ValueError(
            f"{name}={global_batch_size} (global) is not divisible by the world size {world_size}; "
            f"choose a multiple of {world_size} (e.g. {(global_batch_size // world_size + 1) * world_size})"
        )
    return global_batch_size // world_size


def wrap_ddp(model: nn.Module, env: DistEnv | None = None, **ddp_kwargs: Any) -> nn.Module:
    """DistributedDataParallel around `model` when there is more than one process, else `model`."""
    env = env or get_dist_env()
    if not env.is_distributed:
        return model
    if env.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [env.device.index])
        ddp_kwargs.setdefault("output_device", env.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    seen: Sequence[type] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, seen):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model
