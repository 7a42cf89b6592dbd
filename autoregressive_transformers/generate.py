"""Unconditional samples from a trained pixel model, decoded with its attention's cache.

    python -m autoregressive_transformers.generate --run_dir runs/karm_mnist --num_samples 64

KARM decodes with the Krause window cache (the last W keys/values per layer: constant
memory and time per token), ARM with a growing KV cache, LARM with its recurrent state.
Every pixel, the first included, is sampled (from the start token) at --temperature.

Writes to --out_dir (default <run_dir>/samples): samples_<tag>.npz (``images`` (N, H, W, C)
uint8, ``tokens`` (N, T)), samples_<tag>.png (a grid) and samples_<tag>.json (throughput:
images/s and tokens/s, wall time, cache and peak memory).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from krause.training.paths import plain_name
from krause.training.entry import entry_point
from krause.training.metrics import progress_bar
from krause.training.ranges import NONNEGATIVE_FLOAT, POSITIVE_INT, SEED, check_namespace
from krause.training.run_dir import atomic_write_text

from krause.dispatch import IMPLS

from .common import (PRECISIONS, UsageError, autocast, check_outputs, checkpoint_path, image_grid, load_trained,
                     resolve_device, run_main, run_root, save_png)
from .config import OneLineParser
from .data import image_shape, tokens_to_images


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m autoregressive_transformers.generate", description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default=None, help="training run directory")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--num_samples", type=POSITIVE_INT, default=64)
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64, help="images decoded together")
    p.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=1.0, help="softmax temperature (0: most likely value)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--out_dir", default=None, help="default: <run_dir>/samples")
    p.add_argument("--tag", default=None, help="file name tag (default: t<temperature>_s<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier samples with the same tag")
    p.add_argument("--attn_impl", default=None, choices=IMPLS, help="Krause op implementation (default: the run's)")
    p.add_argument("--no_progress", action="store_true")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_batches(model, num: int, batch_size: int, temperature: float, seed: int, device, precision: str,
                   prefix: torch.Tensor | None = None, progress: bool = True, desc: str = "sampling"):
    """Samples ``num`` images in batches; returns (tokens (num, T) int64 on CPU, stats dict).

    With ``prefix`` (num, P), those pixels are given and the rest sampled (completion).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    cache_dtype = torch.bfloat16 if precision == "bf16" else None
    seq_len = model.cfg.seq_len
    out, stats = [], {"cache_bytes": 0}
    p = 0 if prefix is None else prefix.shape[1]
    bar = progress_bar(total=num * (seq_len - p), enabled=progress, desc=desc, unit="tok", unit_scale=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        done = [p]

        def tick(t, n=n, done=done):
            bar.update(n * (t - done[0]))
            done[0] = t

        with autocast(device, precision):
            tokens = model.sample(n, temperature, None if prefix is None else prefix[start:start + n].to(device),
                                  generator=generator, dtype=cache_dtype, progress=tick, stats=stats)
        out.append(tokens.cpu())
    sync(device)
    elapsed = time.perf_counter() - t0
    bar.close()
    stats.update(seconds=elapsed, images=num, images_per_s=num / elapsed,
                 tokens_per_s=num * (seq_len - p) / elapsed, batch_size=batch_size, device=str(device),
                 precision=precision)
    if device.type == "cuda":
        stats["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return torch.cat(out), stats


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    device = resolve_device(args.device)
    tag = args.tag or f"t{args.temperature:g}_s{args.seed}"
    plain_name(tag, "--tag")  # it becomes part of the output file names
    # outputs checked before any work: a file in the way or earlier results are never replaced silently
    if args.run_dir is None and args.checkpoint in ("best", "last"):
        raise UsageError("give --run_dir (a training run directory) or --checkpoint PATH")
    path = checkpoint_path(args.run_dir, args.checkpoint)
    out_dir = Path(args.out_dir).expanduser().resolve() if args.out_dir else run_root(args.run_dir, path) / "samples"
    check_outputs(out_dir, [f"samples_{tag}.{ext}" for ext in ("npz", "png", "json")], args.overwrite)
    model, config, path = load_trained(args.run_dir, args.checkpoint, device, attn_impl=args.attn_impl)
    shape = image_shape(config["dataset"])
    out_dir.mkdir(parents=True, exist_ok=True)

    tokens, stats = sample_batches(model, args.num_samples, args.batch_size, args.temperature, args.seed, device,
                                   args.precision, progress=not args.no_progress)
    images = tokens_to_images(tokens, shape)
    np.savez_compressed(out_dir / f"samples_{tag}.npz", images=images, tokens=tokens.numpy().astype(np.uint8),
                        temperature=args.temperature, seed=args.seed)
    save_png(image_grid(images), out_dir / f"samples_{tag}.png", scale=4 if shape[0] <= 32 else 1,
             title=f"{model.cfg.name}: {args.num_samples} unconditional samples (temperature {args.temperature:g}, "
                   f"seed {args.seed})")
    stats.update(model=model.cfg.name, checkpoint=str(path), temperature=args.temperature, seed=args.seed)
    atomic_write_text(out_dir / f"samples_{tag}.json", json.dumps(stats, indent=2) + "\n")
    print(f"{model.cfg.name}: {args.num_samples} samples in {stats['seconds']:.1f} s "
          f"({stats['images_per_s']:.3g} images/s, {stats['tokens_per_s']:.4g} tokens/s) -> {out_dir}/samples_{tag}.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
