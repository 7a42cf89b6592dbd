"""The recipe runner: one place that assembles a training run, as torchtitan's Trainer does.

    recipe = Recipe(name="my_family", args=args, config=resolved, ignore=IGNORED_KEYS,
                    build_model=lambda: MyModel(cfg), make_hooks=MyHooks, settings=LoopSettings(...),
                    optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup=0.05, min_lr_ratio=0.1))
    return run_recipe(recipe, device="cuda")

A family supplies its resolved config, a model builder, its hooks (`TrainHooks`: batches,
train_step, evaluate, records; built from the assembled `RunContext`) and optional start /
finish callbacks. The runner does, in this order and nowhere else: process group; run
directory (config checked against the checkpoint, lock); logging; seed (the same on every
rank) -> build -> FLOPs per sample; wrapping and compile (`wrap_model`); AdamW and the
warmup-cosine schedule; checkpointer; the per-rank seed, then the resume (which restores
every RNG); metrics; preemption; the loop with throughput and MFU; and the process group's
teardown. A start that fails before the first step undoes what it wrote (`RunDir.undo_start`),
so the corrected retry is not refused as another run's directory.

The args namespace must carry out_dir, resume and seed; overwrite (default False) and
resume_step (the step to resume from instead of the latest; default None) are optional.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .checkpointer import AppState, Checkpointer
from .distributed import DistEnv, cleanup, init_distributed, wrap_ddp
from .fsdp import apply_fsdp, build_mesh, mixed_precision
from .loop import LoopSettings, TrainHooks, TrainLoop
from .metrics import MetricsLogger, close_logging, setup_logging
from .optim import build_adamw
from .preemption import PreemptionHandler
from .run_dir import RunDir, prepare_run_dir
from .schedule import warmup_cosine_scheduler, warmup_steps
from .seed import seed_everything
from .state import TrainState
from .throughput import Throughput

__all__ = ["OptimSpec", "Recipe", "RunContext", "run_recipe", "wrap_model"]


@dataclasses.dataclass
class OptimSpec:
    """AdamW (no decay on norms, biases, embeddings, log_sigma) and per-step warmup + cosine."""

    lr: float
    weight_decay: float
    warmup: float                    # fraction of the steps
    min_lr_ratio: float
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None  # explicit count (e.g. whole epochs), instead of the fraction
    decay_all: bool = False          # weight decay on every parameter (a release's preset)


@dataclasses.dataclass
class RunContext:
    """Everything the runner assembled; what a family's hooks and callbacks are built from."""

    recipe: "Recipe"
    env: DistEnv
    run: RunDir
    log: Any
    model: nn.Module                 # the plain module (weights, sigma, export)
    train_model: nn.Module           # wrapped (DDP / FSDP2) and compiled: the one to train
    eval_model: nn.Module            # no DDP (ranks with fewer batches never wait in forward)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any                      # torch.amp.GradScaler (enabled for fp16 only)
    state: TrainState
    checkpointer: Checkpointer
    app: AppState
    metrics: MetricsLogger
    resumed: int | None              # the step resumed from, or None for a fresh run
    n_params: int
    flops_per_sample: float | None


@dataclasses.dataclass
class Recipe:
    name: str                                              # logger name
    args: Any                                              # out_dir, resume, overwrite, seed
    config: dict                                           # resolved config (run dir, checkpoint fingerprint)
    ignore: Iterable[str]                                  # config keys a resumed launch may change
    build_model: Callable[[], nn.Module]                   # after the common seed: same weights on every rank
    make_hooks: Callable[[RunContext], TrainHooks]
    settings: LoopSettings
    optim: OptimSpec
    dist: str = "ddp"                                      # "ddp" or "fsdp"
    fsdp_blocks: str = "blocks"
    bf16: bool = False                                     # FSDP2's mixed-precision policy
    fp16_scaler: bool = False                              # a GradScaler (fp16 autocast), saved with the run
    compile: bool = False
    keep_latest_k: int = 2
    mode: str = "min"                                      # of the selection metric
    peak_flops: float | None = None                        # per device, for MFU
    flops_per_sample: Callable[[nn.Module], float | None] | None = None  # forward + backward, plain model
    state_extra: dict = dataclasses.field(default_factory=dict)
    on_start: Callable[[RunContext], None] | None = None   # after the resume, before the loop
    on_finish: Callable[[RunContext], int | None] | None = None  # the loop finished; may return an exit code


def wrap_model(model: nn.Module, env: DistEnv, *, dist: str = "ddp", compile: bool = False,
               fsdp_blocks: str = "blocks", bf16: bool = False) -> tuple[nn.Module, nn.Module]:
    """(train_model, eval_model). The one order: wrap, then compile in place, so compile sees the
    wrapper (dynamo's DDPOptimizer splits the graph at DDP's buckets to overlap the all-reduce with
    backward; FSDP2 compiles each block in place before its fully_shard, keeping the hooks outside
    the graph); in-place `Module.compile` keeps the state-dict keys and DDP's no_sync."""
    if dist not in ("ddp", "fsdp"):
        raise ValueError(f"dist must be 'ddp' or 'fsdp', got {dist!r}")
    if dist == "fsdp":
        apply_fsdp(model, build_mesh(env.device.type), blocks=fsdp_blocks,
                   mp_policy=mixed_precision("bf16") if bf16 else None, compile_blocks=compile)
        return model, model
    train_model = wrap_ddp(model, env)
    if compile:
        train_model.compile()
    return train_model, model


def run_recipe(recipe: Recipe, device: str | torch.device | None = None) -> int:
    """Run `recipe` in this process (one rank of a torchrun job, or alone); 0 when finished or
    stopped by a signal (rerun with --resume), 1 when the loss diverged. Bad input raises
    (UsageError, RunDirError, checkpoint errors): the entry point's wrapper reports it in one line."""
    env = init_distributed(device, process_group_for_one=recipe.dist == "fsdp")  # fully_shard needs a group
    finished = False
    try:
        code = _run(recipe, env)
        finished = True
        return code
    finally:
        close_logging(recipe.name)
        cleanup(synchronize=finished)


def _run(recipe: Recipe, env: DistEnv) -> int:
    args = recipe.args
    run = prepare_run_dir(args.out_dir, recipe.config, resume=args.resume,
                          overwrite=getattr(args, "overwrite", False), ignore=recipe.ignore,
                          resume_step=getattr(args, "resume_step", None))
    try:
        ctx = _assemble(recipe, env, run)
        hooks = recipe.make_hooks(ctx)
        if recipe.on_start is not None:
            recipe.on_start(ctx)
    except BaseException:
        run.undo_start()  # nothing trained yet: the corrected retry must find the directory as it was
        raise
    with PreemptionHandler() as preempt, ctx.metrics:
        ctx.model.train()
        outcome = TrainLoop(recipe.settings, model=ctx.train_model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                            checkpointer=ctx.checkpointer, app_state=ctx.app, train_state=ctx.state,
                            metrics=ctx.metrics, hooks=hooks, scaler=ctx.scaler, preempt=preempt,
                            throughput=Throughput(ctx.flops_per_sample, recipe.peak_flops, world_size=env.world_size),
                            world_size=env.world_size).run()
        ctx.checkpointer.close()
        code = 1 if outcome == "diverged" else 0
        if outcome == "finished" and recipe.on_finish is not None:
            code = recipe.on_finish(ctx) or 0  # metrics still open: final scores go into metrics.jsonl
    run.release()
    return code


def _assemble(recipe: Recipe, env: DistEnv, run: RunDir) -> RunContext:
    args, o = recipe.args, recipe.optim
    log = setup_logging(run.log_path, name=recipe.name)
    seed_everything(args.seed)  # identical initial weights on every rank
    model = recipe.build_model().to(env.device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = recipe.flops_per_sample(model) if recipe.flops_per_sample is not None else None
    train_model, eval_model = wrap_model(model, env, dist=recipe.dist, compile=recipe.compile,
                                         fsdp_blocks=recipe.fsdp_blocks, bf16=recipe.bf16)
    optimizer = build_adamw(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, decay_all=o.decay_all)
    total = recipe.settings.total_steps
    warmup = o.warmup_steps if o.warmup_steps is not None else warmup_steps(total, fraction=o.warmup)
    scheduler = warmup_cosine_scheduler(optimizer, total, warmup, o.min_lr_ratio)
    scaler = torch.amp.GradScaler(env.device.type, enabled=recipe.fp16_scaler)
    state = TrainState(extra=dict(recipe.state_extra))
    app = AppState(train_model, optimizer, scheduler, scaler, train_state=state)
    ckpt = Checkpointer(run.checkpoint_dir, config=recipe.config, config_ignore=recipe.ignore, mode=recipe.mode,
                        keep_latest_k=recipe.keep_latest_k)
    seed_everything(args.seed, env.rank)  # per-rank dropout streams (a resume restores the saved ones)
    resumed = ckpt.load(app, getattr(args, "resume_step", None)) if args.resume else None
    if resumed is not None:
        log.info(f"resumed from {ckpt.step_dir(resumed)} at step {state.step} (epoch {state.epoch}, "
                 f"batch {state.batch_in_epoch})")
    metrics = MetricsLogger(run.metrics_path, resume_step=state.step if resumed is not None else None)
    return RunContext(recipe=recipe, env=env, run=run, log=log, model=model, train_model=train_model,
                      eval_model=eval_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state,
                      checkpointer=ckpt, app=app, metrics=metrics, resumed=resumed, n_params=n_params,
                      flops_per_sample=flops)
