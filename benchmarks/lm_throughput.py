"""Training throughput, peak memory and MFU of the language model per attention type, side by side.

    python -m benchmarks.lm_throughput                  # CPU: blocks 1024 and 4096, small config
    python -m benchmarks.lm_throughput --quick          # smoke run (blocks 256 and 1024, one round)
    python -m benchmarks.lm_throughput --device cuda --batch 8 --precision bf16 --config 100m

A train step is what language_models_100m.train runs per micro-batch: forward, next-token
cross-entropy, backward and an AdamW step, on random tokens. The five models share every
weight shape except the attention. Steps are timed in interleaved rounds (one step of each
attention type per round, order rotated; median over rounds), so a slow phase of a shared
machine hits all of them alike. Peak memory is tensor memory above what was live before
the step, from a separate untimed step (benchmarks/_timing.py). FLOPs per step are the
training's count (``language_models_100m.steps.train_flops_per_token``: FlopCounterMode, in
which the Krause op counts its sparse cost, and Longformer / routing count the pairs they
attend instead of their dense masked SDPA's T²; krause/flops.py); MFU = achieved
FLOP/s / --peak_tflops (known GPUs: their dense bf16 peak; on CPU pass your own).

Targets (CPU): pure Krause >= 1.5x the tokens/s of standard attention at block 4096; the
gated mix's time over standard <= its FLOPs over standard + 0.20.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F


from benchmarks import _timing as T

from krause.training.throughput import known_peak_flops
from language_models_100m import ATTENTIONS, build_model
from language_models_100m.steps import train_flops_per_token

# the GPT-2 end-of-text id (50256) is outside the small vocabulary: no special tokens (nothing is generated)
SMALL = dict(n_embd=128, n_layer=2, n_head=2, n_inner=512, vocab_size=4096, bos_token_id=None, eos_token_id=None)


def make_case(attention: str, config: str, block: int, batch: int, device, precision: str):
    overrides = dict(SMALL) if config == "small" else {}
    base = "100m" if config == "small" else config
    torch.manual_seed(0)
    model = build_model(base, attention, dropout=0.0, **overrides, n_positions=max(block, 1024)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (batch, block + 1), device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def fwd_bwd():
        with ctx():
            logits = model(tokens[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, fwd_bwd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small", help="small (dim 128, 2 layers) or a preset: 100m, 200m")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="default 1024 4096 (quick: 256 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, quick 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="results/lm_throughput.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    blocks = args.blocks or ([256, 1024] if args.quick else [1024, 4096])
    repeats = args.repeats or (1 if args.quick else 3)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else known_peak_flops(device)
    info = T.machine_info(device)
    print(T.describe_machine(info))
    rows, results = [], []
    timings, flops_all = {}, {}
    for block in blocks:  # every timing first: a CPU memory measurement changes the allocator for good
        cases = {}
        for attention in args.attentions:
            model, step, _ = make_case(attention, args.config, block, args.batch, device, args.precision)
            flops_all[block, attention] = train_flops_per_token(model, block, device) * block * args.batch
            cases[attention] = step
        timings[block] = T.time_interleaved(cases, device, repeats=repeats, warmup=1)
        del cases, model, step
    memories = {}
    for block in blocks:  # then each case's first step, built afresh
        for attention in args.attentions:
            _, step, _ = make_case(attention, args.config, block, args.batch, device, args.precision)
            memories[block, attention] = T.peak_memory(step, device)
            del step
    for block in blocks:
        timing = timings[block]
        flops = {attention: flops_all[block, attention] for attention in args.attentions}
        memory = {attention: memories[block, attention] for attention in args.attentions}
        tokens = args.batch * block
        std = timing.get("standard")
        for attention in args.attentions:
            t = timing[attention]["median_s"]
            rate = tokens / t
            achieved = flops[attention] / t
            record = dict(block=block, attention=attention, step_s=t, cpu_s=timing[attention]["cpu_median_s"],
                          tokens_per_s=rate, peak_memory_bytes=memory[attention], train_flops=flops[attention],
                          achieved_tflops=achieved / 1e12, mfu=achieved / peak if peak else None)
            if std is not None:
                record["speed_vs_standard"] = std["median_s"] / t
                record["time_over_standard"] = t / std["median_s"]
                record["flops_over_standard"] = flops[attention] / flops["standard"]
            results.append(record)
            rows.append([block, attention, f"{rate:,.0f}", T.fmt_time(t), T.fmt_bytes(memory[attention]),
                         f"{flops[attention] / 1e9:.2f}", f"{achieved / 1e9:.1f}",
                         "—" if record["mfu"] is None else f"{record['mfu']:.1%}",
                         T.fmt_ratio(record.get("speed_vs_standard")), T.fmt_ratio(record.get("flops_over_standard"))])
    headers = ["block", "attention", "tokens/s", "step", "peak mem", "GFLOP/step", "GFLOP/s", "MFU",
               "speed vs std", "FLOPs vs std"]
    print(T.table(headers, rows, markdown=True))
    targets = {}
    by = {(r["block"], r["attention"]): r for r in results}
    top = max(blocks)
    if (top, "krause") in by and (top, "standard") in by:
        speed = by[(top, "krause")]["speed_vs_standard"]
        targets["krause_speed_vs_standard"] = dict(block=top, value=speed, target=1.5, met=speed >= 1.5)
    if (top, "gated") in by and (top, "standard") in by:
        g = by[(top, "gated")]
        bound = g["flops_over_standard"] + 0.2
        targets["gated_time_over_standard"] = dict(block=top, value=g["time_over_standard"], target=bound,
                                                   met=g["time_over_standard"] <= bound)
    for name, t in targets.items():
        print(f"{name} at block {t['block']}: {t['value']:.2f} (target {'>=' if 'speed' in name else '<='} "
              f"{t['target']:.2f}): {'met' if t['met'] else 'MISSED'}")
    T.write_json(args.out, dict(machine=info, settings=vars(args), results=results, targets=targets))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
