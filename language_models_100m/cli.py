"""The training command's flags (each numeric one declares its range once), its presets, and the
checks that run before anything is written: the flags, the build's manifest, the device, the
Krause backend and the attention's settings against the block.

``--preset paper`` sets the first release's choices where this project's default differs
(``PAPER_PRESET``; the README's "default vs release" table says why); a flag given on the
command line still wins over the preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from krause.dispatch import IMPLS
from krause.training.entry import OneLineParser
from krause.training.errors import UsageError
from krause.training.ranges import (NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY,
                                    SEED, Range, check_namespace, read_run_config)

from .model import ATTENTIONS
from .presets import PRESETS

FRACTION = Range(float, ge=0, lt=1)  # dropout, warmup, Adam betas

#: The first release's settings where the default differs: 488 x 1024 = 499,712 tokens per step
#: (micro-batch 61 divides it on 1, 2, 4 or 8 processes) and weight decay on every parameter.
PAPER_PRESET = {"global_batch": 488, "micro_batch": 61, "decay_all": True}
RECIPE_PRESETS = {"default": {}, "paper": PAPER_PRESET}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m language_models_100m.train",
                       description="Train a Krause language model on a build_fwe10bt token sample, under torchrun.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", dest="recipe_preset", default="default", choices=sorted(RECIPE_PRESETS),
                   help="paper: the first release's tokens per step and weight decay (explicit flags still win)")
    g = p.add_argument_group("model")
    g.add_argument("--config", default="100m", choices=sorted(PRESETS))
    g.add_argument("--attention", default="gated", choices=ATTENTIONS)
    g.add_argument("--block_size", type=POSITIVE_INT, default=None,
                   help="tokens per sequence (default: the model's positions)")
    g.add_argument("--dropout", type=FRACTION, default=0.1)
    g.add_argument("--vocab_size", type=POSITIVE_INT, default=None,
                   help="default: the build's vocabulary (may be padded up)")
    g.add_argument("--attn_global_tokens", type=NONNEGATIVE_INT, default=None,
                   help="longformer: the first tokens every later token sees (default: the model's, 4)")
    g.add_argument("--attn_num_clusters", type=POSITIVE_INT, default=None,
                   help="routing: k-means clusters of queries and keys (default: the model's, 8)")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True, help="build_fwe10bt output (train/val shards, manifest.json)")
    g.add_argument("--val_tokens", type=POSITIVE_INT, default=10_485_760, help="validation tokens per evaluation (cap)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global_batch", type=POSITIVE_INT, default=512, help="sequences per optimizer step, all processes")
    g.add_argument("--micro_batch", type=POSITIVE_INT, default=16, help="sequences per forward on one process")
    g.add_argument("--max_tokens", type=POSITIVE_FLOAT, default=10e9, help="training tokens (sets the number of steps)")
    g.add_argument("--max_steps", type=POSITIVE_INT, default=None, help="optimizer steps (overrides --max_tokens)")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=6e-4)
    g.add_argument("--min_lr_ratio", type=PROBABILITY, default=0.1)
    g.add_argument("--warmup", type=FRACTION, default=0.05, help="fraction of the steps")
    g.add_argument("--weight_decay", type=NONNEGATIVE_FLOAT, default=0.1)
    g.add_argument("--decay_all", action="store_true",
                   help="weight decay on every parameter (the first release) instead of matrices only")
    g.add_argument("--beta1", type=FRACTION, default=0.9)
    g.add_argument("--beta2", type=FRACTION, default=0.95)
    g.add_argument("--grad_clip", type=NONNEGATIVE_FLOAT, default=1.0, help="0: off")
    g.add_argument("--seed", type=SEED, default=0)
    g = p.add_argument_group("execution")
    g.add_argument("--out_dir", required=True)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--resume_step", type=POSITIVE_INT, default=None,
                   help="with --resume: continue from this step's checkpoint instead of the latest")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--dist", default="ddp", choices=["ddp", "fsdp"], help="data parallelism: DDP or FSDP2")
    g.add_argument("--attn_impl", default="auto", choices=IMPLS, help="backend of the Krause op (krause.dispatch)")
    g.add_argument("--eval_every", type=POSITIVE_INT, default=500, help="validation every N steps (and at the end)")
    g.add_argument("--eval_batch", type=POSITIVE_INT, default=None,
                   help="validation sequences per forward (default micro)")
    g.add_argument("--save_every", type=NONNEGATIVE_INT, default=500,
                   help="checkpoint every N steps (0: at evaluations)")
    g.add_argument("--log_every", type=POSITIVE_INT, default=10)
    g.add_argument("--peak_tflops", type=POSITIVE_FLOAT, default=None,
                   help="per-device peak for MFU (default: known GPUs)")
    g.add_argument("--no_progress", action="store_true")
    g.add_argument("--kill_at_step", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self
    g.add_argument("--sigterm_at_step", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)  # tests: SIGTERM
    g.add_argument("--sigint_at_step", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)  # tests: SIGINT
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags with the preset's values under the explicit ones, every range checked."""
    parser = build_parser()
    preset = parser.parse_args(argv).recipe_preset
    parser.set_defaults(**RECIPE_PRESETS[preset])  # explicit flags still win
    args = check_namespace(parser.parse_args(argv), parser)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.resume_step is not None and not args.resume:
        raise UsageError(f"--resume_step needs --resume, got --resume_step {args.resume_step} alone")
    for flag, used_by in (("attn_global_tokens", "longformer"), ("attn_num_clusters", "routing")):
        if getattr(args, flag) is not None and args.attention != used_by:
            raise UsageError(f"--{flag} is read by --attention {used_by} only, not {args.attention}")
    return args


def check_saved_config(out_dir, parser: argparse.ArgumentParser | None = None) -> dict | None:
    """The config.json of a run directory (None if there is none), its values checked against the
    flags' ranges: a hand-edited or foreign file is refused in one line naming it."""
    return read_run_config(out_dir, parser or build_parser())


def read_manifest(data_dir) -> dict:
    """The build's manifest.json, with the fields training reads checked."""
    path = Path(data_dir).expanduser() / "manifest.json"
    if not path.is_file():
        raise UsageError(f"--data_dir {data_dir}: no manifest.json (run language_models_100m.build_fwe10bt)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON ({e}); rebuild it with language_models_100m.build_fwe10bt") from None
    vocab = manifest.get("vocab_size") if isinstance(manifest, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise UsageError(f"{path}: vocab_size must be an integer >= 1, got {vocab!r} (not a build_fwe10bt manifest?)")
    eos = manifest.get("eos_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab):
        raise UsageError(f"{path}: eos_id must be a token id below vocab_size {vocab}, got {eos!r}")
    return manifest


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda as a torch.device; cuda without CUDA is refused in one line."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here (use --device cpu or auto)")
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def check_attn_impl(impl: str, cfg, device: torch.device) -> None:
    """Refuse a Krause backend that cannot run on `device`, before anything is written."""
    from krause.dispatch import choose_impl
    from krause.nn import resolve_name

    if impl == "auto" or resolve_name(cfg.attention, "causal") not in ("gated", "krause"):
        return
    try:
        choose_impl("causal", device.type, impl, window=cfg.attn_window)
    except ValueError as e:
        raise UsageError(f"--attn_impl {impl}: {e}") from None


def check_block(cfg, block: int) -> None:
    """The attention's settings against the tokens of a training block."""
    if block > cfg.n_positions:
        raise UsageError(f"--block_size {block} is larger than the model's {cfg.n_positions} positions")
    if cfg.attention == "longformer" and cfg.attn_global_tokens > block:
        raise UsageError(f"--attn_global_tokens {cfg.attn_global_tokens} is more than the {block} tokens of a block "
                         "(--block_size)")
    if cfg.attention == "routing" and cfg.attn_num_clusters > block:
        raise UsageError(f"--attn_num_clusters {cfg.attn_num_clusters} is more than the {block} tokens of a block "
                         "(--block_size): some clusters could never hold a token")
