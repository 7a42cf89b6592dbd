"""Image completion: the top rows of test images are given, the rest is sampled.

    python -m autoregressive_transformers.complete --run_dir runs/karm_mnist --fraction 0.5

The given rows go through the model once (a prefill of the decoding caches); every
remaining pixel is then one cached decoding step, so the prefix is never recomputed.
Each image is completed --num_samples times. Completion quality is also a number: the
model's NLL of the true remaining pixels of every image (nats, and bits per dimension).

Writes to --out_dir (default <run_dir>/completions): completion_<tag>.png (rows: the
input with the hidden part grey, the samples, the ground truth), completion_<tag>.npz
(``given``, ``samples`` (I, S, H, W, C), ``truth``, ``nll_rest_nats`` and
``bpd_rest`` per image) and completion_<tag>.json (summary and throughput).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from krause.training.paths import plain_name
from krause.training.ranges import NONNEGATIVE_FLOAT, POSITIVE_INT, SEED, Range, check_namespace
from krause.training.run_dir import atomic_write_text

from krause.dispatch import IMPLS

from krause.training.entry import entry_point

from .common import (PRECISIONS, UsageError, autocast, check_outputs, checkpoint_path, load_trained, nll_sums,
                     resolve_device, run_main, run_root)
from .config import OneLineParser
from .data import image_shape, load_pixels, tokens_to_images
from .generate import sample_batches

FRACTION = Range(float, gt=0, lt=1)  # of the rows given: something given, something left to sample


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m autoregressive_transformers.complete", description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default=None, help="training run directory")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--fraction", type=FRACTION, default=0.5, help="fraction of the rows given, in (0, 1)")
    p.add_argument("--num_images", type=POSITIVE_INT, default=8, help="test images to complete (the first N)")
    p.add_argument("--num_samples", type=POSITIVE_INT, default=4, help="completions per image")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64, help="sequences decoded together")
    p.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=1.0)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--data_path", default=None, help="default: the training run's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--out_dir", default=None, help="default: <run_dir>/completions")
    p.add_argument("--tag", default=None, help="file name tag (default: f<fraction>_t<temperature>_s<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier completions with the same tag")
    p.add_argument("--attn_impl", default=None, choices=IMPLS, help="Krause op implementation (default: the run's)")
    p.add_argument("--no_progress", action="store_true")
    return p


def given_rows(fraction: float, height: int) -> int:
    """Rows given for a ``fraction`` in (0, 1): round(fraction * height), at least 1 and
    at most height - 1 so something is always given and something left to sample."""
    FRACTION.check("--fraction", fraction)
    return min(height - 1, max(1, round(fraction * height)))


@torch.no_grad()
def nll_of_rest(model, truth: torch.Tensor, prefix_len: int, batch_size: int, device, precision: str) -> torch.Tensor:
    """Per-image NLL (nats, summed) of the true pixels from ``prefix_len`` on, given all before."""
    out = []
    for s in range(0, len(truth), batch_size):
        x = truth[s:s + batch_size].to(device).long()
        with autocast(device, precision):
            logits = model(x)
        out.append(nll_sums(logits[:, prefix_len:], x[:, prefix_len:]).cpu())
    return torch.cat(out)


def completion_figure(given: np.ndarray, samples: np.ndarray, truth: np.ndarray, rows_given: int, path, title: str):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_img, n_samp = samples.shape[:2]
    cols = n_samp + 2
    fig, axes = plt.subplots(n_img, cols, figsize=(1.3 * cols, 1.3 * n_img + 0.4), squeeze=False)
    for i in range(n_img):
        panels = [given[i]] + [samples[i, j] for j in range(n_samp)] + [truth[i]]
        for j, img in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255, interpolation="nearest")
            if j < cols - 1:
                ax.axhline(rows_given - 0.5, color="red", lw=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("input" if j == 0 else ("truth" if j == cols - 1 else f"sample {j}"), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    device = resolve_device(args.device)
    tag = args.tag or f"f{args.fraction:g}_t{args.temperature:g}_s{args.seed}"
    plain_name(tag, "--tag")  # it becomes part of the output file names
    if args.run_dir is None and args.checkpoint in ("best", "last"):
        raise UsageError("give --run_dir (a training run directory) or --checkpoint PATH")
    path = checkpoint_path(args.run_dir, args.checkpoint)
    out_dir = Path(args.out_dir).expanduser().resolve() if args.out_dir else run_root(args.run_dir, path) / "completions"
    check_outputs(out_dir, [f"completion_{tag}.{ext}" for ext in ("npz", "png", "json")], args.overwrite)
    model, config, path = load_trained(args.run_dir, args.checkpoint, device, attn_impl=args.attn_impl)
    shape = image_shape(config["dataset"])
    rows = given_rows(args.fraction, shape[0])
    prefix_len = rows * shape[1] * shape[2]
    data_path = args.data_path if args.data_path is not None else config.get("data_path")
    truth = load_pixels(config["dataset"], "test", data_path, False, args.num_images)
    n_img = len(truth)

    prefix = truth[:, :prefix_len].long().repeat_interleave(args.num_samples, dim=0)
    tokens, stats = sample_batches(model, len(prefix), args.batch_size, args.temperature, args.seed, device,
                                   args.precision, prefix=prefix, progress=not args.no_progress, desc="completing")
    if not torch.equal(tokens[:, :prefix_len], prefix):
        raise RuntimeError("completion changed the given pixels")  # a bug, never bad input
    nll = nll_of_rest(model, truth, prefix_len, args.batch_size, device, args.precision)
    rest_dims = truth.shape[1] - prefix_len
    bpd_rest = nll / (rest_dims * math.log(2.0))

    truth_img = tokens_to_images(truth, shape)
    samples = tokens_to_images(tokens, shape).reshape(n_img, args.num_samples, *shape)
    given = truth_img.copy()
    given[:, rows:] = 128
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / f"completion_{tag}.npz", given=given, samples=samples, truth=truth_img,
                        rows_given=rows, nll_rest_nats=nll.numpy(), bpd_rest=bpd_rest.numpy())
    title = (f"{model.cfg.name}: {rows}/{shape[0]} rows given; NLL of the true rest "
             f"{bpd_rest.mean().item():.3f} bits/dim")
    completion_figure(given, samples, truth_img, rows, out_dir / f"completion_{tag}.png", title)
    summary = dict(model=model.cfg.name, checkpoint=str(path), fraction=args.fraction, rows_given=rows,
                   num_images=n_img, num_samples=args.num_samples, temperature=args.temperature, seed=args.seed,
                   bpd_rest_mean=bpd_rest.mean().item(), nll_rest_nats_mean=nll.mean().item(),
                   bpd_rest_per_image=bpd_rest.tolist(), **stats)
    atomic_write_text(out_dir / f"completion_{tag}.json", json.dumps(summary, indent=2) + "\n")
    print(f"{model.cfg.name}: {n_img} images x {args.num_samples} completions ({rows}/{shape[0]} rows given), "
          f"NLL of the true rest {summary['bpd_rest_mean']:.4f} bits/dim, {stats['images_per_s']:.3g} completions/s "
          f"-> {out_dir}/completion_{tag}.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
