"""The README's LM figure: validation loss of tiny standard, Krause and gated models trained
side by side on the offline stand-in corpus (``fake_data``), the same data and seed each.

    python -m images.make_all --only lm_curves
"""

from __future__ import annotations

import shutil
from pathlib import Path

from krause.training.metrics import read_metrics
from krause.training.plotting import plot_comparison

from . import fake_data, train

ATTENTIONS = ("standard", "krause", "gated")


def lm_curves(out_dir: Path, work_dir: Path, quick: bool) -> str:
    """Trains one tiny model per attention on the same fake shards; plots val loss against step."""
    steps, every = (4, 2) if quick else (300, 25)
    data = work_dir / "data"
    if fake_data.main([str(data)]) != 0:  # its default corpus has val and test documents
        raise RuntimeError("language_models_100m.fake_data failed")
    runs = {}
    for attention in ATTENTIONS:
        run = work_dir / attention
        argv = ["--config", "tiny", "--attention", attention, "--data_dir", str(data / "shards"), "--out_dir", str(run),
                "--global_batch", "8", "--micro_batch", "8", "--block_size", "64", "--max_steps", str(steps),
                "--eval_every", str(every), "--log_every", str(every), "--val_tokens", "4096", "--lr", "3e-3",
                "--device", "cpu", "--no_progress", "--overwrite"]
        if train.main(argv) != 0:
            raise RuntimeError(f"language_models_100m.train --attention {attention} failed")
        runs[attention] = read_metrics(run / "metrics.jsonl")
    figure = plot_comparison(runs, ["val_loss"], work_dir / "lm_curves.png", x="step",
                             title=f"tiny LMs (dim 32, 2 layers), offline stand-in corpus\n"
                                   f"validation loss in nats per token; {steps} steps of 512 tokens")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, out_dir / "lm_curves.png")
    last = {a: [r["val_loss"] for r in runs[a] if "val_loss" in r][-1] for a in ATTENTIONS}
    return "final val loss " + ", ".join(f"{a} {v:.3f}" for a, v in last.items())
