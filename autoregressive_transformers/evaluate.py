"""Bits per dimension of a trained pixel model on a whole split (single process or torchrun).

    python -m autoregressive_transformers.evaluate --run_dir runs/karm_mnist
    torchrun --nproc_per_node 4 -m autoregressive_transformers.evaluate --run_dir runs/karm_cifar10

Each process scores a disjoint share of the images; NLL sums and dimension counts are
summed across processes, so the number is the same for any number of processes.
Writes <run_dir>/eval_<checkpoint>_<split>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from krause.training.distributed import cleanup, init_distributed, is_main_process
from krause.training.run_dir import atomic_write_text

from krause.dispatch import IMPLS

from krause.training.entry import entry_point
from krause.training.ranges import POSITIVE_INT, check_namespace

from .common import (PRECISIONS, UsageError, check_output_file, checkpoint_name, checkpoint_path, evaluate_bpd,
                     load_trained, resolve_device, run_main, run_root)
from .config import OneLineParser
from .data import load_pixels


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m autoregressive_transformers.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default=None, help="training run directory")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data_path", default=None, help="default: the training run's")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="first N images only (default: the training run's limit for test)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=32, help="per process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result at the same path")
    p.add_argument("--attn_impl", default=None, choices=IMPLS, help="Krause op implementation (default: the run's)")
    p.add_argument("--no_progress", action="store_true")
    return p


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    device = resolve_device(args.device)
    if args.run_dir is None and args.checkpoint in ("best", "last"):
        raise UsageError("give --run_dir (a training run directory) or --checkpoint PATH")
    path = checkpoint_path(args.run_dir, args.checkpoint)
    out = Path(args.out).expanduser().resolve() if args.out else \
        run_root(args.run_dir, path) / f"eval_{checkpoint_name(args.checkpoint, path)}_{args.split}.json"
    check_output_file(out, args.overwrite)  # before the evaluation, not after it
    env = init_distributed(device=device)
    try:
        model, config, path = load_trained(args.run_dir, args.checkpoint, env.device, attn_impl=args.attn_impl)
        data_path = args.data_path if args.data_path is not None else config.get("data_path")
        limit = args.limit if args.limit is not None else (config.get("limit_test") if args.split == "test" else None)
        pixels = load_pixels(config["dataset"], args.split, data_path, False, limit)
        result = evaluate_bpd(model, pixels, args.batch_size, env.device, args.precision, not args.no_progress)
        result.update(checkpoint=str(path), split=args.split, model=model.cfg.name, dataset=config["dataset"],
                      world_size=env.world_size)
        if is_main_process():
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
            print(f"{result['model']} {args.split} bpd {result['bpd']:.5f} on {result['num_images']} images -> {out}")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
