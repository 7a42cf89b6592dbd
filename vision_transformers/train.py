"""Train a ViT/KViT or Swin/KSwin on CIFAR-10/100, ImageNet-1K or MNIST.

    python -m vision_transformers.train --model kvit-s --dataset cifar10 --data_path ~/data --out_dir runs/kvit_s
    torchrun --nproc_per_node 4 -m vision_transformers.train --model kvit-s-16 --dataset imagenet \\
        --data_path /path/to/imagenet --out_dir runs/kvit_s16
    # preempted or crashed? the same command with --resume continues where it stopped

Every recipe setting defaults to the recipe in docs/recipes.md for the chosen model and dataset
(see ``RECIPES``; the resolved values are written to <out_dir>/config.json) and is a
flag. The run directory holds config.json, metrics.jsonl (per logged step: train loss,
lr, grad norm, img/s; per epoch: train/test loss and accuracy, top-1/top-5, sigma per
layer, epoch time, throughput), summary.json (params, FLOPs per image, train img/s,
best accuracy), train.log, checkpoints/{last,best}.pt and figures/.

Fixed defects of the first release: ``DistributedSampler.set_epoch(epoch)`` (not the
rank); test metrics summed over every rank's shard (no sample counted twice); no weight
decay on log_sigma, norms, biases, position embeddings and the CLS token; baselines and
Krause models built by the same code; FLOPs counted with the sparse Krause formulas; exact
resume; nothing hard-coded about GPUs, ports or paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from krause.dispatch import IMPLS
from krause.training import (
    BatchPlan,
    LoopSettings,
    ShardSampler,
    TrainHooks,
    UsageError,
    all_reduce_sum,
    cleanup,
    ignore_sigint,
    init_distributed,
    known_peak_flops,
    progress_bar,
    read_metrics,
    sigma_per_layer,
    split_micro_batches,
    warmup_steps,
)
from krause.training.entry import entry_point
from krause.training.recipe import OptimSpec, Recipe, run_recipe
from krause.training.config import RUNTIME_KEYS
from krause.training.data import ResumableDistributedSampler, reseed

from . import analysis
from .data import DATASETS, build_datasets, dataset_info
from .models import MODEL_DEFAULTS, create, resolve_model_name

#: keys that do not change what a run computes: a run may be resumed with other values
IGNORED_KEYS = RUNTIME_KEYS | {"preempt_at_step", "save_every_steps", "no_flops", "figures", "threads", "attn_impl",
                               "peak_tflops",
                               "micro_batch_size", "keep_latest_k"}

# --------------------------------------------------------------------------- recipes
#: docs/recipes.md defaults: (model family, dataset) -> values of the flags left unset
RECIPES = {
    ("vit", "cifar"): dict(epochs=300, batch_size=256, lr=3e-4, weight_decay=0.05, warmup_epochs=10,
                           re_prob=0.0, randaugment="", color_jitter=0.0),
    ("swin", "cifar"): dict(epochs=300, batch_size=256, lr=2e-3, weight_decay=0.01, warmup_epochs=20,
                            re_prob=0.25, randaugment="", color_jitter=0.0),
    # 256 per GPU x 4 GPUs; KViT lr 5e-4 (the paper's choice), ViT 1e-3; B adds ColorJitter 0.4
    ("vit", "imagenet"): dict(epochs=300, batch_size=1024, lr=1e-3, weight_decay=0.05, warmup_epochs=10,
                              re_prob=0.25, randaugment="rand-m9-n2", color_jitter=0.0, amp="bf16",
                              channels_last=True),
    ("swin", "imagenet"): dict(epochs=300, batch_size=1024, lr=1e-3, weight_decay=0.05, warmup_epochs=20,
                               re_prob=0.25, randaugment="rand-m9-n2", color_jitter=0.0, amp="bf16",
                               channels_last=True),
    # Not in the paper: a short recipe for the small MNIST runs (no mixing: it slows short runs down)
    ("vit", "mnist"): dict(epochs=10, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=1,
                           re_prob=0.0, randaugment="", color_jitter=0.0, mixup=0.0, cutmix=0.0),
    ("swin", "mnist"): dict(epochs=10, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=1,
                            re_prob=0.0, randaugment="", color_jitter=0.0, mixup=0.0, cutmix=0.0),
}
COMMON = dict(min_lr_ratio=0.0, grad_clip=1.0, label_smoothing=0.1, mixup=0.8, cutmix=1.0, cutmix_prob=0.8,
              mix_prob=1.0, amp="none", channels_last=False)


def _family(model_name: str) -> str:
    return "swin" if "swin" in model_name else "vit"


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left at None from the recipe of (model family, dataset).

    An unset --warmup_epochs keeps the recipe's warmup when --epochs is at least the
    recipe's, and the recipe's warmup *fraction* of training when --epochs is shorter.
    """
    args.model = resolve_model_name(args.model)
    ds = "cifar" if args.dataset.startswith("cifar") else args.dataset
    recipe = {**COMMON, **RECIPES[(_family(args.model), ds)]}
    if args.dataset == "imagenet":
        if args.model.startswith("kvit"):
            recipe["lr"] = 5e-4
        if "base" in args.model:
            recipe["color_jitter"] = 0.4
    if args.warmup_epochs is None and args.epochs is not None and args.epochs < recipe["epochs"]:
        # a shorter run keeps the recipe's warmup *fraction* (10 of 300 epochs -> 1 of 30)
        recipe["warmup_epochs"] = recipe["warmup_epochs"] * args.epochs / recipe["epochs"]
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if args.dataset == "imagenet" else min(4, os.cpu_count() or 1)
    return args


# --------------------------------------------------------------------------- arguments
def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vision_transformers.train", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="kvit-s",
                   help=f"registered name or paper alias ({', '.join(MODEL_DEFAULTS)}; kvit-s, vit-s-16, kswin-t, ...)")
    g.add_argument("--embed_dim", type=int, default=None, help="override the width (small configs)")
    g.add_argument("--depth", type=int, default=None, help="ViT: number of blocks")
    g.add_argument("--depths", type=_csv_ints, default=None, help="Swin: blocks per stage, e.g. 2,2,6,2")
    g.add_argument("--num_heads", type=_csv_ints, default=None, help="heads (ViT: one number; Swin: one per stage)")
    g.add_argument("--patch_size", type=int, default=None)
    g.add_argument("--mlp_ratio", type=float, default=None)
    g.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (model default 0.1)")
    g.add_argument("--sigma", type=float, default=None, help="Krause: initial sigma (model default)")
    g.add_argument("--top_k", type=int, default=None, help="KViT: base top-k, layers use k..2k")
    g.add_argument("--top_k_schedule", choices=["linear", "constant"], default=None)
    g.add_argument("--radius", type=int, default=None, help="KViT: neighbourhood radius")
    g.add_argument("--metric", choices=["manhattan", "chebyshev"], default=None, help="KViT: neighbourhood metric")
    g.add_argument("--per_head_sigma", action="store_true", default=None, help="KViT: one sigma per head")
    g.add_argument("--attn_impl", choices=IMPLS, default="auto", help="Krause models: implementation of the Krause op")
    g.add_argument("--norm_placement", choices=["pre", "post"], default=None,
                   help="ViT/KViT block: pre-norm (default) or the paper's post-norm KViT block (both twins alike)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="cifar10")
    g.add_argument("--data_path", default=None, help="dataset folder (mnist without it: the embedded digits)")
    g.add_argument("--no_download", action="store_true", help="never download a missing dataset")
    g.add_argument("--no_checksum", action="store_true", help="CIFAR: accept batch files whose md5 differs")
    g.add_argument("--img_size", type=int, default=None, help="ImageNet input size (default 224)")
    g.add_argument("--train_subset", type=int, default=None, help="use a fixed random subset of N training images")
    g.add_argument("--val_subset", type=int, default=None, help="use a fixed random subset of N test images")
    g.add_argument("--num_workers", type=int, default=None)
    g = p.add_argument_group("recipe (defaults: docs/recipes.md for the model and dataset)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=None, help="global batch size over all ranks")
    g.add_argument("--micro_batch_size", type=int, default=None,
                   help="per rank and forward; the global batch is accumulated (default: no accumulation)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min_lr_ratio", type=float, default=None, help="cosine floor as a fraction of lr")
    g.add_argument("--weight_decay", type=float, default=None)
    g.add_argument("--warmup_epochs", type=float, default=None)
    g.add_argument("--grad_clip", type=float, default=None, help="max grad norm (0: off)")
    g.add_argument("--label_smoothing", type=float, default=None)
    g.add_argument("--mixup", type=float, default=None, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="CutMix alpha (0: off)")
    g.add_argument("--cutmix_prob", type=float, default=None, help="per batch: CutMix with this prob, else MixUp")
    g.add_argument("--mix_prob", type=float, default=None, help="probability that a batch is mixed at all")
    g.add_argument("--re_prob", type=float, default=None, help="RandomErasing probability")
    g.add_argument("--randaugment", default=None, help="timm RandAugment spec, e.g. rand-m9-n2 ('' off)")
    g.add_argument("--color_jitter", type=float, default=None)
    g.add_argument("--no_augment", action="store_true", help="train on un-augmented images (crops, flips, ... off)")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", required=True, help="run directory (config, metrics, checkpoints, figures)")
    g.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="reuse an out_dir that holds another run")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None, help="autocast dtype")
    g.add_argument("--channels_last", action="store_true", default=None)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: torch's; 1 is fastest on a busy shared CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--log_every", type=int, default=50, help="log train metrics every N steps")
    g.add_argument("--save_every_steps", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    g.add_argument("--keep_latest_k", type=int, default=2, help="step checkpoints kept (the best is kept apart)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--no_flops", action="store_true", help="skip counting FLOPs per image")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU in the metrics (default: known GPUs' bf16 peak; none on CPU)")
    g.add_argument("--figures", choices=["all", "curves", "none"], default="all")
    g.add_argument("--preempt_at_step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGTERM self
    return p


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate(args: argparse.Namespace) -> None:
    """One-line errors for values out of range (after the recipe is resolved)."""
    _require(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    _require(args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}")
    _require(math.isfinite(args.lr) and args.lr > 0, f"--lr must be > 0, got {args.lr}")
    _require(args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    _require(0 <= args.warmup_epochs <= args.epochs,
             f"--warmup_epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}")
    _require(0 <= args.min_lr_ratio <= 1, f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    _require(args.grad_clip >= 0, f"--grad_clip must be >= 0, got {args.grad_clip}")
    _require(0 <= args.label_smoothing < 1, f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    for name in ("mixup", "cutmix"):
        _require(getattr(args, name) >= 0, f"--{name} alpha must be >= 0, got {getattr(args, name)}")
    for name in ("cutmix_prob", "mix_prob", "re_prob"):
        _require(0 <= getattr(args, name) <= 1, f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.sigma is not None:
        _require(math.isfinite(args.sigma) and args.sigma > 0, f"--sigma must be a finite number > 0, got {args.sigma}")
    if args.top_k is not None:
        _require(args.top_k >= 1, f"--top_k must be >= 1, got {args.top_k}")
    if args.radius is not None:
        _require(args.radius >= 0, f"--radius must be >= 0, got {args.radius}")
    if args.drop_path is not None:
        _require(0 <= args.drop_path < 1, f"--drop_path must be in [0, 1), got {args.drop_path}")
    for name in ("num_workers", "eval_every", "log_every", "save_every_steps"):
        _require(getattr(args, name) >= (1 if name in ("eval_every", "log_every") else 0),
                 f"--{name} must be >= {1 if name in ('eval_every', 'log_every') else 0}, got {getattr(args, name)}")
    _require(args.peak_tflops is None or args.peak_tflops > 0, f"--peak_tflops must be > 0, got {args.peak_tflops}")
    _require(args.keep_latest_k >= 1, f"--keep_latest_k must be >= 1, got {args.keep_latest_k}")
    if args.micro_batch_size is not None:
        _require(args.micro_batch_size >= 1, f"--micro_batch_size must be >= 1, got {args.micro_batch_size}")
    for name in ("train_subset", "val_subset"):
        v = getattr(args, name)
        _require(v is None or v >= 1, f"--{name} must be >= 1, got {v}")


def model_kwargs(args: argparse.Namespace, info) -> dict:
    """Constructor overrides for the registered model: data shape plus the flags given."""
    kw = dict(num_classes=info.num_classes, img_size=info.img_size, in_chans=info.in_chans)
    swin = _family(args.model) == "swin"
    krause = args.model.startswith("k")
    direct = dict(embed_dim=args.embed_dim, patch_size=args.patch_size, mlp_ratio=args.mlp_ratio,
                  drop_path_rate=args.drop_path)
    if swin:
        direct.update(depths=args.depths, num_heads=args.num_heads)
        vit_only = [n for n in ("depth", "top_k", "top_k_schedule", "radius", "metric", "per_head_sigma", "norm_placement")
                    if getattr(args, n) is not None]
        _require(not vit_only, f"--{vit_only[0] if vit_only else ''} applies to ViT/KViT models, not {args.model}")
    else:
        _require(args.depths is None, f"--depths applies to Swin models; use --depth for {args.model}")
        if args.num_heads is not None:
            _require(len(args.num_heads) == 1, f"--num_heads takes one number for {args.model}, got {args.num_heads}")
        direct.update(depth=args.depth, num_heads=args.num_heads[0] if args.num_heads else None,
                      norm_placement=args.norm_placement)
        if krause:
            direct.update(top_k=args.top_k, top_k_schedule=args.top_k_schedule, radius=args.radius,
                          metric=args.metric, per_head_sigma=args.per_head_sigma)
        else:
            given = [n for n in ("top_k", "top_k_schedule", "radius", "metric", "per_head_sigma") if getattr(args, n) is not None]
            _require(not given, f"--{given[0] if given else ''} applies to Krause models, not the baseline {args.model}")
    if args.sigma is not None:
        _require(krause, f"--sigma applies to Krause models, not the baseline {args.model}")
        direct["sigma"] = args.sigma
    if getattr(args, "attn_impl", "auto") != "auto":
        _require(krause, f"--attn_impl applies to Krause models, not the baseline {args.model}")
    if krause:
        direct["attn_impl"] = getattr(args, "attn_impl", "auto")
    kw.update({k: v for k, v in direct.items() if v is not None})
    return kw


# --------------------------------------------------------------------------- evaluation
def _autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, amp: str, channels_last: bool) -> dict:
    """Loss, top-1 and top-5 accuracy over the whole test set (every rank's shard, summed)."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        sums += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (top[:, 0] == y).sum().double(),
            (top == y[:, None]).any(1).sum().double(),
            y.new_full((), y.numel(), dtype=torch.float64),
        ])
    sums = all_reduce_sum(sums)
    model.train(was)
    loss, top1, top5, n = sums.tolist()
    return {"test_loss": loss / n, "test_acc1": top1 / n, "test_acc5": top5 / n, "test_samples": int(n)}


# --------------------------------------------------------------------------- main
@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolve_recipe(args)
        validate(args)
        if args.threads is not None:
            _require(args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        # Model arguments checked on the meta device (no memory, no init), before any data is read.
        with torch.device("meta"):
            create(args.model, **model_kwargs(args, dataset_info(args.dataset, args.img_size)))
        # before any process group exists: a global batch that does not split over the ranks
        BatchPlan.from_global(args.batch_size, args.micro_batch_size, int(os.environ.get("WORLD_SIZE", "1") or 1),
                              name="--batch_size")
        try:
            env = init_distributed(args.device)
        except RuntimeError as e:
            raise UsageError(f"could not set up the {args.device or 'default'} device / process group: {e}") from None
        return _train(args, env)
    finally:
        cleanup()  # a no-op once run_recipe has torn the process group down


class VisionHooks(TrainHooks):
    """Image classification: MixUp / CutMix per global batch, epoch sums of loss and accuracy,
    top-1 / top-5 on every rank's test shard summed."""

    def __init__(self, args, env, plan, model, fwd, eval_fwd, train_set, sampler, loader, loader_gen, val_loader,
                 mixup_fn, criterion, metrics, log, ckpt, steps_per_epoch):
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        # this rank's part of the epoch sums since the last sync: loss * n, correct, count
        self.local = torch.zeros(3, dtype=torch.float64, device=env.device)
        self.t_epoch: float | None = time.perf_counter()

    def batches(self, epoch, start):
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=start * self.plan.per_rank)
        reseed(self.loader_gen, self.args.seed, epoch, self.env.rank)
        self.t_epoch = time.perf_counter()
        self.fwd.train()
        bar = progress_bar(self.loader, enabled=not self.args.no_progress,
                           desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False, initial=start,
                           total=self.steps_per_epoch)
        for x, y in bar:
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            target = y
            if self.mixup_fn is not None:
                x, target = self.mixup_fn(x, y)
            if self.args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield split_micro_batches((x, target, y), self.plan.accum_steps)

    def train_step(self, micro):
        x, target, y = micro
        with _autocast(self.env.device, self.args.amp):
            logits = self.fwd(x)
            loss = self.criterion(logits.float(), target)
        with torch.no_grad():
            hard = target.argmax(1) if target.dim() == 2 else target
            correct = (logits.argmax(1) == hard).sum().double()
        return loss * y.numel(), y.numel(), correct

    def after_step(self, state, result):
        n = float(result.count) / self.env.world_size  # this rank's share of the global batch
        self.local += torch.stack([result.loss.detach().double().to(self.local.device) * n,
                                   sum(result.outputs).to(self.local.device),
                                   torch.tensor(n, dtype=torch.float64, device=self.local.device)])

    def sync_state(self, state):
        glob = all_reduce_sum(self.local).tolist()
        self.local.zero_()
        state.add(loss=glob[0], correct=glob[1], count=glob[2])
        if self.t_epoch is not None:  # inside an epoch (not between its end and the next one)
            state.add(train_time=time.perf_counter() - self.t_epoch)
            self.t_epoch = time.perf_counter()

    def step_record(self, state, window):
        record = dict(train_loss=window["train_loss"], lr=window["lr"], img_per_s=window["samples_per_s"])
        if "grad_norm" in window:
            record["grad_norm"] = window["grad_norm"]
        for key in ("tflops_per_device", "mfu"):
            if key in window:
                record[key] = window[key]
        return record

    def epoch_record(self, state):
        self.sync_state(state)
        self.t_epoch = None
        acc = state.pop_sums("loss", "correct", "count", "train_time")
        record = dict(train_loss=acc["loss"] / acc["count"], train_acc=acc["correct"] / acc["count"],
                      epoch_time=acc["train_time"], img_per_s=acc["count"] / max(acc["train_time"], 1e-9),
                      lr=self.lr_fn())
        sig = analysis.sigma_summary(self.model)
        if sig:
            record["sigma"] = sig
        return record

    def evaluate(self, state):
        t_eval = time.perf_counter()
        result = evaluate(self.eval_fwd, self.val_loader, self.env.device, self.args.amp, self.args.channels_last)
        result["eval_time"] = time.perf_counter() - t_eval
        return result

    def selection_metric(self, result):
        return result.get("test_acc1")

    def on_eval(self, state, record, is_best, where):
        if not math.isfinite(record.get("train_loss", 0.0)):
            self.log.error("non-finite training loss in epoch %d", state.epoch)
        record["best_acc1"] = self.ckpt.best_metric
        self.metrics.log(step=state.step, epoch=state.epoch, **record)
        sig = record.get("sigma")
        self.log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %s acc1 %s acc5 %s%s | %.0f img/s%s",
                      state.epoch, self.args.epochs, record.get("train_loss", float("nan")),
                      record.get("train_acc", float("nan")), _fmt(record.get("test_loss")),
                      _fmt(record.get("test_acc1")), _fmt(record.get("test_acc5")), " (best)" if is_best else "",
                      record.get("img_per_s", 0.0), f" | sigma {_fmt_sigma(sig)}" if sig else "")

    def on_diverged(self, state, message):
        self.log.error(message)

    def on_stop(self, state, reason):
        self.log.info("stop requested (%s): saved step %d in %s, exiting; continue with --resume", reason,
                      state.step, self.ckpt.directory)


def _train(args: argparse.Namespace, env) -> int:
    t_start = time.time()
    plan = BatchPlan.from_global(args.batch_size, args.micro_batch_size, env.world_size, name="--batch_size")
    mixing = (args.mixup > 0 or args.cutmix > 0) and args.mix_prob > 0
    if mixing and plan.per_rank % 2:
        raise UsageError(f"--batch_size: MixUp/CutMix needs an even batch per rank, got {plan.per_rank} "
                         f"({args.batch_size} over {env.world_size} ranks)")
    if env.device.type != "cuda" and args.amp == "fp16":
        raise UsageError("--amp fp16 needs a CUDA device; use bf16 or none on CPU")

    # Data first: bad input fails before the run directory is touched.
    augment = dict(randaugment=args.randaugment or None, color_jitter=args.color_jitter, re_prob=args.re_prob,
                   enabled=not args.no_augment)
    data_root = os.path.abspath(os.path.expanduser(args.data_path)) if args.data_path else None
    created = data_root  # the topmost folder of data_root that does not exist yet (None: all exist)
    while created is not None and not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    existed = data_root is None or os.path.exists(data_root)
    try:
        train_set, val_set, info = build_datasets(
            args.dataset, args.data_path, img_size=args.img_size, download=not args.no_download,
            verify_checksums=not args.no_checksum, train_subset=args.train_subset, val_subset=args.val_subset,
            seed=args.seed, augment=augment,
        )
    except BaseException:
        if not existed:
            _remove_empty_dirs(created)  # a failed download leaves no empty data folder behind
        raise
    if len(train_set) < args.batch_size:
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(train_set)} training images")

    sampler = ResumableDistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    loader_gen = torch.Generator()
    workers = dict(num_workers=args.num_workers, pin_memory=env.device.type == "cuda",
                   worker_init_fn=ignore_sigint if args.num_workers else None)
    train_loader = DataLoader(train_set, batch_size=plan.per_rank, sampler=sampler, drop_last=True,
                              generator=loader_gen, **workers)
    val_loader = DataLoader(val_set, batch_size=plan.per_rank, sampler=ShardSampler(len(val_set)), **workers)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    mixup_fn = None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if mixing:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mix_prob,
                         switch_prob=args.cutmix_prob if args.mixup > 0 and args.cutmix > 0 else 0.5,
                         mode="batch", label_smoothing=args.label_smoothing, num_classes=info.num_classes)
        criterion = SoftTargetCrossEntropy()
    flops: dict = {}

    def build():
        model = create(args.model, **model_kwargs(args, info))
        return model.to(memory_format=torch.channels_last) if args.channels_last else model

    def flops_per_sample(model):
        if args.no_flops:
            return None
        flops.update(analysis.flops_per_image(model))
        return flops["flops"] * 3  # forward + backward ~ 3x forward

    def make_hooks(ctx):
        hooks = VisionHooks(args, env, plan, ctx.model, ctx.train_model, ctx.eval_model, train_set, sampler,
                            train_loader, loader_gen, val_loader, mixup_fn, criterion, ctx.metrics, ctx.log,
                            ctx.checkpointer, steps_per_epoch)
        hooks.lr_fn = lambda: ctx.scheduler.get_last_lr()[0]
        return hooks

    def start(ctx):
        log = ctx.log
        log.info("run %s | %s on %s (%s) | world size %d, device %s", ctx.run.root, args.model, args.dataset,
                 info.source, env.world_size, env.device)
        log.info("%s: %.2fM parameters, %d train / %d test images, %d classes; batch %d = %d micro x %d accum x %d "
                 "ranks", args.model, ctx.n_params / 1e6, info.train_size, info.val_size, info.num_classes,
                 plan.global_batch, plan.micro_batch, plan.accum_steps, env.world_size)
        if flops:
            log.info("FLOPs per image: %s (%s multiply-adds), attention %s", analysis.format_flops(flops["flops"]),
                     analysis.format_flops(flops["macs"]), analysis.format_flops(flops["attention_flops"]))
        if env.is_main and ctx.resumed is None:
            summary = dict(model=args.model, dataset=args.dataset, params=analysis.count_params(ctx.model),
                           flops_per_image=flops or None, world_size=env.world_size, device=str(env.device))
            (ctx.run.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def done(ctx):
        if env.is_main:
            finish(ctx.run.root, ctx.model, val_set, info, args, ctx.log, time.time() - t_start)
        records = read_metrics(ctx.run.metrics_path) if env.is_main else []
        last = next((r for r in reversed(records) if "test_loss" in r), {})
        return 0 if math.isfinite(last.get("test_loss", 0.0)) else 1

    return run_recipe(Recipe(
        name="vision_transformers", args=args, config=vars(args), ignore=IGNORED_KEYS, build_model=build,
        make_hooks=make_hooks,
        settings=LoopSettings(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=args.log_every,
                              eval_every_epochs=args.eval_every, save_every=args.save_every_steps,
                              grad_clip=args.grad_clip, samples_per_step=plan.global_batch,
                              preempt_at_step=args.preempt_at_step),
        optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup=0.0, min_lr_ratio=args.min_lr_ratio,
                        warmup_steps=warmup_steps(total_steps, epochs=args.warmup_epochs,
                                                  steps_per_epoch=steps_per_epoch)),
        fp16_scaler=args.amp == "fp16", compile=args.compile, keep_latest_k=args.keep_latest_k, mode="max",
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else known_peak_flops(env.device),
        flops_per_sample=flops_per_sample, state_extra={"steps_per_epoch": steps_per_epoch},
        on_start=start, on_finish=done), args.device)


def _remove_empty_dirs(root: str) -> None:
    """Remove `root` and the folders under it when nothing but empty folders is there."""
    for dirpath, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            return


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_sigma(sig: list) -> str:
    flat = [sum(s) / len(s) if isinstance(s, list) else s for s in sig]
    return "[" + " ".join(f"{s:.2f}" for s in flat) + "]"


def finish(root, model, val_set, info, args, log, wall_s: float) -> dict:
    """Summary (params, FLOPs, throughput, accuracy) and figures, on rank 0 after training."""
    records = read_metrics(root / "metrics.jsonl")
    epochs = [r for r in records if "train_acc" in r]
    evals = [r for r in epochs if "test_acc1" in r]
    path = root / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    total_images = sum(r["img_per_s"] * r["epoch_time"] for r in epochs)
    total_time = sum(r["epoch_time"] for r in epochs)
    summary.update(
        params=analysis.count_params(model),
        train_img_per_s=total_images / total_time if total_time else None,
        train_time_s=total_time,
        final_acc1=evals[-1]["test_acc1"] if evals else None,
        final_acc5=evals[-1]["test_acc5"] if evals else None,
        best_acc1=max((r["test_acc1"] for r in evals), default=None),
        sigma=sigma_per_layer(model) or None,
        epochs=len(epochs),
    )
    if summary.get("flops_per_image") is None and not args.no_flops:
        summary["flops_per_image"] = analysis.flops_per_image(model)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if args.figures != "none" and evals:
        fig_dir = root / "figures"
        written = [analysis.plot_run_curves({args.model: records}, fig_dir / "curves.png", title=args.model)]
        if any("sigma" in r for r in epochs):
            written.append(analysis.plot_sigma(epochs, fig_dir / "sigma.png", title=f"{args.model}: sigma per layer"))
        if args.figures == "all" and analysis.has_attention_maps(model):
            images = torch.stack([val_set[i][0] for i in range(min(2, len(val_set)))])
            device = next(model.parameters()).device
            written.append(analysis.plot_attention_maps(
                {args.model: model}, images.to(device), fig_dir / "attention.png", mean=info.mean, std=info.std))
        for p in written:
            log.info("wrote %s", p)
    log.info("done in %.1f s: best test acc1 %s, %.1f train img/s", wall_s, _fmt(summary["best_acc1"]),
             summary["train_img_per_s"] or 0.0)
    return summary


if __name__ == "__main__":
    sys.exit(main())
