"""Train a ViT/KViT or Swin/KSwin on CIFAR-10/100, ImageNet-1K or MNIST.

    python -m vision_transformers.train --model kvit-s --dataset cifar10 --data_path ~/data --out_dir runs/kvit_s
    torchrun --nproc_per_node 4 -m vision_transformers.train --model kvit-s-16 --dataset imagenet \\
        --data_path /path/to/imagenet --out_dir runs/kvit_s16
    # preempted or crashed? the same command with --resume continues where it stopped

Every recipe setting defaults to the recipe in docs/recipes.md for the chosen model and dataset
(``config.RECIPES``; ``--preset paper`` for the first release's choices; the resolved values are
written to <out_dir>/config.json) and is a flag. This file is the assembly only: flags, ranges and
recipes live in ``config.py``, data in ``data.py``, the loop's hooks in ``hooks.py``, the summary
and figures in ``report.py``, and ``krause.training.recipe`` runs the rest.

The run directory holds config.json, metrics.jsonl (per logged step: train loss, lr, grad
norm, img/s; per epoch: train/test loss and accuracy, top-1/top-5, sigma per layer, epoch
time, throughput), summary.json (params, FLOPs per image, train img/s, best accuracy),
train.log, checkpoints/ (DCP step directories, latest, best/) and figures/.

Fixed defects of the first release: ``DistributedSampler.set_epoch(epoch)`` (not the
rank); test metrics summed over every rank's shard (no sample counted twice); no weight
decay on log_sigma, norms, biases, position embeddings and the CLS token; baselines and
Krause models built by the same code; FLOPs counted with the sparse Krause formulas; exact
resume; nothing hard-coded about GPUs, ports or paths.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Sequence

import torch

from krause.training import (BatchPlan, LoopSettings, UsageError, cleanup, init_distributed, known_peak_flops,
                             read_metrics, warmup_steps)
from krause.training.entry import entry_point
from krause.training.recipe import OptimSpec, Recipe, run_recipe

from . import analysis
from .config import (IGNORED_KEYS, build_parser, model_kwargs, parse_args, read_saved_config, resolve_recipe,
                     run_config)
from .data import build_loaders, dataset_info
from .hooks import VisionHooks, evaluate
from .models import create
from .report import finish

__all__ = ["main", "build_parser", "resolve_recipe", "model_kwargs", "evaluate", "create"]


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.resume:  # a hand-edited or foreign config.json is refused before anything is written
            read_saved_config(args.out_dir)
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


def _train(args, env) -> int:
    t_start = time.time()
    plan = BatchPlan.from_global(args.batch_size, args.micro_batch_size, env.world_size, name="--batch_size")
    if (args.mixup > 0 or args.cutmix > 0) and args.mix_prob > 0 and plan.per_rank % 2:
        raise UsageError(f"--batch_size: MixUp/CutMix needs an even batch per rank, got {plan.per_rank} "
                         f"({args.batch_size} over {env.world_size} ranks)")
    if env.device.type != "cuda" and args.amp == "fp16":
        raise UsageError("--amp fp16 needs a CUDA device; use bf16 or none on CPU")
    data = build_loaders(args, plan.per_rank, pin_memory=env.device.type == "cuda")  # before the run dir
    info, steps_per_epoch = data.info, len(data.train)
    total_steps = args.epochs * steps_per_epoch
    flops: dict = {}

    def build():
        model = create(args.model, **model_kwargs(args, info))
        return model.to(memory_format=torch.channels_last) if args.channels_last else model

    def flops_per_sample(model):
        if args.no_flops:
            return None
        flops.update(analysis.flops_per_image(model))
        return flops["flops"] * 3  # forward + backward ~ 3x forward

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
            finish(ctx.run.root, ctx.model, data.val_set, info, args, ctx.log, time.time() - t_start)
        records = read_metrics(ctx.run.metrics_path) if env.is_main else []
        last = next((r for r in reversed(records) if "test_loss" in r), {})
        return 0 if math.isfinite(last.get("test_loss", 0.0)) else 1

    return run_recipe(Recipe(
        name="vision_transformers", args=args, config=run_config(args), ignore=IGNORED_KEYS, build_model=build,
        make_hooks=lambda ctx: VisionHooks(args, env, plan, ctx, data),
        settings=LoopSettings(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=args.log_every,
                              eval_every_epochs=args.eval_every, save_every=args.save_every_steps,
                              grad_clip=args.grad_clip, samples_per_step=plan.global_batch,
                              preempt_at_step=args.preempt_at_step),
        optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup=0.0, min_lr_ratio=args.min_lr_ratio,
                        warmup_steps=warmup_steps(total_steps, epochs=args.warmup_epochs,
                                                  steps_per_epoch=steps_per_epoch),
                        decay_all=args.decay_all),
        fp16_scaler=args.amp == "fp16", compile=args.compile, keep_latest_k=args.keep_latest_k, mode="max",
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else known_peak_flops(env.device),
        flops_per_sample=flops_per_sample, state_extra={"steps_per_epoch": steps_per_epoch},
        on_start=start, on_finish=done), args.device)


if __name__ == "__main__":
    sys.exit(main())
