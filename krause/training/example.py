"""A complete, minimal train loop built from krause.training; the template for the families.

    python -m krause.training.example --out_dir runs/example
    torchrun --nproc_per_node 2 -m krause.training.example --out_dir runs/example --device cpu
    torchrun --nproc_per_node 2 -m krause.training.example --out_dir runs/fsdp --device cpu --fsdp
    # preempted, Ctrl-C'd or killed? run the same command again with --resume

It trains a small MLP classifier on synthetic data and shows every piece: torchrun
setup (`@record`, workers that die with their launcher), the run directory and its
lock, the global batch split into ranks x micro-batches (gradient accumulation), DDP or
FSDP2 (`apply_fsdp`), AdamW groups, warmup + cosine per step, a resumable sampler, the
shared loop (`TrainLoop` with this file's hooks), a `TrainState`, DCP checkpoints
(step directories, latest, best, keep_latest_k, async saves), JSON-lines metrics with
throughput, graceful stops (SIGTERM / SIGUSR1 / Ctrl-C) and figures. The tests use it to
check that an interrupted and resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .accumulation import BatchPlan
from .errors import CheckpointError
from .checkpointer import AppState, Checkpointer
from .config import RUNTIME_KEYS
from .data import ResumableDistributedSampler, ShardSampler, reseed
from .distributed import all_reduce_sum, cleanup, init_distributed, record, unwrap_model, wrap_ddp
from .errors import UsageError, one_line
from .loop import LoopSettings, TrainHooks, TrainLoop, split_micro_batches
from .metrics import MetricsLogger, close_logging, setup_logging
from .optim import build_adamw
from .plotting import plot_run
from .preemption import PreemptionHandler, ignore_sigint
from .run_dir import RunDirError, prepare_run_dir
from .schedule import warmup_cosine_scheduler, warmup_steps
from .seed import seed_everything
from .sigma import sigma_per_layer
from .state import TrainState
from .throughput import Throughput


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear blocks, logits divided by sigma = exp(log_sigma)."""

    def __init__(self, d_in: int, d_hidden: int, n_classes: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(d_hidden), nn.GELU(), nn.Dropout(dropout),
                                                   nn.Linear(d_hidden, d_hidden))])
        self.fc2 = nn.Linear(d_hidden, n_classes)
        self.log_sigma = nn.Parameter(torch.zeros(1))  # shape (1,): FSDP2 shards no 0-d parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        for block in self.blocks:
            h = h + block(h)
        return self.fc2(h) / self.log_sigma.exp()


def synthetic_data(n: int, d: int, n_classes: int, seed: int, teacher_seed: int) -> TensorDataset:
    """Gaussian inputs labelled by a fixed random linear teacher (identical on every rank)."""
    teacher = torch.randn(d, n_classes, generator=torch.Generator().manual_seed(teacher_seed))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


#: keys that do not change what is computed (the run may resume with other values);
#: the micro-batch size and parallelism only change how the same global batch is computed
IGNORED_KEYS = RUNTIME_KEYS | {"preempt_at_step", "preempt_rank", "nonfinite_at_step", "micro_batch_size", "fsdp", "async_save", "keep_latest_k", "live"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m krause.training.example", description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir if any")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32, help="global batch size (all ranks, all micro-batches)")
    p.add_argument("--micro_batch_size", type=int, default=None, help="per rank and forward (default: no accumulation)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (apply_fsdp) instead of DDP")
    p.add_argument("--async_save", action="store_true", help="checkpoint in the background (dcp.async_save)")
    p.add_argument("--keep_latest_k", type=int, default=2)
    p.add_argument("--save_every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--live", choices=["none", "tensorboard"], default="none", help="live metrics sink")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.01)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--warmup_epochs", type=float, default=1.0)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--n_train", type=int, default=512)
    p.add_argument("--n_test", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=4)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--preempt_at_step", type=int, default=None, help="testing: SIGTERM after this step")
    p.add_argument("--preempt_rank", type=int, default=0, help="testing: the rank that gets the SIGTERM")
    p.add_argument("--nonfinite_at_step", type=int, default=None, help="testing: the loss of this step reads NaN")
    args = p.parse_args(argv)
    if args.keep_latest_k < 1:
        raise UsageError(f"--keep_latest_k must be >= 1, got {args.keep_latest_k}")
    for name in ("epochs", "log_every", "n_train", "n_test"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


class ExampleHooks(TrainHooks):
    def __init__(self, args, env, model, eval_model, loader, sampler, loader_gen, test_loader, plan, metrics, log):
        self.args, self.env, self.model, self.eval_model = args, env, model, eval_model
        self.loader, self.sampler, self.loader_gen, self.test_loader = loader, sampler, loader_gen, test_loader
        self.plan, self.metrics, self.log = plan, metrics, log

    def batches(self, epoch, start):
        self.sampler.set_epoch(epoch, skip=start * self.plan.per_rank)  # set_epoch(epoch), never (rank)
        reseed(self.loader_gen, self.args.seed, epoch, self.env.rank)
        for x, y in self.loader:
            yield split_micro_batches((x.to(self.env.device), y.to(self.env.device)), self.plan.accum_steps)

    def train_step(self, micro):
        x, y = micro
        return F.cross_entropy(self.model(x), y, reduction="sum"), y.numel()

    @torch.no_grad()
    def evaluate(self, state):
        self.eval_model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss, correct, count
        for x, y in self.test_loader:
            x, y = x.to(self.env.device), y.to(self.env.device)
            logits = self.eval_model(x)
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 (logits.argmax(1) == y).sum().double(), torch.tensor(float(y.numel()),
                                 dtype=torch.float64, device=self.env.device)])
        self.eval_model.train()
        loss, correct, count = all_reduce_sum(sums).tolist()  # every rank's shard: the whole set once
        return {"test_loss": loss / count, "test_acc": correct / count}

    def selection_metric(self, result):
        return result.get("test_acc")

    def on_eval(self, state, record, is_best, where):
        sigma = sigma_per_layer(unwrap_model(self.model))
        self.metrics.log(step=state.step, epoch=state.epoch, sigma=sigma[0][0], **record)
        if record:
            self.log.info("%s: test_loss %.4f test_acc %.4f sigma %.4f%s", where, record["test_loss"],
                          record["test_acc"], sigma[0][0], " (best)" if is_best else "")

    def on_stop(self, state, reason):
        self.log.info("stop requested (%s): saved step %d, exiting; run again with --resume", reason, state.step)

    def on_diverged(self, state, message):
        self.log.error(message)


@record
def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        env = init_distributed(args.device, process_group_for_one=False)
    except (UsageError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finished = False
    try:
        code = _train(args, env)
        finished = True
        return code
    except (UsageError, ValueError, RunDirError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        close_logging()
        cleanup(synchronize=finished)


def _train(args: argparse.Namespace, env) -> int:
    plan = BatchPlan.from_global(args.batch_size, args.micro_batch_size, env.world_size)
    if args.fsdp and not env.is_distributed:
        raise UsageError("--fsdp needs torchrun with at least 2 processes")
    run = prepare_run_dir(args.out_dir, args, resume=args.resume, overwrite=args.overwrite, ignore=IGNORED_KEYS)
    log = setup_logging(run.log_path)
    log.info("run directory %s, world size %d, device %s, batch %d = %d micro x %d accum x %d ranks", run.root,
             env.world_size, env.device, plan.global_batch, plan.micro_batch, plan.accum_steps, env.world_size)

    seed_everything(args.seed, rank=0)  # identical initialisation on every rank
    model = TinyNet(args.dim, args.hidden, args.classes, args.dropout).to(env.device)
    train_set = synthetic_data(args.n_train, args.dim, args.classes, seed=1000 + args.seed, teacher_seed=args.seed)
    test_set = synthetic_data(args.n_test, args.dim, args.classes, seed=2000 + args.seed, teacher_seed=args.seed)
    sampler = ResumableDistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    loader_gen = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=plan.per_rank, sampler=sampler, drop_last=True,
                              generator=loader_gen, worker_init_fn=ignore_sigint)
    test_loader = DataLoader(test_set, batch_size=plan.per_rank, sampler=ShardSampler(len(test_set)))
    steps_per_epoch = len(train_loader)
    if steps_per_epoch < 1:
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {args.n_train} training samples")
    total_steps = args.epochs * steps_per_epoch

    if args.fsdp:
        from .fsdp import apply_fsdp, build_mesh

        train_model = apply_fsdp(model, build_mesh(env.device.type), blocks="blocks")
        eval_model = train_model
    else:
        train_model, eval_model = wrap_ddp(model, env), model
    optimizer = build_adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine_scheduler(
        optimizer, total_steps=total_steps,
        warmup_steps=warmup_steps(total_steps, epochs=args.warmup_epochs, steps_per_epoch=steps_per_epoch),
        min_lr_ratio=args.min_lr_ratio,
    )
    state = TrainState(extra={"steps_per_epoch": steps_per_epoch})
    app = AppState(train_model, optimizer, scheduler, train_state=state)
    ckpt = Checkpointer(run.checkpoint_dir, config=args, config_ignore=IGNORED_KEYS, mode="max",
                        keep_latest_k=args.keep_latest_k, async_save=args.async_save)
    resumed = ckpt.load(app) if args.resume else None
    if resumed is not None:
        log.info("resumed from %s at step %d (best test_acc %s)", ckpt.step_dir(resumed), state.step, ckpt.best_metric)
    else:
        seed_everything(args.seed, rank=env.rank)  # per-rank streams (dropout) from here on
    metrics = MetricsLogger(run.metrics_path, resume_step=state.step if resumed is not None else None,
                            live=None if args.live == "none" else args.live)
    settings = LoopSettings(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=args.log_every,
                            save_every=args.save_every, grad_clip=args.grad_clip, samples_per_step=plan.global_batch,
                            preempt_at_step=args.preempt_at_step if env.rank == args.preempt_rank else None,
                            nonfinite_at_step=args.nonfinite_at_step)
    hooks = ExampleHooks(args, env, train_model, eval_model, train_loader, sampler, loader_gen, test_loader, plan,
                         metrics, log)
    with PreemptionHandler() as preempt, metrics:
        outcome = TrainLoop(settings, model=train_model, optimizer=optimizer, scheduler=scheduler, checkpointer=ckpt,
                            app_state=app, train_state=state, metrics=metrics, hooks=hooks, preempt=preempt,
                            throughput=Throughput(world_size=env.world_size), world_size=env.world_size).run()
        ckpt.close()
    if outcome == "finished" and env.is_main:
        for path in plot_run(run.root):
            log.info("wrote %s", path)
    run.release()
    return 1 if outcome == "diverged" else 0


if __name__ == "__main__":
    sys.exit(main())
