"""The end of a training run: summary.json (params, FLOPs, throughput, accuracy) and figures."""

from __future__ import annotations

import json

import torch

from krause.training import read_metrics, sigma_per_layer

from . import analysis
from .hooks import fmt

__all__ = ["finish"]


def finish(root, model, val_set, info, args, log, wall_s: float) -> dict:
    """Summary (params, FLOPs, throughput, accuracy) and figures, on rank 0 after training."""
    records = read_metrics(root / "metrics.jsonl")
    epochs = [r for r in records if "train_acc" in r]
    evals = [r for r in epochs if "test_acc1" in r]
    path = root / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    total_images = sum(r["img_per_s"] * r["epoch_time"] for r in epochs)
    total_time = sum(r["epoch_time"] for r in epochs)
    summary.update(
        params=analysis.count_params(model),
        train_img_per_s=total_images / total_time if total_time else None,
        train_time_s=total_time,
        final_acc1=evals[-1]["test_acc1"] if evals else None,
        final_acc5=evals[-1]["test_acc5"] if evals else None,
        best_acc1=max((r["test_acc1"] for r in evals), default=None),
        sigma=sigma_per_layer(model) or None,
        epochs=len(epochs),
    )
    if summary.get("flops_per_image") is None and not args.no_flops:
        summary["flops_per_image"] = analysis.flops_per_image(model)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if args.figures != "none" and evals:
        fig_dir = root / "figures"
        written = [analysis.plot_run_curves({args.model: records}, fig_dir / "curves.png", title=args.model)]
        if any("sigma" in r for r in epochs):
            written.append(analysis.plot_sigma(epochs, fig_dir / "sigma.png", title=f"{args.model}: sigma per layer"))
        if args.figures == "all" and analysis.has_attention_maps(model):
            images = torch.stack([val_set[i][0] for i in range(min(2, len(val_set)))])
            device = next(model.parameters()).device
            written.append(analysis.plot_attention_maps(
                {args.model: model}, images.to(device), fig_dir / "attention.png", mean=info.mean, std=info.std))
        for p in written:
            log.info("wrote %s", p)
    log.info("done in %.1f s: best test acc1 %s, %.1f train img/s", wall_s, fmt(summary["best_acc1"]),
             summary["train_img_per_s"] or 0.0)
    return summary
