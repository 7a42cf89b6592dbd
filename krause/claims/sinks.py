"""Claim 4: attention sinks, per layer, on claim 3's trained LMs and a tiny HF model patched by krause.hf."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

from . import language
from .common import Context, MissingPrerequisite, mean_std, new_figure, pm, result, save_figure, verdict
from .corpus import VOCAB_SIZE, ByteTokenizer, batch_at, fixed_windows, load_corpus

NAME = "sinks"
TITLE = "Attention sinks: Krause attention puts less weight on token 0"
COMPARISON = ("the sink metric of lora_llms.sinks (mean weight that queries 1..T-1 put on token 0, over heads and "
              "texts), per layer, on claim lm's trained LMs (same data, steps and seeds; attention differs), and on a "
              "tiny Llama trained on the same corpus, before and after krause.hf.patch_model")
EXPECTATION = ("Krause attention removes most of the attention sink: sink mass below standard attention's "
               "(paper, Llama3-8B: 0.707 -> 0.364)")
RULE = "agree if the mean sink mass over layers and seeds is lower for krause than for standard AND lower for gated than for standard"

HF_FULL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, steps=150,
               batch_size=8, seq_len=128, lr=3e-3, texts=32, window=16, top_k=8)
HF_TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, steps=2,
               batch_size=2, seq_len=32, lr=3e-3, texts=2, window=4, top_k=2)


def lm_sinks(ctx: Context) -> tuple[dict[str, list[list[float]]], bool]:
    """{kind: [per-layer sink mass, one list per seed]} of claim lm's models; True if trained here."""
    from krause.training.monitor import measure

    lm_dir = ctx.sibling(language.NAME)
    paths = language.trained_models(ctx, lm_dir)
    trained_here = False
    if not paths:
        if ctx.progress:
            print(f"  claim {language.NAME}'s models are not in {lm_dir}: training them first", flush=True)
        lm_dir.mkdir(parents=True, exist_ok=True)
        language.run(Context(out_dir=lm_dir, root=ctx.root, tiny=ctx.tiny, progress=ctx.progress))
        paths = language.trained_models(ctx, lm_dir)
        trained_here = True
    s = language.settings(ctx.tiny)
    windows = fixed_windows(load_corpus().val, s["seq_len"], s["val_windows"])
    out: dict[str, list[list[float]]] = {k: [] for k in language.KINDS}
    for (kind, _seed), path in sorted(paths.items()):
        model, _, _ = language.load(path)
        values = measure(model, windows, forward=lambda m, b: m(input_ids=b, use_cache=False))["sink_mass"]
        if any(v is None for v in values):
            raise RuntimeError(f"{kind}: the monitor could not read the attention weights of every layer")
        out[kind].append(values)
    return out, trained_here


def hf_sinks(tiny: bool) -> dict:
    """Sink values (lora_llms.sinks.sink_values) of a tiny Llama trained on the corpus: base, patched gated, patched krause."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        from krause.hf import patch_model
        from lora_llms.sinks import sink_values
    except ImportError as e:
        raise MissingPrerequisite(f"transformers / krause.hf / lora_llms not importable ({e})") from None
    h = HF_TINY if tiny else HF_FULL
    corpus = load_corpus()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=h["hidden_size"], num_hidden_layers=h["num_hidden_layers"],
                         num_attention_heads=h["num_attention_heads"], intermediate_size=h["intermediate_size"],
                         max_position_embeddings=max(256, h["seq_len"]), bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=True)
    config._attn_implementation = "eager"  # sink_values reads the eager attention weights
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(h["steps"]):
        x = batch_at(corpus.train, h["seq_len"], h["batch_size"], gen)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    windows = fixed_windows(corpus.val, h["seq_len"], h["texts"])
    texts = [bytes(w.tolist()).decode("utf-8", errors="replace") for w in windows]
    tok = ByteTokenizer()
    out = {"settings": h, "base": sink_values(model, tok, texts, h["seq_len"])}
    for mix in ("gated", "krause"):
        patched = patch_model(copy.deepcopy(model), mix=mix, window=h["window"], top_k=h["top_k"])
        out[f"patched_{mix}"] = sink_values(patched.eval(), tok, texts, h["seq_len"])
    return out


def run(ctx: Context):
    lm, trained_here = lm_sinks(ctx)
    hf = hf_sinks(ctx.tiny)
    means = {k: [sum(v) / len(v) for v in runs] for k, runs in lm.items()}
    rows = []
    for kind, runs in lm.items():
        layers = len(runs[0])
        per_layer = [mean_std([r[i] for r in runs])[0] for i in range(layers)]
        rows.append([f"LM {kind}", " / ".join(f"{v:.3f}" for v in per_layer), pm(means[kind])])
    for label, key, branch in (("tiny Llama, base", "base", "standard"),
                               ("tiny Llama, patched gated (effective)", "patched_gated", "effective"),
                               ("tiny Llama, patched krause", "patched_krause", "krause")):
        values = hf[key][branch]
        rows.append([label, " / ".join(f"{v:.3f}" for v in values), f"{sum(values) / len(values):.3f}"])
    k, s, g = (mean_std(means[n])[0] for n in ("krause", "standard", "gated"))
    figure = _plot(lm, hf, ctx.out_dir / "attention_sinks.png")
    return result(
        sys.modules[__name__], verdict(k < s and g < s),
        headers=["model", "sink mass per layer", "mean over layers"], rows=rows,
        measured={"standard": s, "krause": k, "gated": g, "krause_over_standard": k / s if s else math.nan,
                  "hf_base": hf["base"]["standard_mean"], "hf_patched_gated_effective": hf["patched_gated"]["effective_mean"]},
        seeds=list(language.settings(ctx.tiny)["seeds"]), figure=figure,
        details={"lm_per_layer": lm, "hf": hf, "trained_lm_models_here": trained_here,
                 "note": ("a causal-window Krause query i >= window cannot see token 0, so its share is 0 there by "
                          "construction: the sink reduction is the locality prior, measured; the patched tiny Llama "
                          "is measured at patch time (no LoRA training), as the LLM family's analysis of a fresh patch")})


def _plot(lm, hf, path: Path) -> str:
    fig, (ax_lm, ax_hf) = new_figure(2, width=5.5)
    for kind, runs in lm.items():
        layers = range(len(runs[0]))
        mean = [mean_std([r[i] for r in runs])[0] for i in layers]
        std = [mean_std([r[i] for r in runs])[1] for i in layers]
        ax_lm.errorbar(list(layers), mean, yerr=std, marker="o", capsize=3, label=kind)
    ax_lm.set_title("tiny LMs (claim lm), mean ± std over seeds", fontsize=10)
    for label, key, branch in (("base (softmax)", "base", "standard"), ("patched gated: effective", "patched_gated", "effective"),
                               ("patched gated: Krause branch", "patched_gated", "krause"),
                               ("patched krause", "patched_krause", "krause")):
        values = hf[key][branch]
        ax_hf.plot(range(len(values)), values, marker="o", label=label)
    ax_hf.set_title("tiny Llama via krause.hf.patch_model", fontsize=10)
    for ax in (ax_lm, ax_hf):
        ax.set_xticks(range(max(len(r[0]) for r in lm.values())))
        ax.set_xlabel("layer")
        ax.set_ylabel("mean weight on token 0 (queries 1..T-1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
