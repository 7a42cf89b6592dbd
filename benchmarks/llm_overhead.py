"""Cost of Krause attention in a causal LM: prefill and decode time, memory, parameters.

    python -m benchmarks.llm_overhead                 # small Llama-style config, T = 512, 2048, 8192
    python -m benchmarks.llm_overhead --quick         # smaller model, T = 256, 1024 (a pipeline check)
    python -m benchmarks.llm_overhead --device cuda

Three models with the same weights, side by side in one run, for each prompt length T (batch 1):

  unpatched  the plain model (sdpa);
  gated      ``krause.hf.patch_model(model)``: the paper's gated mix (standard + Krause branch);
  krause     ``attn_implementation="krause"`` (``krause.hf.register()``): Krause attention on
             the model's own q/k/v, decoding through the O(W) window cache layer.

  prefill   forward over the T-token prompt with a cache; for the gated model also with the
            Krause op replaced by zeros ("projections only": the branch's q/k/v/o, RoPE, gate
            and cache bookkeeping). The Krause op's own share is (gated - projections only) / unpatched;
  decode    median time of one greedy decoding step after the prompt (the three models'
            steps interleaved), and the bytes the cache holds for the Krause window and for
            the standard branch;
  memory    peak extra memory of the prefill (CPU: peak resident memory, see _timing.py;
            CUDA: max_memory_allocated).

Parameters: bytes of the small model before/after patching, and for the real Llama3-8B and
Qwen1.5-7B shapes (built on the meta device, nothing allocated): extra parameters of the
patch and trainable LoRA parameters, baseline vs Krause.

Targets (issue 18 and before): the "krause" model's decode step <= 1.15x the unpatched one's
at T = 2048; the Krause op adds <= 10% of the unpatched prefill time at T = 2048 beyond its
projections' cost; the Krause cache is constant in T; patched parameter memory <= 1.02x
unpatched before LoRA. Absolute times depend on the machine (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from benchmarks._timing import (
    MEMORY_METHOD, describe_machine, fmt_bytes, fmt_ratio, fmt_time, machine_info, peak_memory, synchronize, table,
    time_interleaved, write_json,
)

PAPER_SHAPES = {
    "Llama3-8B": dict(kind="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Qwen1.5-7B": dict(kind="qwen2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=151936),
}


KRAUSE_SETTINGS = dict(window=32, top_k=16, sigma=5.5)  # patch_model's defaults (the paper's LLM recipe)


def build(kind, device, dtype, attn="sdpa", **shape):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(max_position_embeddings=16384, tie_word_embeddings=False, **shape)
    if attn == "krause":
        import krause.hf

        krause.hf.register()
        cfg.krause = dict(KRAUSE_SETTINGS)
    with torch.device(device):
        model = model_cls._from_config(cfg, attn_implementation=attn)
    return model.to(dtype).eval()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def krause_op_as_zeros():
    """Replaces the Krause op inside the patched layers by zeros: what the branch costs without it."""
    import krause.hf.patch as patch

    real = patch.causal_krause_attention
    patch.causal_krause_attention = lambda q, *args, **kwargs: torch.zeros_like(q)
    try:
        yield
    finally:
        patch.causal_krause_attention = real


def cache_bytes(cache) -> tuple[int, int]:
    """(Krause window bytes, standard-branch bytes) held by a cache after a forward."""
    from krause.hf.cache import KrauseCacheLayer

    kr = std = 0
    for layer in cache.layers:
        if isinstance(layer, KrauseCacheLayer):
            w = layer.krause
            kr += sum(t.numel() * t.element_size() for t in (w.keys, w.values, w.valid) if t is not None)
            if layer.standalone:  # no standard branch
                continue
        if layer.keys is not None:
            std += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return kr, std


def prompt(models, length, device):
    return torch.randint(0, models["unpatched"].config.vocab_size, (1, length), device=device)


def prefill(model, ids):
    from transformers import DynamicCache

    def run():
        with torch.no_grad():
            return model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    return run


def measure_length(models, length, device, repeats, decode_steps):
    """Prefill and decode-step times at one prompt length (memory: ``prefill_memory``, after
    every timing)."""
    gated = models["gated"]
    ids = prompt(models, length, device)

    def projections_only():
        with krause_op_as_zeros():
            return prefill(gated, ids)()

    cases = {name: prefill(model, ids) for name, model in models.items()}
    timings = time_interleaved({**cases, "projections_only": projections_only}, device=device, repeats=repeats)
    row = {"T": length, **{f"prefill_{k}_s": v["median_s"] for k, v in timings.items()},
           **{f"prefill_{k}_cpu_s": v["cpu_median_s"] for k, v in timings.items()}}
    state = {}
    for name, model in models.items():
        with torch.no_grad():
            out = prefill(model, ids)()
        state[name] = [out.past_key_values, out.logits[:, -1:].argmax(-1)]
    steps = {name: [] for name in models}
    for i in range(decode_steps):  # greedy steps on the cache each prompt left, the models interleaved
        names = list(models)
        for name in names[i % len(names):] + names[:i % len(names)]:
            cache, token = state[name]
            synchronize(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                step = models[name](token, past_key_values=cache, use_cache=True)
            synchronize(device)
            steps[name].append(time.perf_counter() - t0)
            state[name][1] = step.logits[:, -1:].argmax(-1)
    for name in models:
        row[f"decode_step_{name}_s"] = statistics.median(steps[name])
        kr, std = cache_bytes(state[name][0])
        row[f"cache_krause_{name}_bytes"], row[f"cache_standard_{name}_bytes"] = kr, std
    row["prefill_overhead"] = row["prefill_gated_s"] / row["prefill_unpatched_s"] - 1
    row["krause_op_share"] = (row["prefill_gated_s"] - row["prefill_projections_only_s"]) / row["prefill_unpatched_s"]
    row["decode_ratio_gated"] = row["decode_step_gated_s"] / row["decode_step_unpatched_s"]
    row["decode_ratio_krause"] = row["decode_step_krause_s"] / row["decode_step_unpatched_s"]
    return row


def prefill_memory(models, length, device) -> dict:
    """Each model's peak prefill memory at one prompt length."""
    ids = prompt(models, length, device)
    return {f"prefill_peak_{name}_bytes": peak_memory(prefill(model, ids), device) for name, model in models.items()}


def paper_parameter_counts():
    """Extra and trainable parameters at the real model shapes (meta device, no memory)."""
    import krause.hf

    out = {}
    for name, shape in PAPER_SHAPES.items():
        shape = dict(shape)
        kind = shape.pop("kind")
        counts = {}
        for mode in ("lora", "krause"):
            model = build(kind, "meta", torch.bfloat16, **shape)
            total = sum(p.numel() for p in model.parameters())
            if mode == "krause":
                krause.hf.patch_model(model)
                counts["patch_extra_params"] = sum(p.numel() for p in model.parameters()) - total
            peft_model = krause.hf.lora_model(model)
            counts[f"{mode}_trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            counts["base_params"] = total
        counts["krause_extra_trainable_vs_base"] = (counts["krause_trainable"] - counts["lora_trainable"]) / counts["base_params"]
        counts["patch_extra_vs_base"] = counts["patch_extra_params"] / counts["base_params"]
        out[name] = counts
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--lengths", default=None, help="comma-separated T (default 512,2048,8192; --quick 256,1024)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode_steps", type=int, default=32)
    p.add_argument("--out", default="results/llm_overhead.json")
    args = p.parse_args(argv)
    import krause.hf

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = [int(t) for t in (args.lengths or ("256,1024" if args.quick else "512,2048,8192")).split(",")]
    shape = (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096) if args.quick else
             dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=8192))
    torch.manual_seed(0)
    plain = build("llama", device, dtype, **shape)
    gated = build("llama", device, dtype, **shape)
    gated.load_state_dict(plain.state_dict())
    before = param_bytes(gated)
    krause.hf.patch_model(gated, **KRAUSE_SETTINGS)
    only = build("llama", device, dtype, attn="krause", **shape)
    missing, unexpected = only.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("krause_sigma" in k for k in missing), (missing, unexpected)
    params = {"unpatched_bytes": before, "patched_bytes": param_bytes(gated), "krause_bytes": param_bytes(only)}
    params["ratio"] = params["patched_bytes"] / params["unpatched_bytes"]
    models = {"unpatched": plain, "gated": gated, "krause": only}
    rows = []
    for t in lengths:
        rows.append(measure_length(models, t, device, args.repeats, args.decode_steps))
        r = rows[-1]
        print(f"T={t}: decode step {fmt_time(r['decode_step_unpatched_s'])} unpatched, "
              f"{fmt_time(r['decode_step_krause_s'])} krause ({r['decode_ratio_krause']:.2f}x)", flush=True)
    for r in rows:  # after every timing: a CPU memory measurement changes the allocator for good
        r.update(prefill_memory(models, r["T"], device))
    paper = paper_parameter_counts()

    info = machine_info(device)
    print(f"machine: {describe_machine(info)}; model: Llama-style {shape}, {dtype}, batch 1, "
          f"Krause {KRAUSE_SETTINGS}")
    print("prefill (sdpa baseline):")
    print(table(["T", "unpatched", "gated", "krause", "gated proj. only", "gated overhead", "Krause op share",
                 "peak unp.", "peak gated", "peak krause"],
                [[r["T"], fmt_time(r["prefill_unpatched_s"]), fmt_time(r["prefill_gated_s"]),
                  fmt_time(r["prefill_krause_s"]), fmt_time(r["prefill_projections_only_s"]),
                  f"{100 * r['prefill_overhead']:+.1f}%", f"{100 * r['krause_op_share']:+.1f}%",
                  fmt_bytes(r["prefill_peak_unpatched_bytes"]), fmt_bytes(r["prefill_peak_gated_bytes"]),
                  fmt_bytes(r["prefill_peak_krause_bytes"])] for r in rows]))
    print("decode step after the prompt (median):")
    print(table(["T", "unpatched", "gated", "krause", "gated / unp.", "krause / unp.", "krause cache",
                 "gated: Krause + standard cache", "unpatched cache"],
                [[r["T"], fmt_time(r["decode_step_unpatched_s"]), fmt_time(r["decode_step_gated_s"]),
                  fmt_time(r["decode_step_krause_s"]), f"{r['decode_ratio_gated']:.2f}x",
                  f"{r['decode_ratio_krause']:.2f}x", fmt_bytes(r["cache_krause_krause_bytes"]),
                  f"{fmt_bytes(r['cache_krause_gated_bytes'])} + {fmt_bytes(r['cache_standard_gated_bytes'])}",
                  fmt_bytes(r["cache_standard_unpatched_bytes"])] for r in rows]))
    print(f"parameter memory: {fmt_bytes(params['unpatched_bytes'])} -> {fmt_bytes(params['patched_bytes'])} "
          f"({fmt_ratio(params['ratio'])})")
    print(table(["shape", "patch extra params", "LoRA trainable", "Krause-LoRA trainable", "extra trainable / base"],
                [[n, f"{c['patch_extra_params']:,} ({100 * c['patch_extra_vs_base']:.3f}%)", f"{c['lora_trainable']:,}",
                  f"{c['krause_trainable']:,}", f"{100 * c['krause_extra_trainable_vs_base']:.2f}% (paper ~0.6%)"]
                 for n, c in paper.items()]))
    by_t = {r["T"]: r for r in rows}
    targets = {}
    if 2048 in by_t:
        targets["krause_op_share_at_2048_le_10pct"] = by_t[2048]["krause_op_share"] <= 0.10
        targets["krause_decode_step_at_2048_le_1.15x"] = by_t[2048]["decode_ratio_krause"] <= 1.15
    targets["krause_decode_memory_constant_in_T"] = (
        len({r["cache_krause_krause_bytes"] for r in rows}) == 1 and len({r["cache_krause_gated_bytes"] for r in rows}) == 1)
    targets["param_memory_le_1.02x"] = params["ratio"] <= 1.02
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    write_json(args.out, {"machine": info, "memory_method": MEMORY_METHOD[device.type], "shape": shape,
                          "dtype": str(dtype), "lengths": rows, "parameters": params, "paper_shapes": paper,
                          "targets": targets})
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
