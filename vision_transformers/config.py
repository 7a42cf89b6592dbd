"""The training command line: flags (each numeric one with its valid range), recipes, presets.

    args = parse_args(["--model", "kvit-s", "--out_dir", "runs/x"])   # resolved and checked

Every numeric flag declares its range once, as its argparse ``type`` (``krause.training.ranges``);
``check_namespace`` applies the same ranges to the values the recipe and the preset fill in, and
``check_saved_config`` to a run's config.json (resume, compare). What a range cannot say
(``--warmup_epochs`` <= ``--epochs``, flags that exclude each other, a Krause flag on a
baseline) is checked in ``validate`` and ``model_kwargs``. Every refusal happens before
anything is written.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Sequence

from krause.dispatch import IMPLS
from krause.training import UsageError
from krause.training.config import RUNTIME_KEYS, without_defaults
from krause.training.entry import OneLineParser
from krause.training.ranges import (NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY,
                                    SEED, Range, check_config, check_namespace, read_run_config)

from .data import DATASETS
from .models import MODEL_DEFAULTS, resolve_model_name

__all__ = ["RECIPES", "COMMON", "PRESETS", "IGNORED_KEYS", "build_parser", "parse_args", "resolve_recipe",
           "validate", "model_kwargs", "check_saved_config", "run_config", "family"]

#: keys that do not change what a run computes: a run may be resumed with other values
IGNORED_KEYS = RUNTIME_KEYS | {"preempt_at_step", "save_every_steps", "no_flops", "figures", "threads", "attn_impl",
                               "peak_tflops", "micro_batch_size", "keep_latest_k"}

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
              mix_prob=1.0, amp="none", channels_last=False, decay_all=False)


@dataclass(frozen=True)
class Preset:
    """Flag values a preset sets when the command line leaves them unset, for the models it applies to."""

    description: str
    values: dict            # for every model
    kvit: dict              # for the KViT models only (the release's ViT baselines were pre-norm)
    by_model: dict          # registered name -> values


#: ``--preset paper``: the first release's choices where our default differs (README table).
PRESETS = {
    "paper": Preset(
        description="the first release's choices: post-norm KViT block, weight decay on every parameter, "
                    "KViT-B-16 sigma 9.0 (its release script)",
        values=dict(decay_all=True),
        kvit=dict(norm_placement="post"),
        by_model={"kvit_base_patch16_224": dict(sigma=9.0)},
    ),
}

DROP_RATE = Range(float, ge=0, lt=1)
LABEL_SMOOTHING = Range(float, ge=0, lt=1)


@dataclass(frozen=True)
class PositiveInts(Range):
    """Comma-separated integers >= 1 (Swin's per-stage depths / heads); a Range, so config checks see it."""

    kind: type = int
    ge: float | None = 1

    def __call__(self, text: str) -> list[int]:
        try:
            values = [int(t) for t in str(text).split(",") if t.strip()]
        except ValueError:
            values = []
        bad = [v for v in values if self.problem(v)]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
        return values


def family(model_name: str) -> str:
    return "swin" if "swin" in model_name else "vit"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m vision_transformers.train", description="Train a ViT/KViT or Swin/KSwin on "
                      "CIFAR-10/100, ImageNet-1K or MNIST.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="kvit-s",
                   help=f"registered name or paper alias ({', '.join(MODEL_DEFAULTS)}; kvit-s, vit-s-16, kswin-t, ...)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: the first release's choices where the defaults differ (README); flags still win")
    g.add_argument("--embed_dim", type=POSITIVE_INT, default=None, help="override the width (small configs)")
    g.add_argument("--depth", type=POSITIVE_INT, default=None, help="ViT: number of blocks")
    g.add_argument("--depths", type=PositiveInts(), default=None, help="Swin: blocks per stage, e.g. 2,2,6,2")
    g.add_argument("--num_heads", type=PositiveInts(), default=None,
                   help="heads (ViT: one number; Swin: one per stage)")
    g.add_argument("--patch_size", type=POSITIVE_INT, default=None)
    g.add_argument("--mlp_ratio", type=POSITIVE_FLOAT, default=None)
    g.add_argument("--drop_path", type=DROP_RATE, default=None, help="stochastic depth rate (model default 0.1)")
    g.add_argument("--sigma", type=POSITIVE_FLOAT, default=None, help="Krause: initial sigma (model default)")
    g.add_argument("--top_k", type=POSITIVE_INT, default=None, help="KViT: base top-k, layers use k..2k")
    g.add_argument("--top_k_schedule", choices=["linear", "constant"], default=None)
    g.add_argument("--radius", type=NONNEGATIVE_INT, default=None, help="KViT: neighbourhood radius")
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
    g.add_argument("--img_size", type=POSITIVE_INT, default=None, help="ImageNet input size (default 224)")
    g.add_argument("--train_subset", type=POSITIVE_INT, default=None, help="use a fixed random subset of N training images")
    g.add_argument("--val_subset", type=POSITIVE_INT, default=None, help="use a fixed random subset of N test images")
    g.add_argument("--num_workers", type=NONNEGATIVE_INT, default=None)
    g = p.add_argument_group("recipe (defaults: docs/recipes.md for the model and dataset)")
    g.add_argument("--epochs", type=POSITIVE_INT, default=None)
    g.add_argument("--batch_size", type=POSITIVE_INT, default=None, help="global batch size over all ranks")
    g.add_argument("--micro_batch_size", type=POSITIVE_INT, default=None,
                   help="per rank and forward; the global batch is accumulated (default: no accumulation)")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=None)
    g.add_argument("--min_lr_ratio", type=PROBABILITY, default=None, help="cosine floor as a fraction of lr")
    g.add_argument("--weight_decay", type=NONNEGATIVE_FLOAT, default=None)
    g.add_argument("--decay_all", action="store_true", default=None,
                   help="weight decay on every parameter, norms, biases, embeddings and sigma included (the first "
                        "release; default: those are exempt)")
    g.add_argument("--warmup_epochs", type=NONNEGATIVE_FLOAT, default=None, help="at most --epochs")
    g.add_argument("--grad_clip", type=NONNEGATIVE_FLOAT, default=None, help="max grad norm (0: off)")
    g.add_argument("--label_smoothing", type=LABEL_SMOOTHING, default=None)
    g.add_argument("--mixup", type=NONNEGATIVE_FLOAT, default=None, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=NONNEGATIVE_FLOAT, default=None, help="CutMix alpha (0: off)")
    g.add_argument("--cutmix_prob", type=PROBABILITY, default=None, help="per batch: CutMix with this prob, else MixUp")
    g.add_argument("--mix_prob", type=PROBABILITY, default=None, help="probability that a batch is mixed at all")
    g.add_argument("--re_prob", type=PROBABILITY, default=None, help="RandomErasing probability")
    g.add_argument("--randaugment", default=None, help="timm RandAugment spec, e.g. rand-m9-n2 ('' off)")
    g.add_argument("--color_jitter", type=NONNEGATIVE_FLOAT, default=None)
    g.add_argument("--no_augment", action="store_true", help="train on un-augmented images (crops, flips, ... off)")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", required=True, help="run directory (config, metrics, checkpoints, figures)")
    g.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="reuse an out_dir that holds another run")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None, help="autocast dtype")
    g.add_argument("--channels_last", action="store_true", default=None)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="torch CPU threads per process (default: torch's; 1 is fastest on a busy shared CPU)")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--eval_every", type=POSITIVE_INT, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--log_every", type=POSITIVE_INT, default=50, help="log train metrics every N steps")
    g.add_argument("--save_every_steps", type=NONNEGATIVE_INT, default=0,
                   help="also checkpoint every N steps (0: per epoch)")
    g.add_argument("--keep_latest_k", type=POSITIVE_INT, default=2,
                   help="step checkpoints kept (the best is kept apart)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--no_flops", action="store_true", help="skip counting FLOPs per image")
    g.add_argument("--peak_tflops", type=POSITIVE_FLOAT, default=None,
                   help="peak TFLOP/s of one device for MFU in the metrics (default: known GPUs' bf16 peak; none on CPU)")
    g.add_argument("--figures", choices=["all", "curves", "none"], default="all")
    g.add_argument("--preempt_at_step", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)  # tests: SIGTERM self
    return p


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from ``--preset`` (the model name already resolved)."""
    if args.preset is None:
        return args
    preset = PRESETS[args.preset]
    values = dict(preset.values)
    if args.model.startswith("kvit"):
        values.update(preset.kvit)
    values.update(preset.by_model.get(args.model, {}))
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left at None from the preset, then the recipe of (model family, dataset).

    An unset --warmup_epochs keeps the recipe's warmup when --epochs is at least the
    recipe's, and the recipe's warmup *fraction* of training when --epochs is shorter.
    """
    args.model = resolve_model_name(args.model)
    apply_preset(args)
    ds = "cifar" if args.dataset.startswith("cifar") else args.dataset
    recipe = {**COMMON, **RECIPES[(family(args.model), ds)]}
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
        args.num_workers = min(8 if args.dataset == "imagenet" else 4, os.cpu_count() or 1)
    return args


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The ranges on every value (flags, preset, recipe), then what ranges cannot say."""
    check_namespace(args, parser)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other (--resume continues the run in --out_dir, "
                         "--overwrite replaces it)")
    if args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup_epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}")
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The resolved, checked namespace of a training command line (UsageError otherwise)."""
    parser = build_parser()
    return validate(resolve_recipe(parser.parse_args(argv)), parser)


#: flags added after runs were made: left out of config.json at their default, so those runs still resume
LATER_FLAGS = {"preset": None, "decay_all": False}


def run_config(args: argparse.Namespace) -> dict:
    """The resolved config a run directory records (and resume compares)."""
    return without_defaults(vars(args), LATER_FLAGS)


def check_saved_config(cfg: dict, where) -> dict:
    """A run's loaded config.json, after the flags' ranges (one line naming the file otherwise)."""
    return check_config(cfg, build_parser(), str(where))


def read_saved_config(run) -> dict | None:
    """<run>/config.json checked by ``check_saved_config``; None when the run has none yet."""
    return read_run_config(run, build_parser())


def model_kwargs(args: argparse.Namespace, info) -> dict:
    """Constructor overrides for the registered model: data shape plus the flags given."""
    kw = dict(num_classes=info.num_classes, img_size=info.img_size, in_chans=info.in_chans)
    swin = family(args.model) == "swin"
    krause = args.model.startswith("k")
    direct = dict(embed_dim=args.embed_dim, patch_size=args.patch_size, mlp_ratio=args.mlp_ratio,
                  drop_path_rate=args.drop_path)
    if swin:
        direct.update(depths=args.depths, num_heads=args.num_heads)
        vit_only = [n for n in ("depth", "top_k", "top_k_schedule", "radius", "metric", "per_head_sigma", "norm_placement")
                    if getattr(args, n, None) is not None]
        _require(not vit_only, f"--{vit_only[0] if vit_only else ''} applies to ViT/KViT models, not {args.model}")
    else:
        _require(args.depths is None, f"--depths applies to Swin models; use --depth for {args.model}")
        if args.num_heads is not None:
            _require(len(args.num_heads) == 1, f"--num_heads takes one number for {args.model}, got {args.num_heads}")
        direct.update(depth=args.depth, num_heads=args.num_heads[0] if args.num_heads else None,
                      norm_placement=getattr(args, "norm_placement", None))
        if krause:
            direct.update(top_k=args.top_k, top_k_schedule=args.top_k_schedule, radius=args.radius,
                          metric=args.metric, per_head_sigma=args.per_head_sigma)
        else:
            given = [n for n in ("top_k", "top_k_schedule", "radius", "metric", "per_head_sigma")
                     if getattr(args, n) is not None]
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


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UsageError(message)
