"""Claim 2: autoregressive generation. KARM vs ARM test BPD at equal steps, and the time to decode whole images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .common import Context, MissingPrerequisite, mean_std, new_figure, pm, result, save_figure, verdict

NAME = "autoregressive"
TITLE = "Autoregressive image generation: KARM vs ARM"
COMPARISON = ("python -m autoregressive_transformers.train with --attn krause (KARM) and --attn vanilla (ARM), "
              "identical model size, data, batches, steps and seed; test BPD on the same test digits; then "
              "autoregressive_transformers.generate.sample_batches decodes whole 28x28 images (784 tokens) with "
              "each model's cache (Krause ring buffer vs growing KV cache)")
EXPECTATION = ("KARM matches or beats ARM's test BPD (paper MNIST: 0.5652 vs 0.5685) and decodes whole images "
               "faster (105.6 vs 83.6 img/s on an H100)")
BPD_TOLERANCE = 0.01
RULE = (f"agree if KARM's mean test BPD <= ARM's + {BPD_TOLERANCE} AND KARM's mean whole-image decode time "
        "< ARM's")

MODEL = ["--dim", "64", "--num_layers", "2", "--num_heads", "4", "--lr", "3e-3", "--device", "cpu", "--no_progress"]
# decode_tokens: None = whole images from the start token; a number (tiny) = only the last that many pixels of
# test images (the rest given as a prefix), so that CI checks the decode path in seconds
FULL = dict(seeds=(0, 1), steps=80, batch=8, limit_train=None, limit_test=100, samples=1, decode_tokens=None)
TINY = dict(seeds=(0,), steps=2, batch=4, limit_train=16, limit_test=4, samples=1, decode_tokens=16,
            extra=["--window", "8", "--top_k", "4"])


def decode_seconds(run_dir: Path, s: dict) -> dict:
    """Seconds per image to sample with the model's own cache (autoregressive_transformers.generate.sample_batches)."""
    from autoregressive_transformers.common import load_trained
    from autoregressive_transformers.data import load_pixels
    from autoregressive_transformers.generate import sample_batches

    model, config, _ = load_trained(run_dir, "last", "cpu")
    prefix = None
    if s["decode_tokens"] is not None:
        pixels = load_pixels(config["dataset"], "test", config.get("data_path"), False, s["samples"])
        prefix = pixels[:, :pixels.shape[1] - s["decode_tokens"]].long()
    _, stats = sample_batches(model, s["samples"], s["samples"], 1.0, 0, torch.device("cpu"), "fp32", prefix=prefix,
                              progress=False)
    tokens = model.cfg.seq_len if prefix is None else s["decode_tokens"]
    return {"decode_s_per_image": stats["seconds"] / stats["images"], "decoded_tokens_per_image": tokens,
            "tokens_per_s": stats["tokens_per_s"]}


def run(ctx: Context):
    try:
        from autoregressive_transformers import train
    except ImportError as e:
        raise MissingPrerequisite(f"autoregressive_transformers is not importable ({e})") from None
    s = TINY if ctx.tiny else FULL
    runs: dict[str, list[dict]] = {"KARM": [], "ARM": []}
    for label, attn in (("KARM", "krause"), ("ARM", "vanilla")):
        for seed in s["seeds"]:
            out = ctx.out_dir / f"{attn}_seed{seed}"
            if ctx.progress:
                print(f"  training {label} seed {seed} ({s['steps']} steps)", flush=True)
            argv = ["--attn", attn, "--out_dir", str(out), "--overwrite", "--seed", str(seed), "--max_steps",
                    str(s["steps"]), "--batch_size", str(s["batch"]), "--eval_every", str(s["steps"]),
                    "--log_every", str(max(1, s["steps"] // 5)), "--limit_test", str(s["limit_test"]), *MODEL,
                    *s.get("extra", [])]
            if s["limit_train"]:
                argv += ["--limit_train", str(s["limit_train"])]
            rc = train.main(argv)
            if rc != 0:
                raise RuntimeError(f"autoregressive_transformers.train exited with {rc} ({label}, seed {seed})")
            res = json.loads((out / "results.json").read_text())
            runs[label].append({"test_bpd": res["final_test_bpd"], "params": res["params"], "steps": res["steps"],
                                **decode_seconds(out, s), "run_dir": str(out)})
    bpd = {k: [r["test_bpd"] for r in v] for k, v in runs.items()}
    dec = {k: [r["decode_s_per_image"] for r in v] for k, v in runs.items()}
    rows = [[k, pm(bpd[k], ".4f"), pm(dec[k], ".2f"), str(runs[k][0]["decoded_tokens_per_image"]),
             f"{runs[k][0]['params'] / 1e3:.1f}K", str(runs[k][0]["steps"])] for k in runs]
    kb, ab = mean_std(bpd["KARM"])[0], mean_std(bpd["ARM"])[0]
    kd, ad = mean_std(dec["KARM"])[0], mean_std(dec["ARM"])[0]
    figure = _plot(bpd, dec, ctx.out_dir / "autoregressive.png")
    return result(
        sys.modules[__name__], verdict(kb <= ab + BPD_TOLERANCE and kd < ad),
        headers=["model", "test BPD", "decode s / image", "tokens decoded / image", "params", "steps"], rows=rows,
        measured={"karm_bpd": kb, "arm_bpd": ab, "karm_decode_s": kd, "arm_decode_s": ad},
        seeds=list(s["seeds"]), figure=figure,
        details={"settings": {k: v for k, v in s.items()}, "model_args": MODEL, "runs": runs,
                 "note": "test BPD of the last checkpoint on the first limit_test test digits; decode time on CPU"})


def _plot(bpd, dec, path: Path) -> str:
    fig, (ax_b, ax_d) = new_figure(2, width=4.5)
    for ax, data, yl in ((ax_b, bpd, "test bits per dimension"), (ax_d, dec, "decode seconds per whole image")):
        for i, (label, values) in enumerate(data.items()):
            m, sd = mean_std(values)
            ax.bar(i, m, yerr=sd, capsize=6, color=("tab:orange", "tab:blue")[i], alpha=0.7)
            ax.scatter([i] * len(values), values, color="k", zorder=3, s=14)
        ax.set_xticks(range(len(data)), list(data))
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("KARM vs ARM on the embedded MNIST digits (equal steps)")
    return save_figure(fig, path)
