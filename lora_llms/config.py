"""The settings of ``lora_llms.train``: its flags (each numeric one with its valid range, declared
once with ``krause.training.ranges``), the ``paper`` preset and the checks that span flags.

Defaults are the paper's recipe with the first release's defects fixed; ``--preset paper``
puts back the release's own choices where the default differs (see ``PRESETS`` and the README's
table), and any flag given on the command line still wins over the preset.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from krause.dispatch import IMPLS
from krause.training.config import RUNTIME_KEYS
from krause.training.errors import UsageError
from krause.training.ranges import (
    NONNEGATIVE_FLOAT,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SEED,
    Range,
    check_namespace,
)

from .cli import parser as one_line_parser

MODES = ("lora", "krause")
FRACTION = Range(float, ge=0, lt=1)  # dropout, warmup ratio

# what the first release did where the defaults here differ (README: "the paper preset")
PRESETS = {
    "paper": {
        "freeze_sigma": True,  # the release's log_sigma was a bare parameter peft froze: sigma stayed at 5.5
        "label_eos": False,  # the release padded with EOS and masked padding by id, so EOS was never a label
    },
}

# settings that do not change what is trained: a resumed launch may change them
IGNORED_KEYS = (*RUNTIME_KEYS, "kill_at_step", "num_proc", "logging_steps", "eval_steps", "save_steps",
                "save_total_limit", "world_size")


def build_parser() -> argparse.ArgumentParser:
    p = one_line_parser("lora_llms.train", "LoRA / Krause-LoRA fine-tuning on FLAN v2")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--model", required=True, help="pretrained model path or hub id")
    p.add_argument("--data_dir", required=True, help="folder of FLAN *.jsonl.gz / *.jsonl / *.json / *.parquet")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir, if any")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'paper': the first release's choices where the defaults differ (flags still override)")
    # data
    p.add_argument("--num_train", type=POSITIVE_INT, default=50_000)
    p.add_argument("--num_eval", type=NONNEGATIVE_INT, default=5_000)
    p.add_argument("--shuffle_seed", type=SEED, default=3407)
    p.add_argument("--max_length", type=POSITIVE_INT, default=2048, help="at most the model's positions")
    p.add_argument("--label_eos", action=argparse.BooleanOptionalAction, default=True,
                   help="train on the EOS that ends each response (--no-label_eos: the release's masking)")
    # Krause patch
    p.add_argument("--mix", choices=("gated", "krause"), default="gated")
    p.add_argument("--window", type=POSITIVE_INT, default=32)
    p.add_argument("--top_k", type=POSITIVE_INT, default=16, help="at most --window")
    p.add_argument("--sigma", type=POSITIVE_FLOAT, default=5.5)
    p.add_argument("--impl", choices=IMPLS, default="auto", help="core op implementation (krause.dispatch)")
    p.add_argument("--freeze_sigma", action=argparse.BooleanOptionalAction, default=False,
                   help="keep sigma at --sigma (the release's behaviour); by default it trains")
    # LoRA
    p.add_argument("--lora_r", type=POSITIVE_INT, default=16)
    p.add_argument("--lora_alpha", type=POSITIVE_INT, default=32)
    p.add_argument("--lora_dropout", type=FRACTION, default=0.1)
    # optimisation
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=5e-5)
    p.add_argument("--epochs", type=POSITIVE_FLOAT, default=2.0)
    p.add_argument("--max_steps", type=Range(int, ge=-1), default=-1,
                   help="stop after this many optimizer steps (-1: train for --epochs)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=4, help="per device")
    p.add_argument("--grad_accum", type=POSITIVE_INT, default=8)
    p.add_argument("--warmup_ratio", type=FRACTION, default=0.1)
    p.add_argument("--weight_decay", type=NONNEGATIVE_FLOAT, default=0.01)
    p.add_argument("--grad_clip", type=NONNEGATIVE_FLOAT, default=1.0,
                   help="max gradient norm (Trainer's default; 0: no clipping)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype the base model is loaded in (default: bf16/fp16 as --precision, else fp32)")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--fsdp", default="", help="Trainer FSDP options, e.g. 'full_shard auto_wrap' ('' = DDP)")
    p.add_argument("--seed", type=SEED, default=42)
    p.add_argument("--logging_steps", type=POSITIVE_INT, default=10)
    p.add_argument("--eval_steps", type=POSITIVE_INT, default=500)
    p.add_argument("--save_steps", type=POSITIVE_INT, default=500)
    p.add_argument("--save_total_limit", type=POSITIVE_INT, default=3)
    p.add_argument("--num_workers", type=NONNEGATIVE_INT, default=2)
    p.add_argument("--num_proc", type=POSITIVE_INT, default=None, help="processes for tokenization")
    p.add_argument("--kill_at_step", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags (a preset's values below the command line's), range-checked, cross-checked."""
    p = build_parser()
    known, _ = p.parse_known_args(argv)  # the preset first: its values become the defaults
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    args = check_namespace(p.parse_args(argv), p)
    if args.max_steps == 0:
        raise UsageError("--max_steps must be -1 (train for --epochs) or >= 1, got 0")
    if args.top_k > args.window:
        raise UsageError(f"--top_k ({args.top_k}) must be at most --window ({args.window})")
    return args


def model_dtype(args) -> str:
    return args.dtype or {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.precision]


def check_before_writing(args) -> None:
    """What can be refused from the flags and the files alone, before anything is built or written."""
    from krause.training.ranges import read_run_config

    from . import cli

    if args.resume:  # a resumed run's saved settings obey today's ranges too
        read_run_config(args.out_dir, build_parser())
    lock = Path(args.out_dir).expanduser() / ".lock"
    if lock.is_file() and int(os.environ.get("RANK", "0")) == 0:  # another trainer: refused now, not after loading
        from krause.training.lock import RunLock

        RunLock(lock).acquire().release()  # the one lock logic (a stale lock is taken over and dropped)
    cli.check_model_dir(args.model)
    cli.check_tokenizer(args.model)
    if args.mode == "krause":
        cli.check_impl(args.impl, cli.resolve_device(None), model_dtype(args), window=args.window)
