"""A complete, minimal train loop built from krause.training; the template for the families.

    python -m krause.training.example --out_dir runs/example
    torchrun --nproc_per_node 2 -m krause.training.example --out_dir runs/example --device cpu
    # preempted? run the same command again with --resume

It trains a small MLP classifier on synthetic data and shows every piece: torchrun
setup, per-rank seeding, the run directory, the global-batch check, AdamW groups,
warmup + cosine per step, DDP, a resumable sampler, JSON-lines metrics, rank-0
progress bars, last/best checkpoints, graceful preemption, and figures. The tests
use it to check that an interrupted and resumed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .checkpoint import CheckpointManager
from .config import RUNTIME_KEYS
from .data import ResumableDistributedSampler, reseed
from .distributed import (
    all_reduce_mean,
    all_reduce_sum,
    cleanup,
    init_distributed,
    per_rank_batch_size,
    unwrap_model,
    wrap_ddp,
)
from .metrics import MetricsLogger, close_logging, progress_bar, setup_logging
from .optim import build_adamw
from .plotting import plot_run
from .preemption import PreemptionHandler
from .run_dir import prepare_run_dir
from .schedule import warmup_cosine_scheduler, warmup_steps
from .seed import seed_everything


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear, logits divided by sigma = exp(log_sigma)."""

    def __init__(self, d_in: int, d_hidden: int, n_classes: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_hidden, n_classes)
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.norm(self.fc1(x))))) / self.log_sigma.exp()


def synthetic_data(n: int, d: int, n_classes: int, seed: int, teacher_seed: int) -> TensorDataset:
    """Gaussian inputs labelled by a fixed random linear teacher (identical on every rank)."""
    teacher = torch.randn(d, n_classes, generator=torch.Generator().manual_seed(teacher_seed))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


#: keys that do not change what is computed (the run may resume with other values)
IGNORED_KEYS = RUNTIME_KEYS | {"preempt_at_step", "preempt_rank"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoints/last.pt if present")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32, help="global batch size (all ranks)")
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
    p.add_argument(
        "--preempt_at_step", type=int, default=None, help="testing: send SIGTERM to one rank after this step"
    )
    p.add_argument("--preempt_rank", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    # every rank evaluated its own shard: sum over ranks (the release scored rank 0's shard only)
    loss_sum, correct, count = (all_reduce_sum(t) for t in (loss_sum, correct, count))
    return {"test_loss": (loss_sum / count).item(), "test_acc": (correct / count).item()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = init_distributed(args.device)
    finished = False
    try:
        code = _train(args, env)
        finished = True
        return code
    finally:
        close_logging()
        cleanup(synchronize=finished)


def _train(args: argparse.Namespace, env) -> int:
    local_batch = per_rank_batch_size(args.batch_size, env.world_size, name="--batch_size")
    run = prepare_run_dir(args.out_dir, args, resume=args.resume, overwrite=args.overwrite, ignore=IGNORED_KEYS)
    log = setup_logging(run.log_path)
    log.info("run directory %s, world size %d, device %s", run.root, env.world_size, env.device)

    seed_everything(args.seed, rank=0)  # identical initialisation on every rank
    model = TinyNet(args.dim, args.hidden, args.classes, args.dropout).to(env.device)
    train_set = synthetic_data(args.n_train, args.dim, args.classes, seed=1000 + args.seed, teacher_seed=args.seed)
    test_set = synthetic_data(args.n_test, args.dim, args.classes, seed=2000 + args.seed, teacher_seed=args.seed)

    sampler = ResumableDistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    loader_gen = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, drop_last=True, generator=loader_gen)
    test_sampler = ResumableDistributedSampler(test_set, shuffle=False)
    test_loader = DataLoader(test_set, batch_size=local_batch, sampler=test_sampler)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch

    optimizer = build_adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=warmup_steps(total_steps, epochs=args.warmup_epochs, steps_per_epoch=steps_per_epoch),
        min_lr_ratio=args.min_lr_ratio,
    )
    ckpt = CheckpointManager(run.checkpoint_dir, config=args, mode="max", config_ignore=IGNORED_KEYS)

    step = 0
    if args.resume:
        state = ckpt.load_last(model=model, optimizer=optimizer, scheduler=scheduler)
        if state is not None:
            step = state.step
            log.info("resumed from %s at step %d (best test_acc %s)", state.path, step, state.best_metric)
    if step == 0:
        seed_everything(args.seed, rank=env.rank)  # per-rank streams (dropout) from here on
    ddp_model = wrap_ddp(model, env)
    metrics = MetricsLogger(run.metrics_path, resume_step=step if step > 0 else None)

    result: dict[str, float] = {}
    with PreemptionHandler() as preempt, metrics:
        start_epoch, skip = divmod(step, steps_per_epoch)
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, skip=(skip if epoch == start_epoch else 0) * local_batch)
            reseed(loader_gen, args.seed, epoch, env.rank)
            ddp_model.train()
            bar = progress_bar(train_loader, enabled=not args.no_progress, desc=f"epoch {epoch}", leave=False)
            for x, y in bar:
                x, y = x.to(env.device), y.to(env.device)
                loss = F.cross_entropy(ddp_model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(ddp_model.parameters(), args.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                if step % args.log_every == 0:
                    metrics.log(
                        step=step,
                        epoch=step / steps_per_epoch,
                        train_loss=all_reduce_mean(loss.detach()).item(),
                        grad_norm=grad_norm.item(),
                        lr=scheduler.get_last_lr()[0],
                    )
                if args.preempt_at_step == step and env.rank == args.preempt_rank:
                    os.kill(os.getpid(), signal.SIGTERM)
                end_of_epoch = step % steps_per_epoch == 0
                if not end_of_epoch and preempt.should_stop():
                    ckpt.save(model=ddp_model, optimizer=optimizer, scheduler=scheduler, step=step, epoch=epoch)
                    log.info("stop requested (%s): saved step %d, exiting", preempt.reason, step)
                    return 0
            result = evaluate(ddp_model, test_loader, env.device)
            sigma = unwrap_model(ddp_model).log_sigma.exp().item()
            metrics.log(step=step, epoch=epoch + 1, sigma=sigma, **result)
            is_best = ckpt.save(
                model=ddp_model, optimizer=optimizer, scheduler=scheduler, step=step, epoch=epoch + 1,
                metric=result["test_acc"],
            )
            log.info(
                "epoch %d: test_loss %.4f test_acc %.4f sigma %.4f%s",
                epoch + 1, result["test_loss"], result["test_acc"], sigma, " (best)" if is_best else "",
            )
            if preempt.should_stop():
                log.info("stop requested (%s) at the end of epoch %d, exiting", preempt.reason, epoch + 1)
                return 0
    if env.is_main:
        for path in plot_run(run.root):
            log.info("wrote %s", path)
    return 0 if math.isfinite(result.get("test_loss", 0.0)) else 1


if __name__ == "__main__":
    sys.exit(main())
