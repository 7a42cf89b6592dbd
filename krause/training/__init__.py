"""Shared training machinery for every experiment family.

Modules (each small and usable alone):
    distributed  torchrun env -> process group (nccl on CUDA, gloo on CPU), collectives,
                 batch-size check, DDP wrap / unwrap
    seed         seed every RNG per rank; capture / restore RNG states
    config       resolved config -> JSON dict, fingerprint, diff
    run_dir      one directory per run: config.json, metrics, checkpoints/, figures/
    metrics      JSON-lines metrics logger and reader, rank-0 tqdm, text logging
    checkpoint   atomic checksummed checkpoints, resume, last / best
    preemption   SIGTERM / SIGUSR1 -> flag -> save `last` and exit cleanly
    data         resumable DistributedSampler (skip part of an epoch), per-epoch loader seeds
    schedule     per-step linear warmup + cosine decay to a floor (LambdaLR)
    optim        AdamW parameter groups without decay on norms, biases, embeddings, log_sigma
    plotting     PNG figures from metrics files, comparison of runs
    example      a complete minimal train loop using all of the above (`python -m krause.training.example`)
"""

from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointState,
    CorruptCheckpointError,
    atomic_torch_save,
    load_checkpoint,
    model_state_dict,
    read_checkpoint,
    save_checkpoint,
)
from .data import ResumableDistributedSampler, derive_seed, reseed
from .config import RUNTIME_KEYS, config_diff, config_fingerprint, config_to_dict
from .distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    get_dist_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    per_rank_batch_size,
    unwrap_model,
    wrap_ddp,
)
from .metrics import MetricsLogger, close_logging, progress_bar, read_metrics, series, setup_logging
from .optim import NO_DECAY_KEYWORDS, build_adamw, param_groups
from .plotting import plot_comparison, plot_curves, plot_run, plot_series
from .preemption import PreemptionHandler
from .run_dir import RunDir, RunDirError, prepare_run_dir
from .schedule import WarmupCosine, warmup_cosine_scheduler, warmup_steps
from .seed import capture_rng_state, restore_rng_state, seed_everything, set_deterministic

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointState",
    "CorruptCheckpointError",
    "atomic_torch_save",
    "load_checkpoint",
    "model_state_dict",
    "read_checkpoint",
    "save_checkpoint",
    "RUNTIME_KEYS",
    "config_diff",
    "config_fingerprint",
    "config_to_dict",
    "ResumableDistributedSampler",
    "derive_seed",
    "reseed",
    "DistEnv",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_dist_env",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "per_rank_batch_size",
    "unwrap_model",
    "wrap_ddp",
    "MetricsLogger",
    "progress_bar",
    "read_metrics",
    "series",
    "setup_logging",
    "close_logging",
    "NO_DECAY_KEYWORDS",
    "build_adamw",
    "param_groups",
    "plot_comparison",
    "plot_curves",
    "plot_run",
    "plot_series",
    "PreemptionHandler",
    "RunDir",
    "RunDirError",
    "prepare_run_dir",
    "WarmupCosine",
    "warmup_cosine_scheduler",
    "warmup_steps",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
    "set_deterministic",
]
