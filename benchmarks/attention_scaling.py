"""Forward+backward time and peak memory of Krause attention against its dense
reference and standard attention, side by side in one run.

    python -m benchmarks.attention_scaling                 # full run (2-core CPU: ~10 min)
    python -m benchmarks.attention_scaling --quick         # smoke test, < 1 min
    python -m benchmarks.attention_scaling --threads 1     # every implementation on one core
    python -m benchmarks.attention_scaling --device cuda   # GPU run: hands over to attention_cuda.py
    python -m benchmarks.attention_scaling --tune --threads 1
        # the sweeps behind neighbourhoods.band_block_size, CHUNK_SCORES,
        # BAND_CHUNK_SCORES, DENSE_CHUNK_SCORES and ops.DENSE_2D_MAX_TOKENS

Causal (language models): B=1, H=8, D=64, window W=32, top_k=16, T = 1k ... 32k:
  krause        causal_krause_attention (linear-time custom op, hand-written backward)
  reference     the dense O(T^2) reference (autograd), while it fits in memory
  sdpa          F.scaled_dot_product_attention(is_causal=True): full causal attention
  flex          FlexAttention with a sliding-window block mask, compiled (CUDA only:
                torch 2.14's FlexAttention refuses to differentiate on CPU, and its CPU
                forward alone is not what we compare)

2-D (vision transformers): ViT-S heads (H=6, D=64), one CLS token, grids
  8x8 (CIFAR: Manhattan r=1, top_k 2, B=32), 14x14 (ImageNet 224/16: Chebyshev r=2,
  top_k 8, B=8), 28x28 (B=2) and 64x64 (B=1), both Chebyshev r=2, top_k 8; batch sizes
  keep each call at 1.5k-4k tokens (B=32 is CIFAR's batch of 256 over 8 devices):
  krause auto   the op's default (krause.dispatch): the compiled CPU kernel where it is
                built, else the engine's dense score matmul for N <= DENSE_2D_MAX_TOKENS
  krause sparse impl="fast": the compiled CPU kernel, else the engine's shifted-view grid path
  reference     the dense reference
  sdpa          full (unmasked) F.scaled_dot_product_attention: what ViT-S runs

Every timed call is forward + backward of sum(out * g) for a fixed random g, in fp32
(--dtype to change), timed in interleaved rounds (median wall time; the JSON also has
the process CPU time); peak memory comes from a separate untimed call (see
benchmarks/_timing.py for how it is measured). The load average before and after each
row goes into the JSON: on a shared machine, compare rows measured at similar load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F


from benchmarks import _timing as T

import krause
from krause import engine, neighbourhoods, ops

CAUSAL = dict(heads=8, head_dim=64, window=32, top_k=16, batch=1)
CAUSAL_T_FULL = [1024, 2048, 4096, 8192, 16384, 32768]
CAUSAL_T_QUICK = [512, 1024, 2048]

VIT = dict(heads=6, head_dim=64, prefix=1)
# (rows, cols, metric, radius, top_k, batch)
GRIDS_FULL = [
    (8, 8, "manhattan", 1, 2, 32),
    (14, 14, "chebyshev", 2, 8, 8),
    (28, 28, "chebyshev", 2, 8, 2),
    (64, 64, "chebyshev", 2, 8, 1),
]
GRIDS_QUICK = [(8, 8, "manhattan", 1, 2, 8), (14, 14, "chebyshev", 2, 8, 2)]

# The dense reference keeps about this many (B, H, N, N) fp32 tensors alive at its peak
# (distances, masked distances, the keep mask, logits, probabilities and autograd's
# saved copies; measured 7.1 at T=4096).
REFERENCE_NN_TENSORS = 8


# --------------------------------------------------------------------------- helpers
def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _reference_fits(batch, heads, n, device, budget_fraction) -> tuple[bool, str]:
    need = REFERENCE_NN_TENSORS * batch * heads * n * n * 4
    budget = budget_fraction * _available_bytes(device)
    if need <= budget:
        return True, ""
    return False, f"skipped: needs ~{T.fmt_bytes(need)} (> {budget_fraction:.0%} of free memory)"


def _fwd_bwd(fn: Callable, leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def step():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out.backward(grad)

    step.leaves = leaves
    return step


def _inputs(batch, heads, n, dim, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
    log_sigma = torch.tensor(1.5, device=device).requires_grad_(True)
    grad = torch.randn(batch, heads, n, dim, generator=g).to(device, dtype)
    return [q, k, v, log_sigma], grad


def _measure(cases: dict[str, Callable[[], None]], skipped: dict[str, str], args, device,
             phase: str = "time") -> dict[str, dict]:
    """Times the runnable cases together (phase "time"), or measures each one's peak memory
    (phase "memory": a second pass after every timing, as a CPU measurement changes the
    allocator for the rest of the process)."""
    results = {name: {"skipped": reason} for name, reason in skipped.items()}
    if phase == "memory":
        def clear_grads(case):  # measure from a state without the previous call's gradients
            for t in getattr(case, "leaves", ()):
                t.grad = None

        for name, case in cases.items():
            case()  # warm, as the timed runs were
            clear_grads(case)
            results[name] = {"peak_bytes": T.peak_memory(case, device)}
        return results
    results["load_average_before"] = T.load_average()
    if cases:
        timed = T.time_interleaved(
            cases, device, repeats=args.repeats, warmup=1, max_seconds_per_case=args.max_seconds_per_case
        )
        for name, res in timed.items():
            results[name] = dict(res)
    results["load_average_after"] = T.load_average()
    return results


def add_memory(rows: list[dict], memory_rows: list[dict]) -> None:
    """Merges the memory pass's peak bytes into the timed rows (same sizes, same order)."""
    for row, mem in zip(rows, memory_rows, strict=True):
        for name, res in mem["results"].items():
            row["results"].setdefault(name, {}).update(res)


def _get(res, name, key):
    r = res.get(name, {})
    return r.get(key)


def _ratio(a, b):
    return None if a is None or b is None else a / b


# --------------------------------------------------------------------------- causal
def _flex_causal(window, n, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(sliding, None, None, n, n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, ls: compiled(q, k, v, block_mask=block_mask)


def bench_causal(args, device, phase: str = "time") -> list[dict]:
    c = CAUSAL
    rows = []
    for n in args.causal_tokens:
        leaves, grad = _inputs(c["batch"], c["heads"], n, c["head_dim"], device, args.dtype)
        fns = {
            "krause": lambda q, k, v, ls: krause.causal_krause_attention(q, k, v, ls, c["window"], c["top_k"]),
            "reference": lambda q, k, v, ls: krause.causal_krause_attention(
                q, k, v, ls, c["window"], c["top_k"], impl="reference"
            ),
            "sdpa": lambda q, k, v, ls: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        skipped = {}
        fits, why = _reference_fits(c["batch"], c["heads"], n, device, args.reference_memory_fraction)
        if not fits:
            skipped["reference"] = why
        if n > args.sdpa_max_tokens:
            skipped["sdpa"] = f"skipped: T > --sdpa-max-tokens {args.sdpa_max_tokens}"
        if device.type == "cuda":
            fns["flex"] = _flex_causal(c["window"], n, device)
        else:
            skipped["flex"] = "skipped: FlexAttention has no CPU backward"
        cases = {name: _fwd_bwd(fn, leaves, grad) for name, fn in fns.items() if name not in skipped}
        res = _measure(cases, skipped, args, device, phase)
        row = {"T": n, **{k: v for k, v in c.items()}, "results": res}
        rows.append(row)
        if phase == "time":
            print(
                f"  causal T={n:>6}: "
                + ", ".join(f"{name} {T.fmt_time(_get(res, name, 'median_s'))}"
                            for name in ("krause", "reference", "sdpa", "flex"))
                + f"  (load {res['load_average_before'][0] if res['load_average_before'] else '?'})",
                flush=True,
            )
        del leaves, grad, cases
    return rows


def causal_tables(rows, markdown=False) -> str:
    names = ("krause", "reference", "sdpa", "flex")
    time_rows, mem_rows = [], []
    for row in rows:
        res = row["results"]
        t = {n: _get(res, n, "median_s") for n in names}
        m = {n: _get(res, n, "peak_bytes") for n in names}
        time_rows.append(
            [f"{row['T']:,}"] + [T.fmt_time(t[n]) for n in names]
            + [T.fmt_ratio(_ratio(t["krause"], t["sdpa"])), T.fmt_ratio(_ratio(t["reference"], t["krause"]))]
        )
        mem_rows.append([f"{row['T']:,}"] + [T.fmt_bytes(m[n]) for n in names])
    out = [
        T.table(["T", "Krause", "dense reference", "SDPA causal", "Flex (window)", "Krause / SDPA",
                 "reference / Krause"], time_rows, markdown),
        "",
        "peak memory (forward + backward):",
        "",
        T.table(["T", "Krause", "dense reference", "SDPA causal", "Flex (window)"], mem_rows, markdown),
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- 2-D
def bench_2d(args, device, phase: str = "time") -> list[dict]:
    v = VIT
    rows = []
    for r, cc, metric, radius, top_k, batch in args.grids:
        n = v["prefix"] + r * cc
        leaves, grad = _inputs(batch, v["heads"], n, v["head_dim"], device, args.dtype, seed=1)

        def krause_fn(impl):
            return lambda q, k, vv, ls: krause.local_krause_attention_2d(
                q, k, vv, ls, (r, cc), radius, metric, top_k, v["prefix"], impl=impl
            )

        fns = {
            "krause auto": krause_fn("auto"),
            "krause sparse": krause_fn("fast"),
            "reference": krause_fn("reference"),
            "sdpa": lambda q, k, vv, ls: F.scaled_dot_product_attention(q, k, vv),
        }
        skipped = {}
        fits, why = _reference_fits(batch, v["heads"], n, device, args.reference_memory_fraction)
        if not fits:
            skipped["reference"] = why
        cases = {name: _fwd_bwd(fn, leaves, grad) for name, fn in fns.items() if name not in skipped}
        res = _measure(cases, skipped, args, device, phase)
        auto_path = krause.dispatch.choose_impl("local2d", device, "auto", dtype=leaves[0].dtype, grid=(r, cc),
                                                radius=radius, num_prefix=v["prefix"])
        rows.append({
            "grid": [r, cc], "N": n, "batch": batch, "metric": metric, "radius": radius, "top_k": top_k,
            "heads": v["heads"], "head_dim": v["head_dim"], "auto_path": auto_path, "results": res,
        })
        if phase == "time":
            print(
                f"  2-D {r}x{cc} B={batch}: "
                + ", ".join(f"{name} {T.fmt_time(_get(res, name, 'median_s'))}" for name in fns)
                + f"  (load {res['load_average_before'][0] if res['load_average_before'] else '?'})",
                flush=True,
            )
        del leaves, grad, cases
    return rows


def grid_tables(rows, markdown=False) -> str:
    names = ("krause auto", "krause sparse", "reference", "sdpa")
    time_rows, mem_rows = [], []
    for row in rows:
        res = row["results"]
        t = {n: _get(res, n, "median_s") for n in names}
        m = {n: _get(res, n, "peak_bytes") for n in names}
        label = f"{row['grid'][0]}×{row['grid'][1]} ({row['metric'][:4]} r={row['radius']}, k={row['top_k']})"
        head = [label, str(row["batch"]), str(row["N"])]
        time_rows.append(
            head + [T.fmt_time(t[n]) + (f" ({row['auto_path']})" if n == "krause auto" else "") for n in names]
            + [T.fmt_ratio(_ratio(t["krause auto"], t["sdpa"])), T.fmt_ratio(_ratio(t["reference"], t["krause auto"]))]
        )
        mem_rows.append(head + [T.fmt_bytes(m[n]) for n in names])
    heads = ["grid", "B", "N", "Krause auto", "Krause sparse", "dense reference", "SDPA (full)"]
    out = [
        T.table(heads + ["auto / SDPA", "reference / auto"], time_rows, markdown),
        "",
        "peak memory (forward + backward):",
        "",
        T.table(heads, mem_rows, markdown),
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- tuning
class _Patched:
    """Temporarily replaces module attributes (forward and backward must see the same)."""

    def __init__(self, module, **values):
        self.module, self.values, self.saved = module, values, {}

    def __enter__(self):
        for name, value in self.values.items():
            self.saved[name] = getattr(self.module, name)
            setattr(self.module, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)


def _patched_case(step, module, **values):
    def run():
        with _Patched(module, **values):
            step()

    return run


def _sweep(title, cases, args, device, key_name, key_values, extra=None) -> list[dict]:
    """Times cases {label: fn} interleaved; prints and returns rows ranked by CPU time."""
    timed = T.time_interleaved(cases, device, repeats=args.repeats, warmup=1)
    best = min(timed, key=lambda k: timed[k]["cpu_median_s"])
    rows = []
    for (label, res), value in zip(timed.items(), key_values):
        rows.append({key_name: value, **(extra or {}), **res})
    print(f"  {title}: " + ", ".join(
        f"{label} {T.fmt_time(res['cpu_median_s'])}" + ("*" if label == best else "") for label, res in timed.items()
    ), flush=True)
    return rows


def tune(args, device) -> dict:
    """Sweeps behind band_block_size, CHUNK_SCORES, DENSE_CHUNK_SCORES and
    DENSE_2D_MAX_TOKENS. Ranked by process CPU time (steadier than wall time on a shared
    machine); run with --threads 1 so that CPU time is the time of one core."""
    out: dict = {"band_block": [], "chunk_scores": [], "dense_chunk_scores": [], "dense_2d": []}
    c, v = CAUSAL, VIT
    n = args.tune_tokens
    print(f"\nCPU time per forward + backward (* = least); causal T={n}, H={c['heads']}, D={c['head_dim']}:")
    # Windows and top-k of the experiment families: LMs / LLMs (32, 16), pixel models
    # MNIST (128, 96) and CIFAR (256, 192).
    for window, top_k in args.tune_windows:
        leaves, grad = _inputs(1, c["heads"], n, c["head_dim"], device, args.dtype)
        step = _fwd_bwd(lambda q, k, vv, ls, w=window, kk=top_k: krause.causal_krause_attention(q, k, vv, ls, w, kk),
                        leaves, grad)
        blocks = sorted({b for b in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b <= max(window, 16)}
                        | {neighbourhoods.band_block_size(window)})
        cases = {f"C={b}": _patched_case(step, neighbourhoods, band_block_size=lambda w, b=b: b) for b in blocks}
        title = f"band block, W={window}, top_k={top_k} (rule: C={neighbourhoods.band_block_size(window)})"
        out["band_block"] += _sweep(title, cases, args, device, "block", blocks,
                                    {"window": window, "top_k": top_k, "T": n})
        budgets = [1 << e for e in (14, 15, 16, 17, 18)]
        cases = {f"2^{b.bit_length() - 1}": _patched_case(step, neighbourhoods, CHUNK_SCORES=b) for b in budgets}
        out["chunk_scores"] += _sweep(f"CHUNK_SCORES, W={window}", cases, args, device, "chunk_scores", budgets,
                                      {"case": f"causal W={window}"})
        del leaves, grad
    print("2-D (ViT-S heads, 1 CLS token):")
    for side, metric, radius, top_k in args.tune_grids:
        nn = v["prefix"] + side * side
        batch = max(1, args.tune_2d_tokens // nn)
        leaves, grad = _inputs(batch, v["heads"], nn, v["head_dim"], device, args.dtype, seed=2)

        def local(dense, side=side, metric=metric, radius=radius, top_k=top_k):
            return _fwd_bwd(
                lambda q, k, vv, ls: ops._local_fwd(
                    q, k, vv, ls, side, side, radius, metric, top_k, v["prefix"], dense
                )[0],
                leaves, grad)

        label = f"{side}x{side} {metric[:4]} r={radius} k={top_k} N={nn} B={batch}"
        timed = T.time_interleaved({"dense": local(True), "sparse": local(False)}, device,
                                   repeats=args.repeats, warmup=1)
        ratio = timed["sparse"]["cpu_median_s"] / timed["dense"]["cpu_median_s"]
        out["dense_2d"].append({"side": side, "N": nn, "batch": batch, "metric": metric, "radius": radius,
                                "top_k": top_k, "dense": timed["dense"], "sparse": timed["sparse"],
                                "sparse_over_dense_cpu": ratio})
        print(f"  dense vs sparse, {label}: dense {T.fmt_time(timed['dense']['cpu_median_s'])}, "
              f"sparse {T.fmt_time(timed['sparse']['cpu_median_s'])}, sparse/dense {ratio:.2f}", flush=True)
        if side in args.tune_chunk_sides:
            budgets = [1 << e for e in (14, 15, 16, 17, 18)]
            cases = {f"2^{b.bit_length() - 1}": _patched_case(local(False), neighbourhoods, CHUNK_SCORES=b)
                     for b in budgets}
            out["chunk_scores"] += _sweep(f"CHUNK_SCORES, sparse {label}", cases, args, device, "chunk_scores", budgets,
                                          {"case": f"grid {side}x{side}"})
        if nn <= 256:
            budgets = [1 << e for e in (15, 17, 19, 21)]
            cases = {f"2^{b.bit_length() - 1}": _patched_case(local(True), neighbourhoods, DENSE_CHUNK_SCORES=b)
                     for b in budgets}
            out["dense_chunk_scores"] += _sweep(f"DENSE_CHUNK_SCORES, dense {label}", cases, args, device,
                                                "dense_chunk_scores", budgets, {"case": f"grid {side}x{side}"})
        del leaves, grad
    return out


# --------------------------------------------------------------------------- main
def _targets(causal_rows, grid_rows) -> list[tuple[str, float | None, str, bool | None]]:
    """(description, measured, goal, met) for the targets this benchmark tracks."""
    def causal(n, name, key="median_s"):
        for row in causal_rows:
            if row["T"] == n:
                return _get(row["results"], name, key)
        return None

    def grid(side, name):
        for row in grid_rows:
            if row["grid"][0] == side:
                return _get(row["results"], name, "median_s")
        return None

    checks = []

    def add(desc, value, goal, ok_fn):
        checks.append((desc, value, goal, None if value is None else bool(ok_fn(value))))

    add("causal T=16k: Krause / SDPA time", _ratio(causal(16384, "krause"), causal(16384, "sdpa")),
        "≤ 0.2", lambda x: x <= 0.2)
    add("causal 8k→32k: Krause time growth", _ratio(causal(32768, "krause"), causal(8192, "krause")),
        "≤ 4.4", lambda x: x <= 4.4)
    add("causal 8k→32k: Krause peak-memory growth",
        _ratio(causal(32768, "krause", "peak_bytes"), causal(8192, "krause", "peak_bytes")),
        "≤ 4.4", lambda x: x <= 4.4)
    add("causal T=4k: reference / Krause time", _ratio(causal(4096, "reference"), causal(4096, "krause")),
        "≥ 20", lambda x: x >= 20)
    add("2-D 64×64: reference / Krause auto time", _ratio(grid(64, "reference"), grid(64, "krause auto")),
        "≥ 5", lambda x: x >= 5)
    add("2-D 8×8: Krause auto / SDPA time", _ratio(grid(8, "krause auto"), grid(8, "sdpa")),
        "≤ 1.2", lambda x: x <= 1.2)
    return checks


def targets_table(checks, markdown=False) -> str:
    rows = [[d, "—" if v is None else f"{v:.3g}", g, "—" if ok is None else ("met" if ok else "MISSED")]
            for d, v, g, ok in checks]
    return T.table(["target", "measured", "goal", ""], rows, markdown)


def _pair_arg(text: str):
    a, b = text.split(":")
    return int(a), int(b)


def _grid_arg(text: str):
    side, metric, radius, top_k = text.split(":")
    return int(side), metric, int(radius), int(top_k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test, < 1 minute)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="write results as JSON here (default results/attention_scaling.json)")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 5, quick 2)")
    p.add_argument("--max-seconds-per-case", type=float, default=None,
                   help="stop repeating a case once its timed runs add up to this (default 30, quick 5)")
    p.add_argument("--causal-tokens", type=int, nargs="*", default=None)
    p.add_argument("--sdpa-max-tokens", type=int, default=1 << 30)
    p.add_argument("--reference-memory-fraction", type=float, default=0.4,
                   help="run the dense reference only where it needs less than this fraction of free memory")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--only", choices=["causal", "2d"], default=None)
    p.add_argument("--tune", action="store_true", help="run the tuning sweeps instead of the comparison")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--tune-tokens", type=int, default=8192)
    p.add_argument("--tune-windows", type=_pair_arg, nargs="*", default=[(32, 16), (128, 96), (256, 192)],
                   help="WINDOW:TOP_K pairs for the band sweeps")
    p.add_argument("--tune-grids", type=_grid_arg, nargs="*",
                   default=[_grid_arg(s) for s in ("6:manhattan:1:2", "8:manhattan:1:2", "8:chebyshev:2:8",
                                                   "10:chebyshev:2:8", "12:chebyshev:2:8", "14:chebyshev:2:8",
                                                   "16:chebyshev:2:8", "20:chebyshev:2:8", "28:chebyshev:2:8",
                                                   "64:chebyshev:2:8")],
                   help="SIDE:METRIC:RADIUS:TOP_K grids for the dense/sparse sweep")
    p.add_argument("--tune-2d-tokens", type=int, default=4096, help="tokens per 2-D tuning run (sets the batch)")
    p.add_argument("--tune-chunk-sides", type=int, nargs="*", default=[14, 28, 64])
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not args.tune:  # the GPU comparison (Triton kernels, bf16 LLM/ViT shapes)
        import attention_cuda

        return attention_cuda.main((["--quick"] if args.quick else []) + (["--out", args.out] if args.out else []))
    args.dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.max_seconds_per_case is None:
        args.max_seconds_per_case = 5.0 if args.quick else 30.0
    if args.causal_tokens is None:
        args.causal_tokens = CAUSAL_T_QUICK if args.quick else CAUSAL_T_FULL
    args.grids = GRIDS_QUICK if args.quick else GRIDS_FULL
    if args.out is None:
        args.out = "results/attention_scaling_quick.json" if args.quick else "results/attention_scaling.json"

    info = T.machine_info(device)
    info["load_average_at_start"] = T.load_average()
    print("machine:", T.describe_machine(info), flush=True)
    payload = {
        "benchmark": "attention_scaling",
        "machine": info,
        "memory_method": T.MEMORY_METHOD.get(device.type),
        "dtype": str(args.dtype),
        "quick": args.quick,
        "repeats": args.repeats,
        "settings": {
            "DENSE_2D_MAX_TOKENS": ops.DENSE_2D_MAX_TOKENS,
            "band_block_size(W=32)": neighbourhoods.band_block_size(CAUSAL["window"]),
            "CHUNK_SCORES": neighbourhoods.CHUNK_SCORES,
            "BAND_CHUNK_SCORES": neighbourhoods.BAND_CHUNK_SCORES,
            "DENSE_CHUNK_SCORES": neighbourhoods.DENSE_CHUNK_SCORES,
            "torch_threads": torch.get_num_threads(),
        },
    }
    if args.tune:
        with krause.cpu.use_engine():  # the sweeps tune the PyTorch engine's constants
            payload["tune"] = tune(args, device)
        T.write_json(args.out, payload)
        print(f"\nwrote {args.out}")
        return 0

    causal_rows = grid_rows = []
    if args.only in (None, "causal"):
        print(f"\ncausal: B={CAUSAL['batch']}, H={CAUSAL['heads']}, D={CAUSAL['head_dim']}, "
              f"W={CAUSAL['window']}, top_k={CAUSAL['top_k']}, {args.dtype}", flush=True)
        causal_rows = bench_causal(args, device)
        payload["causal"] = causal_rows
    if args.only in (None, "2d"):
        print(f"\n2-D: H={VIT['heads']}, D={VIT['head_dim']}, 1 CLS token, {args.dtype}", flush=True)
        grid_rows = bench_2d(args, device)
        payload["grid_2d"] = grid_rows
    if not args.skip_memory:  # after every timing: a CPU memory measurement changes the allocator for good
        print("\npeak memory (a second pass)", flush=True)
        if causal_rows:
            add_memory(causal_rows, bench_causal(args, device, "memory"))
        if grid_rows:
            add_memory(grid_rows, bench_2d(args, device, "memory"))
    checks = _targets(causal_rows, grid_rows)
    payload["targets"] = [{"target": d, "measured": v, "goal": g, "met": ok} for d, v, g, ok in checks]
    T.write_json(args.out, payload)

    blocks = [f"machine: {T.describe_machine(info)}", ""]
    md = [f"Machine: {T.describe_machine(info)}. Forward + backward, {args.dtype}, median of "
          f"{args.repeats} interleaved rounds.", ""]
    if causal_rows:
        head = (f"causal (B={CAUSAL['batch']}, H={CAUSAL['heads']}, D={CAUSAL['head_dim']}, W={CAUSAL['window']}, "
                f"top_k={CAUSAL['top_k']}), forward + backward time:")
        blocks += [head, "", causal_tables(causal_rows), ""]
        md += [head, "", causal_tables(causal_rows, True), ""]
    if grid_rows:
        head = f"2-D local (ViT-S heads: H={VIT['heads']}, D={VIT['head_dim']}, 1 CLS token), forward + backward time:"
        blocks += [head, "", grid_tables(grid_rows), ""]
        md += [head, "", grid_tables(grid_rows, True), ""]
    blocks += ["targets:", "", targets_table(checks)]
    md += ["Targets:", "", targets_table(checks, True), ""]
    print("\n" + "\n".join(blocks))
    print(f"\nwrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(md))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
