"""Compare finished runs side by side: a table, accuracy/loss curves, sigma, attention maps.

    python -m vision_transformers.compare runs/cifar10_vit-s runs/cifar10_kvit-s --out_dir runs/compare_s

Each argument is a run directory written by ``python -m vision_transformers.train``. The
models are rebuilt from each run's config.json and loaded from its best (or last)
checkpoint; the attention figure shows the same test images for every run (runs must
share the dataset; ``--data_path`` overrides where it is read from). Writes
<out_dir>/{comparison.json, curves.png, attention.png, sigma_<run>.png} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from krause.training import read_metrics
from krause.training.ranges import POSITIVE_INT, check_namespace

from . import analysis
from krause.training.checkpointer import Checkpointer, find_checkpoint, load_model_weights

from .data import DATASETS, DataError, build_datasets, dataset_info
from .models import create
from krause.training.entry import OneLineParser

from .config import check_saved_config, model_kwargs
from .config import build_parser as train_parser


def load_run(run: Path, checkpoint: str = "best", device: str = "cpu"):
    """(model in eval mode, config dict) of a vision run directory; ValueError (one line) otherwise."""
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run} is not a run directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), str) or cfg.get("dataset") not in DATASETS:
        raise ValueError(f"{run} is not a vision_transformers.train run (its config has no vision model / dataset)")
    check_saved_config(cfg, cfg_path)
    try:
        ckpt = find_checkpoint(run, checkpoint)
    except ValueError:
        ckpt = find_checkpoint(run, "last") if checkpoint == "best" and Checkpointer(
            run / "checkpoints").latest_step() is not None else None
    if ckpt is None:
        raise ValueError(f"{run} has no checkpoint yet")
    info = dataset_info(cfg["dataset"], cfg.get("img_size"))
    fields = {**vars(train_parser().parse_args(["--out_dir", "x"])), **cfg}  # flags added since the run: defaults
    model = create(cfg["model"], **model_kwargs(argparse.Namespace(**fields), info))
    load_model_weights(model, ckpt)
    return model.to(device).eval(), cfg


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m vision_transformers.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--labels", default=None, help="comma-separated labels (default: the model names)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--data_path", default=None, help="override the runs' data path (for the attention images)")
    p.add_argument("--images", type=POSITIVE_INT, default=2, help="test images in the attention figure")
    p.add_argument("--patches", default=None, help="query patches as r,c;r,c (default: centre and a corner-side one)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out_dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    try:
        args = check_namespace(p.parse_args(argv), p)
        out = Path(args.out_dir).expanduser().resolve()
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out_dir {out} exists and is not a directory")
        if (out / "comparison.json").exists() and not args.overwrite:
            raise ValueError(f"{out / 'comparison.json'} already exists; pass --overwrite or choose another --out_dir")
        runs = [Path(r).expanduser().resolve() for r in args.runs]
        labels = args.labels.split(",") if args.labels else None
        if labels is not None and len(labels) != len(runs):
            raise ValueError(f"--labels has {len(labels)} entries for {len(runs)} runs")
        loaded = [load_run(r, args.checkpoint) for r in runs]
        labels = labels or [cfg["model"] for _, cfg in loaded]
        datasets = {cfg["dataset"] for _, cfg in loaded}
        out = Path(args.out_dir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        rows, records = [], {}
        for label, run, (model, cfg) in zip(labels, runs, loaded):
            recs = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
            records[label] = recs
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
            evals = [r for r in recs if "test_acc1" in r]
            rows.append(dict(label=label, model=cfg["model"], dataset=cfg["dataset"], epochs=len(evals),
                             best_acc1=max((r["test_acc1"] for r in evals), default=None),
                             final_acc5=evals[-1]["test_acc5"] if evals else None,
                             params=analysis.count_params(model), flops=(summary.get("flops_per_image") or {}).get("flops"),
                             train_img_per_s=summary.get("train_img_per_s"), sigma=analysis.sigma_summary(model) or None))
            if any("sigma" in r for r in recs):
                analysis.plot_sigma([r for r in recs if "sigma" in r], out / f"sigma_{label}.png", title=f"{label}: sigma")
        analysis.plot_run_curves(records, out / "curves.png", title=" vs ".join(labels))
        vit_like = [(label, m) for label, (m, _) in zip(labels, loaded) if analysis.has_attention_maps(m)]
        if len(datasets) == 1 and vit_like and len({analysis.patch_grid(m) for _, m in vit_like}) == 1:
            cfg = loaded[0][1]
            _, val, info = build_datasets(cfg["dataset"], args.data_path or cfg.get("data_path"), img_size=cfg.get("img_size"),
                                          download=False, verify_checksums=not cfg.get("no_checksum", False))
            images = torch.stack([val[i][0] for i in range(min(args.images, len(val)))])
            patches = None
            if args.patches:
                patches = [tuple(int(v) for v in pc.split(",")) for pc in args.patches.split(";")]
            else:
                r, c = analysis.patch_grid(vit_like[0][1])
                patches = [(r // 2, c // 2), (r // 4, 3 * c // 4)]
            analysis.plot_attention_maps(dict(vit_like), images, out / "attention.png", patches=patches,
                                         mean=info.mean, std=info.std)
        (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    except (ValueError, DataError, OSError, KeyError, RuntimeError) as e:
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    header = ["run", "model", "best acc1 %", "acc5 %", "params", "FLOPs/img", "train img/s"]
    table = [header] + [[r["label"], r["model"], "-" if r["best_acc1"] is None else f"{100 * r['best_acc1']:.2f}",
                         "-" if r["final_acc5"] is None else f"{100 * r['final_acc5']:.2f}", f"{r['params'] / 1e6:.2f}M",
                         analysis.format_flops(r["flops"] or float("nan")),
                         "-" if r["train_img_per_s"] is None else f"{r['train_img_per_s']:.0f}"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
