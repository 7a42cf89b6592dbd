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
from pathlib import Path

import torch
import torch.nn.functional as F

from krause.training.accumulation import BatchPlan
from krause.training.config import RUNTIME_KEYS
from krause.training.distributed import get_world_size, is_main_process
from krause.training.entry import entry_point
from krause.training.loop import LoopSettings, TrainHooks
from krause.training.metrics import progress_bar, read_metrics
from krause.training.plotting import plot_curves, plot_series
from krause.training.recipe import OptimSpec, Recipe, run_recipe
from krause.training.run_dir import atomic_write_text
from krause.training.sigma import sigma_per_layer as _sigmas
from krause.training.throughput import known_peak_flops, train_flops_per_sample

from .common import UsageError, autocast, check_attn_impl, evaluate_bpd, resolve_device
from .config import build_train_parser, check_run_config, model_config, parse_train_args
from .data import load_pixels, train_batches
from .model import PixelTransformer

#: keys that say how a run executes, not what it computes: a run may resume with other values
IGNORED_KEYS = RUNTIME_KEYS | {"attn_impl", "micro_batch_size", "keep_latest_k", "eval_batch_size", "download",
                               "peak_tflops"}


def build_parser() -> argparse.ArgumentParser:
    return build_train_parser()


def parse_args(argv=None) -> argparse.Namespace:
    return parse_train_args(argv)


def check_saved_config(out_dir) -> None:
    """A resumed run's config.json passes the ranges its flags declare (a hand-edited file is refused)."""
    path = Path(out_dir).expanduser() / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # missing or unreadable: prepare_run_dir says what is wrong with the directory
    if isinstance(saved, dict):
        check_run_config(saved, str(path))


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
    check_attn_impl(cfg, device)
    if args.resume:
        check_saved_config(args.out_dir)
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
        self.total_steps = ctx.recipe.settings.total_steps

    def batches(self, epoch, start):
        batches = train_batches(len(self.train_px), self.args.batch_size, epoch, self.args.seed, self.rank, self.world)
        # the steps this epoch runs (the last one may end early at --max_steps); a bar line with rate
        # and ETA at most every 10 s when the output is a file, not a terminal
        steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        bar = progress_bar(total=steps, initial=start, enabled=not self.args.no_progress, unit="step", leave=False,
                           desc=f"epoch {epoch + 1}/{epochs}")
        try:
            for idx in batches[start:steps]:
                x = self.train_px[idx].to(self.device, non_blocking=True).long()
                yield list(x.split(self.plan.micro_batch))
                bar.update(1)
        finally:
            bar.close()

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

    def on_stop(self, state, reason):
        if reason == "non-finite loss":
            self.log.error(f"non-finite training loss at step {state.step}; stopping (the last checkpoint is older)")
            return
        self.metrics.log(step=state.step, event=f"stopped by {reason}")
        self.log.info(f"signal received: saved step {state.step} in {self.run.checkpoint_dir}; rerun with --resume")


if __name__ == "__main__":
    raise SystemExit(main())
