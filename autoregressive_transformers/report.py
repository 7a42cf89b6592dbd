"""What a training run reports besides its metrics: sigma per layer, the figures and results.json."""

from __future__ import annotations

import json

from krause.training.distributed import is_main_process
from krause.training.metrics import read_metrics
from krause.training.plotting import plot_curves, plot_series
from krause.training.run_dir import atomic_write_text
from krause.training.sigma import sigma_per_layer as _sigmas


def sigma_per_layer(model) -> list[float] | None:
    """Mean sigma of every Krause layer (None for the baselines)."""
    values = [sum(s) / len(s) if isinstance(s, list) else s for s in _sigmas(model)]
    return values or None


def plot_figures(run, cfg) -> None:
    """figures/bpd.png (train and test BPD, LR) and, for KARM, figures/sigma.png (sigma per layer)."""
    plot_curves(run.metrics_path, run.figures_dir / "bpd.png", x="step", title=f"{cfg.name} ({cfg.seq_len} tokens)",
                panels={"bits per dimension": ["train_bpd", "test_bpd"], "lr": ["lr"]})
    # sigma comes with the training-window records: an evaluation can come before the first one
    if cfg.attn == "krause" and any("sigma" in r for r in read_metrics(run.metrics_path)):
        plot_series(run.metrics_path, run.figures_dir / "sigma.png", keys=["sigma"], ylabel="mean sigma of layer",
                    title=f"{cfg.name}: sigma per layer")


def write_results(ctx, cfg, dataset: str) -> None:
    """results.json of a finished run: best and final test BPD, steps, parameters (main process)."""
    if not is_main_process():
        return
    best = ctx.checkpointer.best_metric
    results = {"model": cfg.name, "attn": cfg.attn, "dataset": dataset, "steps": ctx.state.step, "test_bpd": best,
               "final_test_bpd": float(read_metrics(ctx.run.metrics_path)[-1].get("test_bpd", float("nan"))),
               "params": ctx.n_params, "world_size": ctx.env.world_size}
    atomic_write_text(ctx.run.root / "results.json", json.dumps(results, indent=2) + "\n")
    ctx.log.info(f"done: best test bpd {best:.4f}; run directory {ctx.run.root}")
