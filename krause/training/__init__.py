"""Shared training machinery for every experiment family.

Modules (each small and usable alone):
    distributed  torchrun env -> process group (nccl on CUDA, gloo on CPU), collectives,
                 batch-size check, DDP wrap / unwrap
    seed         seed every RNG per rank; capture / restore RNG states
    config       resolved config -> JSON dict, fingerprint, diff
    run_dir      one directory per run: config.json, metrics, checkpoints/, figures/
    metrics      JSON-lines metrics logger and reader, rank-0 tqdm, text logging
    checkpointer DCP checkpoints of a Stateful AppState: step dirs, latest, best, async, resharding,
                 export; verify_checkpoint / load_model_weights: the verified reader of every tool
    state        TrainState: step, epoch, position, running sums (Stateful)
    loop         TrainLoop + TrainHooks: the one loop shape (train_step / evaluate hooks)
    accumulation BatchPlan (global = micro x accum x world), accumulate_gradients (no_sync / FSDP2)
    fsdp         apply_fsdp: per-block fully_shard, MixedPrecisionPolicy, activation checkpointing, compile
    throughput   samples / tokens per second and MFU (FlopCounterMode or a formula)
    lock         one writer per run directory (host, pid, start time; stale locks taken over)
    errors       UsageError, the checkpoint errors and one-line reporting
    launch       torchrun with one-line failures (python -m krause.training.launch ...)
    sigma        sigma_per_layer
    preemption   SIGTERM / SIGUSR1 -> flag -> save `last` and exit cleanly
    data         resumable DistributedSampler (skip part of an epoch), per-epoch loader seeds
    schedule     per-step linear warmup + cosine decay to a floor (LambdaLR)
    optim        AdamW parameter groups without decay on norms, biases, embeddings, log_sigma
    plotting     PNG figures from metrics files, comparison of runs
    recipe       run_recipe(Recipe(...)): the one assembly of a training run (seed, run dir, lock,
                 process group, wrap then compile, optimizer, schedule, checkpointer, resume,
                 metrics, preemption, throughput); families supply config, model, data, hooks
    entry        @entry_point: torch elastic's record + bad input as one line, exit 2
    example      a complete minimal train loop using all of the above (`python -m krause.training.example`)
"""

from .accumulation import AccumulationResult, BatchPlan, accumulate_gradients, grad_sync
from .checkpointer import (
    AppState,
    Checkpointer,
    SaveInfo,
    checkpoint_meta,
    export_checkpoint,
    find_checkpoint,
    load_model_weights,
    read_exported,
    seal_directory,
    verify_checkpoint,
    verify_sealed,
)
from .data import ResumableDistributedSampler, ShardSampler, derive_seed, eval_shard, reseed
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    UsageError,
    one_line,
    report_usage_errors,
)
from .fsdp import apply_fsdp, build_mesh, find_blocks, mixed_precision
from .lock import RunLock, RunLockError
from .loop import LoopSettings, TrainHooks, TrainLoop, split_micro_batches
from .sigma import sigma_per_layer
from .state import TrainState
from .throughput import Throughput, count_flops, known_peak_flops, train_flops_per_sample
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
    die_with_parent,
    get_dist_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    per_rank_batch_size,
    record,
    unwrap_model,
    wrap_ddp,
)
from .metrics import MetricsLogger, close_logging, progress_bar, read_metrics, series, setup_logging
from .optim import NO_DECAY_KEYWORDS, build_adamw, param_groups
from .plotting import plot_comparison, plot_curves, plot_run, plot_series
from .preemption import PreemptionHandler, ignore_sigint
from .entry import entry_point, run_one_line
from .recipe import OptimSpec, Recipe, RunContext, run_recipe, wrap_model
from .run_dir import RunDir, RunDirError, prepare_run_dir
from .schedule import WarmupCosine, warmup_cosine_scheduler, warmup_steps
from .seed import capture_rng_state, restore_rng_state, seed_everything, set_deterministic

__all__ = [
    "AccumulationResult", "BatchPlan", "accumulate_gradients", "grad_sync",
    "AppState", "Checkpointer", "SaveInfo", "export_checkpoint", "find_checkpoint", "checkpoint_meta",
    "load_model_weights", "verify_checkpoint", "read_exported", "seal_directory", "verify_sealed",
    "entry_point", "run_one_line", "OptimSpec", "Recipe", "RunContext", "run_recipe", "wrap_model",
    "ShardSampler", "eval_shard", "UsageError", "one_line", "report_usage_errors",
    "apply_fsdp", "build_mesh", "find_blocks", "mixed_precision", "RunLock", "RunLockError",
    "LoopSettings", "TrainHooks", "TrainLoop", "split_micro_batches", "sigma_per_layer", "TrainState",
    "Throughput", "count_flops", "known_peak_flops", "train_flops_per_sample",
    "die_with_parent", "record", "ignore_sigint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
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
