"""Pixel-model decoding and training speed: KARM vs ARM vs LARM, side by side.

    python -m benchmarks.generation                  # paper models (CPU: ~15-20 min; GPU: minutes)
    python -m benchmarks.generation --quick          # small models, same sequence shapes, < 2 min on CPU
    python -m benchmarks.generation --device cuda --batch 64

For each shape (MNIST: 784 tokens, CIFAR-10: 3,072 tokens) and attention
(krause = KARM with its window cache (the last W keys/values), vanilla = ARM with a KV cache, linear = LARM
with its recurrent state), all with the same model size and batch:

  decode     images/s and tokens/s of sampling whole images (every pixel, from the start
             token), one timed run after a warm-up;
  memory     bytes held by the decoding caches at the last token, plus the peak extra
             bytes of one decoding step there (CPU: peak resident memory, see _timing.py;
             CUDA: max_memory_allocated), and on CUDA the peak over the whole decode;
  step       time of one decoding step at token 300 and at token 3,000 (CIFAR-10 shape),
             median of interleaved rounds of 10 steps each: a constant-memory decoder is
             flat in position, a KV-cache decoder is not;
  train      time of one optimizer step (forward, backward, AdamW) at the training batch.

Targets from the issue (on the paper's H100): KARM >= 2.4x ARM images/s at the CIFAR-10
shape, and KARM's step at token 3,000 within 1.2x of its step at token 300. The printed
table says whether this run meets them; absolute numbers depend on the machine (the JSON
records it).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


from benchmarks import _timing as T

from autoregressive_transformers import PixelTransformer, model_config
from autoregressive_transformers.common import autocast

ATTNS = ("krause", "vanilla", "linear")
NAMES = {"krause": "KARM", "vanilla": "ARM", "linear": "LARM"}
SHAPES = ("mnist", "cifar10")
# --quick: the paper's sequence shapes, windows and top-k, with small models.
QUICK_MODEL = dict(dim=64, num_layers=2, num_heads=2)
STEP_POSITIONS = (300, 3000)
STEPS_PER_ROUND = 10


def build(shape: str, attn: str, quick: bool, device) -> PixelTransformer:
    torch.manual_seed(0)
    cfg = model_config(shape, attn, dropout=0.0, **(QUICK_MODEL if quick else {}))
    return PixelTransformer(cfg).to(device).eval()


def cache_dtype(precision: str):
    return torch.bfloat16 if precision == "bf16" else None


@torch.inference_mode()
def prefilled_state(model, batch: int, position: int, device, precision: str):
    """A decoding state that has seen the start token and ``position`` - 1 pixels."""
    state = model.new_state(batch, device, cache_dtype(precision))
    ids = torch.randint(0, 256, (batch, position), device=device)
    ids[:, 0] = model.start_token
    with autocast(device, precision):
        for s in range(0, position, 512):  # chunks keep prefill activations small
            model.decode(ids[:, s:s + 512], state)
    return state


def decode_steps(model, state, n: int, device, precision: str):
    ids = torch.randint(0, 256, (state.batch_size, 1), device=device)
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(n):
            model.decode(ids, state)


def bench_decode(model, batch: int, device, precision: str) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode(), autocast(device, precision):
        warm = model.new_state(batch, device, cache_dtype(precision))
        for _ in range(8):
            model.decode(torch.full((batch, 1), model.start_token, device=device), warm) if warm.pos == 0 else \
                model.decode(torch.zeros(batch, 1, dtype=torch.long, device=device), warm)
        del warm
        stats: dict = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        seconds = T.time_once(lambda: model.sample(batch, 1.0, generator=generator, dtype=cache_dtype(precision),
                                                   stats=stats), device)
        out = {"seconds": seconds, "images_per_s": batch / seconds,
               "tokens_per_s": batch * model.cfg.seq_len / seconds, "cache_bytes": stats["cache_bytes"]}
        if device.type == "cuda":
            out["decode_peak_bytes_cuda"] = torch.cuda.max_memory_allocated(device) - base
    return out


def bench_step_memory(model, batch: int, device, precision: str) -> int:
    """Peak extra bytes of one decoding step at the last position."""
    state = prefilled_state(model, batch, model.cfg.seq_len - 1, device, precision)
    return T.peak_memory(lambda: decode_steps(model, state, 1, device, precision), device)


def bench_steps(models: dict, batch: int, device, precision: str, repeats: int) -> dict:
    cases = {}
    for attn, model in models.items():
        for pos in STEP_POSITIONS:
            state = prefilled_state(model, batch, pos, device, precision)
            cases[(attn, pos)] = (lambda m=model, s=state: decode_steps(m, s, STEPS_PER_ROUND, device, precision))
    named = {f"{a}@{p}": fn for (a, p), fn in cases.items()}
    timed = T.time_interleaved(named, device, repeats=repeats, warmup=1)
    return {name: r["median_s"] / STEPS_PER_ROUND for name, r in timed.items()}


def bench_train(models: dict, batch: int, device, precision: str, repeats: int) -> dict:
    cases = {}
    for attn, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, 256, (batch, model.cfg.seq_len), device=device)

        def step(m=model, o=opt, x=x):
            with autocast(device, precision):
                loss = m.nll(x)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

        cases[attn] = step
    timed = T.time_interleaved(cases, device, repeats=repeats, warmup=1)
    for model in models.values():
        model.eval()
    return {attn: r["median_s"] for attn, r in timed.items()}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small models (same shapes), fewer repeats")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="decode batch (default: 8; 64 on CUDA)")
    p.add_argument("--train_batch", type=int, default=None,
                   help="training batch (default: the paper's per-GPU 64 / 8 on CUDA, 2 on CPU)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of mnist,cifar10")
    p.add_argument("--attns", default=",".join(ATTNS), help="comma-separated subset of krause,vanilla,linear")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds for step / train timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: decode,memory,step,train")
    p.add_argument("--out", default=None, help="JSON path (default: results/generation[_quick].json)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in args.shapes.split(",") if s]
    attns = [a for a in args.attns.split(",") if a]
    skip = {s for s in args.skip.split(",") if s}
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r} (choose from {SHAPES})")
    for a in attns:
        if a not in ATTNS:
            p.error(f"--attns: unknown attention {a!r} (choose from {ATTNS})")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    out_path = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                                        "generation_quick.json" if args.quick else "generation.json")

    info = T.machine_info(device)
    print(f"machine: {T.describe_machine(info)}; precision {precision}; decode batch {batch}")
    results: dict = {"machine": info, "precision": precision, "quick": args.quick, "decode_batch": batch,
                     "memory_method": T.MEMORY_METHOD[device.type], "shapes": {}}
    for shape in shapes:
        models = {a: build(shape, a, args.quick, device) for a in attns}
        cfg = next(iter(models.values())).cfg
        train_batch = args.train_batch or ((64 if shape == "mnist" else 8) if device.type == "cuda" else 2)
        entry = {"model": {k: v for k, v in cfg.to_dict().items() if k != "attn"},
                 "params": {a: sum(p.numel() for p in m.parameters()) for a, m in models.items()},
                 "train_batch": train_batch, "attn": {a: {} for a in attns}}
        for attn, model in models.items():
            r = entry["attn"][attn]
            if "decode" not in skip:
                t0 = time.perf_counter()
                r.update(bench_decode(model, batch, device, precision))
                print(f"  {shape:7s} {NAMES[attn]:4s} decode: {r['images_per_s']:.3g} images/s "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if "step" not in skip and cfg.seq_len > max(STEP_POSITIONS) + STEPS_PER_ROUND * (repeats + 1):
            steps = bench_steps(models, batch, device, precision, repeats)
            for attn in attns:
                for pos in STEP_POSITIONS:
                    entry["attn"][attn][f"step_s_at_{pos}"] = steps[f"{attn}@{pos}"]
        if "train" not in skip:
            train = bench_train(models, train_batch, device, precision, repeats)
            for attn in attns:
                entry["attn"][attn]["train_step_s"] = train[attn]
        results["shapes"][shape] = entry
        del models
    if "memory" not in skip:  # after every timing: a CPU memory measurement changes the allocator for good
        for shape in shapes:
            for attn in attns:
                model = build(shape, attn, args.quick, device)
                step_peak = bench_step_memory(model, batch, device, precision)
                cache = prefilled_state(model, batch, model.cfg.seq_len, device, precision).nbytes
                results["shapes"][shape]["attn"][attn].update(
                    cache_bytes_last_token=cache, step_peak_bytes=step_peak, decode_memory_bytes=cache + step_peak)
                del model

    # ------------------------------------------------------------------ report
    rows = []
    for shape, entry in results["shapes"].items():
        karm = entry["attn"].get("krause", {})
        for attn, r in entry["attn"].items():
            step_ratio = ratio(r.get("step_s_at_3000"), r.get("step_s_at_300"))
            r["step_3000_over_300"] = step_ratio
            rows.append([shape, NAMES[attn], f"{r['images_per_s']:.3g}" if "images_per_s" in r else "—",
                         T.fmt_ratio(ratio(karm.get("images_per_s"), r.get("images_per_s"))),
                         T.fmt_bytes(r.get("decode_memory_bytes")), T.fmt_bytes(r.get("decode_peak_bytes_cuda")),
                         T.fmt_time(r.get("step_s_at_300")), T.fmt_time(r.get("step_s_at_3000")),
                         T.fmt_ratio(step_ratio), T.fmt_time(r.get("train_step_s")),
                         T.fmt_ratio(ratio(r.get("train_step_s"), karm.get("train_step_s")))])
    headers = ["shape", "model", "images/s", "KARM speedup", "decode mem", "CUDA peak", "step@300", "step@3000",
               "3000/300", "train step", "vs KARM"]
    print()
    print(T.table(headers, rows))
    checks = {}
    cifar = results["shapes"].get("cifar10", {}).get("attn", {})
    if "images_per_s" in cifar.get("krause", {}) and "images_per_s" in cifar.get("vanilla", {}):
        speedup = cifar["krause"]["images_per_s"] / cifar["vanilla"]["images_per_s"]
        checks["karm_over_arm_cifar10"] = {"value": speedup, "target": 2.4, "met": speedup >= 2.4}
    if cifar.get("krause", {}).get("step_3000_over_300") is not None:
        flat = cifar["krause"]["step_3000_over_300"]
        checks["karm_step_3000_over_300"] = {"value": flat, "target": 1.2, "met": flat <= 1.2}
    results["checks"] = checks
    for name, c in checks.items():
        print(f"{name}: {c['value']:.2f} (target {'>=' if name.startswith('karm_over') else '<='} {c['target']}): "
              f"{'met' if c['met'] else 'NOT met'}")
    T.write_json(out_path, results)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
