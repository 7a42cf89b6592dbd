"""Claim 3: language modelling at equal compute (the LM family's five attentions, tiny)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .common import Context, MissingPrerequisite, mean_std, new_figure, pm, result, save_figure, verdict
from .corpus import VOCAB_SIZE, batch_at, fixed_windows, load_corpus

NAME = "lm"
TITLE = "Language modelling at equal compute"
KINDS = ("standard", "krause", "gated", "sliding_window", "topk")
COMPARISON = ("tiny LMs from language_models_100m.build_model, identical but for the attention "
              f"({', '.join(KINDS)}): same initialisation seed, same byte-level batches in the same order, "
              "same steps and optimizer; validation loss on the same held-out windows")
EXPECTATION = ("Krause attention loses nothing in language-model quality at equal compute: the gated mix "
               "(the paper's LM) reaches a validation loss no worse than standard attention")
TOLERANCE_NATS = 0.02
RULE = (f"agree if the gated LM's final validation loss (mean over seeds) <= standard's + {TOLERANCE_NATS} nats")

FULL = dict(model=dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=64, attn_window=16, attn_top_k=8),
            seq_len=64, batch_size=8, steps=100, eval_every=20, val_windows=32, seeds=(0, 1), lr=3e-3)
TINY = dict(model=dict(n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=32, attn_window=4, attn_top_k=2),
            seq_len=32, batch_size=4, steps=4, eval_every=2, val_windows=4, seeds=(0,), lr=3e-3)


def settings(tiny: bool) -> dict:
    return TINY if tiny else FULL


def model_overrides(s: dict) -> dict:
    return dict(s["model"], vocab_size=VOCAB_SIZE, dropout=0.0, bos_token_id=None, eos_token_id=None)


def build(kind: str, s: dict):
    try:
        from language_models_100m.presets import build_model
    except ImportError as e:
        raise MissingPrerequisite(f"language_models_100m is not importable ({e})") from None
    return build_model(dict(model_overrides(s)), kind)


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        total += float(model(input_ids=x, labels=x, use_cache=False).loss) * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / count


def train_one(kind: str, s: dict, corpus, val: torch.Tensor, seed: int) -> tuple[torch.nn.Module, list[dict]]:
    """Trains one LM; returns it and its curve [{step, tokens, train_seconds, val_loss}]."""
    torch.manual_seed(seed)
    model = build(kind, s)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, s["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, i / s["steps"])))))
    batches = torch.Generator().manual_seed(1000 + seed)  # same data order for every attention
    tokens_per_step = s["batch_size"] * s["seq_len"]
    curve = [dict(step=0, tokens=0, train_seconds=0.0, val_loss=validation_loss(model, val))]
    elapsed = 0.0
    model.train()
    for step in range(1, s["steps"] + 1):
        x = batch_at(corpus.train, s["seq_len"], s["batch_size"], batches)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{kind}: non-finite training loss at step {step}")
        if step % s["eval_every"] == 0 or step == s["steps"]:
            curve.append(dict(step=step, tokens=step * tokens_per_step, train_seconds=elapsed,
                              val_loss=validation_loss(model, val)))
    return model, curve


def model_dir(root: Path, kind: str, seed: int) -> Path:
    return root / "models" / f"{kind}_seed{seed}"


def save(model, path: Path, kind: str, s: dict, seed: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "kind": kind, "settings": s, "seed": seed}, path / "model.pt")


def load(path: Path):
    """(model in eval mode, kind, settings) from ``save``."""
    blob = torch.load(path / "model.pt", weights_only=False)
    model = build(blob["kind"], blob["settings"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["kind"], blob["settings"]


def trained_models(ctx: Context, claim_dir: Path) -> dict[tuple[str, int], Path]:
    """Paths of this claim's saved models for the run's size (empty if not all there)."""
    s = settings(ctx.tiny)
    paths = {(k, seed): model_dir(claim_dir, k, seed) for k in KINDS for seed in s["seeds"]}
    for path in paths.values():  # present, and trained at this run's size (not a --tiny run's leftovers)
        if not (path / "model.pt").is_file() or torch.load(path / "model.pt", weights_only=False)["settings"] != s:
            return {}
    return paths


def run(ctx: Context):
    s = settings(ctx.tiny)
    corpus = load_corpus()
    val = fixed_windows(corpus.val, s["seq_len"], s["val_windows"])
    curves: dict[str, list[list[dict]]] = {k: [] for k in KINDS}
    params = {}
    for kind in KINDS:
        for seed in s["seeds"]:
            if ctx.progress:
                print(f"  training {kind} seed {seed} ({s['steps']} steps)", flush=True)
            model, curve = train_one(kind, s, corpus, val, seed)
            curves[kind].append(curve)
            params[kind] = sum(p.numel() for p in model.parameters())
            save(model, model_dir(ctx.out_dir, kind, seed), kind, s, seed)

    final = {k: [c[-1]["val_loss"] for c in curves[k]] for k in KINDS}
    secs = {k: [c[-1]["train_seconds"] for c in curves[k]] for k in KINDS}
    rows = []
    for k in KINDS:
        m, _ = mean_std(final[k])
        rows.append([k, f"{params[k] / 1e3:.1f}K", pm(final[k]), f"{math.exp(m):.3f}", pm(secs[k], ".1f"),
                     f"{curves[k][0][-1]['tokens']:,}"])
    gated, standard = mean_std(final["gated"])[0], mean_std(final["standard"])[0]
    figure = _plot(curves, ctx.out_dir / "lm_equal_compute.png")
    return result(
        sys.modules[__name__], verdict(gated <= standard + TOLERANCE_NATS),
        headers=["attention", "params", "val loss (nats/byte)", "val ppl", "train s", "tokens"], rows=rows,
        measured={"gated_val_loss": gated, "standard_val_loss": standard, "gated_minus_standard": gated - standard,
                  **{f"{k}_val_loss": mean_std(final[k])[0] for k in KINDS if k not in ("gated", "standard")}},
        seeds=list(s["seeds"]), figure=figure,
        details={"corpus": corpus.name, "licence": corpus.licence, "corpus_file": corpus.source,
                 "train_bytes": int(corpus.train.numel()), "val_bytes": int(corpus.val.numel()),
                 "settings": s, "curves": curves, "params": params,
                 "note": "equal compute = equal steps x tokens; wall time is the training time on this CPU"})


def _plot(curves, path: Path) -> str:
    fig, (ax_tokens, ax_time) = new_figure(2, width=5.5)
    for kind, runs in curves.items():
        n = min(len(c) for c in runs)
        tokens = [runs[0][i]["tokens"] for i in range(n)]
        loss = [sum(c[i]["val_loss"] for c in runs) / len(runs) for i in range(n)]
        wall = [sum(c[i]["train_seconds"] for c in runs) / len(runs) for i in range(n)]
        ax_tokens.plot(tokens, loss, marker=".", label=kind)
        ax_time.plot(wall, loss, marker=".", label=kind)
    for ax, xl in ((ax_tokens, "training tokens (bytes)"), (ax_time, "training wall time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Tiny LMs on WordNet glosses: equal steps and tokens, attention differs")
    return save_figure(fig, path)
