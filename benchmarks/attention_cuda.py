"""GPU benchmark of the fused Triton Krause kernels against the other implementations
and the softmax baselines, side by side in one run (bf16).

    python -m benchmarks.attention_cuda --out results/attention_cuda.json
    python -m benchmarks.attention_cuda --quick          # smoke run, ~1-2 min
    python -m benchmarks.attention_scaling --device cuda # hands over to this module

Causal (LLM shapes): B=1, H=32, Hkv=8, D=128, W=32, top_k=16, T = 4k ... 64k:
  krause_triton   krause.kernels.causal_krause_attention_triton (fused, GQA read in place)
  krause_flex     causal_krause_attention(impl="flex"): FlexAttention + top-k threshold
  krause_engine   causal_krause_attention(impl="fast"): the chunked linear-time engine
  flex_sliding    FlexAttention sliding-window softmax, same W, no top-k (compiled)
  flash_window    FlashAttention-2 flash_attn_func(causal, window_size=(W-1, 0)), when installed
  natten_causal   NATTEN na1d(kernel_size=W, is_causal=True), when installed (K/V heads expanded)
  sdpa_causal     F.scaled_dot_product_attention(is_causal=True): full causal softmax
each forward+backward (of sum(out * g)) and forward only. The peers a user would pick
instead of Krause's window are the sliding-window softmaxes (flex, flash, natten).

2-D (ViT-S/16: H=6, ViT-B/16: H=12; D=64, 14x14 patches + CLS, Chebyshev r=2, top_k 8,
batch 256): krause_triton, krause_flex, krause_engine, unmasked SDPA (what a ViT runs) and,
when installed, NATTEN na2d with a 5x5 neighbourhood (radius 2) on the 14x14 patches (no CLS).

Decode (B=64 or --decode-batch, H=32, Hkv=8, D=128, W=32, top_k=16), one step at several positions:
  krause_triton   decode_krause_attention_triton on the W-slot ring buffer
  krause_torch    a dense torch decode step over the same ring
                  (krause.dense.krause_attention_grouped)
  sdpa_cache      SDPA of one query over a standard KV cache of `position` tokens

Bandwidth: every case is also reported as % of the device's memory bandwidth
(krause.training.throughput.known_peak_bandwidth, or --peak-gbps): the bytes it must move
at least (each input read once, each output written once: q, k, v, out forward; plus out,
its gradient, q, k, v and their gradients backward; a decode step reads only what it
attends to) over its time. 100 % is the memory roofline; far below it is headroom.

Timing: benchmarks/_timing.time_interleaved (median of interleaved rounds, after an
untimed warm-up call that also compiles); peak memory from a separate call. A case that
fails (out of memory, an older torch without an API) is recorded with its error and the
run goes on. ``--budget-s`` stops starting new rows once spent (the JSON says which).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F


from benchmarks import _timing as T

import krause
from krause import kernels
from krause.training.throughput import known_peak_bandwidth

CAUSAL = dict(batch=1, heads=32, kv_heads=8, head_dim=128, window=32, top_k=16)
CAUSAL_T = [4096, 8192, 16384, 32768, 65536]
CAUSAL_T_QUICK = [4096, 16384]
GRID = dict(grid=(14, 14), radius=2, metric="chebyshev", top_k=8, prefix=1, head_dim=64)
VITS = [("ViT-S/16", 6), ("ViT-B/16", 12)]
DECODE = dict(batch=64, heads=32, kv_heads=8, head_dim=128, window=32, top_k=16)
DECODE_POSITIONS = [32, 1024, 8192, 32768]
DECODE_POSITIONS_QUICK = [32, 4096]


def _randn(shape, device, dtype, gen, grad=False):
    t = torch.randn(shape, generator=gen, device="cpu").to(device, dtype)
    return t.requires_grad_(grad)


def _step(fn, leaves, grad_out, backward):
    """A zero-argument case: forward, and with `backward` the gradients of sum(out * g)."""
    if backward:
        def run():
            out = fn()
            torch.autograd.grad(out, leaves, grad_out)
    else:
        def run():
            with torch.no_grad():
                fn()
    return run


def _flex_sliding(window, n, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(sliding, None, None, n, n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def _optional(module: str):
    """The module, or an exception saying it is not installed (recorded as that case's error)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - not installed or built for another CUDA: recorded
        return ModuleNotFoundError(f"{module} is not installed here ({type(exc).__name__})")


def _bshd(*tensors, grad: bool):
    """(B, H, T, D) -> contiguous (B, T, H, D) leaves, the layout flash-attn and NATTEN take."""
    return [t.detach().transpose(1, 2).contiguous().requires_grad_(grad) for t in tensors]


def _peer_causal(name, q, k, v, g, window):
    """(fn, leaves, grad_out) of a peer library's causal sliding-window softmax, or a raiser."""
    lib = _optional({"flash_window": "flash_attn", "natten_causal": "natten"}[name])
    if isinstance(lib, Exception):
        return _raiser(lib), [], None
    rep = q.shape[1] // k.shape[1]
    if name == "flash_window":  # GQA read in place
        qt, kt, vt = _bshd(q, k, v, grad=True)
        fn = lambda: lib.flash_attn_func(qt, kt, vt, causal=True, window_size=(window - 1, 0))  # noqa: E731
    else:  # NATTEN takes equal head counts: the K/V heads are expanded (its traffic is counted as such)
        qt, kt, vt = _bshd(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), grad=True)
        fn = lambda: lib.functional.na1d(qt, kt, vt, kernel_size=window, is_causal=True)  # noqa: E731
    return fn, [qt, kt, vt], g.detach().transpose(1, 2).contiguous()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _add_bandwidth(results: dict, moved: dict, peak: float | None) -> None:
    """results[name]["pct_bandwidth"] = bytes moved at least / time / peak (where all are known)."""
    for name, r in results.items():
        need = moved.get(name)
        r["min_bytes"] = need
        if peak and need and r.get("median_s"):
            r["pct_bandwidth"] = 100.0 * need / r["median_s"] / peak


def _measure(cases, device, args, memory=True):
    """{name: result}: failing cases keep their error; the rest are timed together."""
    results, ok = {}, {}
    for name, fn in cases.items():
        try:
            fn()  # warm-up: compiles FlexAttention / the Triton kernels
            T.synchronize(device)
            ok[name] = fn
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            _empty_cache(device)
    if ok:
        timed = T.time_interleaved(ok, device, repeats=args.repeats, warmup=1,
                                   max_seconds_per_case=args.max_seconds_per_case)
        for name in ok:
            results[name] = {"median_s": timed[name]["median_s"], "times_s": timed[name]["times_s"]}
            if memory:
                try:
                    results[name]["peak_bytes"] = T.peak_memory(ok[name], device)
                except Exception as exc:  # noqa: BLE001
                    results[name]["peak_error"] = str(exc)[:200]
    return results


def _empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _raiser(exc):
    """A case that fails the way building it did (so the row records the error)."""
    def run():
        raise exc
    return run


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- causal
def bench_causal(args, device, deadline) -> list[dict]:
    c = CAUSAL
    rows = []
    for n in args.causal_tokens:
        if time.monotonic() > deadline:
            rows.append({"tokens": n, "skipped": "time budget spent"})
            continue
        gen = torch.Generator().manual_seed(n)
        q = _randn((c["batch"], c["heads"], n, c["head_dim"]), device, args.dtype, gen, True)
        k = _randn((c["batch"], c["kv_heads"], n, c["head_dim"]), device, args.dtype, gen, True)
        v = _randn((c["batch"], c["kv_heads"], n, c["head_dim"]), device, args.dtype, gen, True)
        ls = torch.full((c["heads"],), 1.5, device=device, requires_grad=True)
        g = _randn(q.shape, device, args.dtype, gen)
        w, top_k = c["window"], c["top_k"]
        krause_fns = {
            "krause_triton": lambda: kernels.causal_krause_attention_triton(q, k, v, ls, w, top_k),
            "krause_flex": lambda: krause.causal_krause_attention(q, k, v, ls, w, top_k, impl="flex"),
            "krause_engine": lambda: krause.causal_krause_attention(q, k, v, ls, w, top_k, impl="fast"),
        }
        base_fns = {"sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        try:
            flex = _flex_sliding(w, n, device)
            base_fns["flex_sliding"] = lambda: flex(q, k, v)
        except Exception as exc:  # noqa: BLE001
            base_fns["flex_sliding"] = _raiser(exc)
        peers = {name: _peer_causal(name, q, k, v, g, w) for name in ("flash_window", "natten_causal")}
        io = _nbytes(q, k, v) + _nbytes(q)  # q, k, v in, out (q's shape) written
        moved = {"fwd": io, "fwd_bwd": io + (io + _nbytes(q)) + _nbytes(q, k, v)}  # + out, dout, q, k, v; dq, dk, dv
        row = {"tokens": n}
        try:  # the kernels agree with the engine here (same top-k rule up to exact ties)
            with torch.no_grad():
                row["max_abs_diff_triton_vs_engine"] = _max_diff(krause_fns["krause_triton"](), krause_fns["krause_engine"]())
        except Exception as exc:  # noqa: BLE001
            row["check_error"] = str(exc)[:200]
        for backward, label in ((True, "fwd_bwd"), (False, "fwd")):
            cases = {name: _step(fn, [q, k, v, ls], g, backward) for name, fn in krause_fns.items()}
            cases.update({name: _step(fn, [q, k, v], g, backward) for name, fn in base_fns.items()})
            cases.update({name: _step(fn, leaves, gt, backward) if leaves else fn
                          for name, (fn, leaves, gt) in peers.items()})
            row[label] = _measure(cases, device, args, memory=backward and not args.skip_memory)
            _add_bandwidth(row[label], dict.fromkeys(cases, moved[label]), args.peak_bandwidth)
        rows.append(row)
        _print_row(f"causal T={n}", row)
        del q, k, v, g
        _empty_cache(device)
    return rows


# --------------------------------------------------------------------------- 2-D
def bench_2d(args, device, deadline) -> list[dict]:
    gcfg = GRID
    n = gcfg["prefix"] + gcfg["grid"][0] * gcfg["grid"][1]
    rows = []
    for name, heads in VITS:
        if time.monotonic() > deadline:
            rows.append({"model": name, "skipped": "time budget spent"})
            continue
        gen = torch.Generator().manual_seed(heads)
        shape = (args.vit_batch, heads, n, gcfg["head_dim"])
        q, k, v = (_randn(shape, device, args.dtype, gen, True) for _ in range(3))
        ls = torch.full((heads,), 1.5, device=device, requires_grad=True)
        g = _randn(shape, device, args.dtype, gen)
        spec = (gcfg["grid"], gcfg["radius"], gcfg["metric"], gcfg["top_k"], gcfg["prefix"])
        krause_fns = {
            "krause_triton": lambda: kernels.local_krause_attention_2d_triton(q, k, v, ls, *spec),
            "krause_flex": lambda: krause.local_krause_attention_2d(q, k, v, ls, *spec, impl="flex"),
            "krause_engine": lambda: krause.local_krause_attention_2d(q, k, v, ls, *spec, impl="fast"),
        }
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        natten = _optional("natten")
        if isinstance(natten, Exception):
            natten_case = (_raiser(natten), [], None)
        else:  # the patch grid only (NATTEN has no prefix token): (B, 14, 14, H, D)
            gh, gw = gcfg["grid"]
            grid = [t[:, :, gcfg["prefix"]:].detach().transpose(1, 2).reshape(args.vit_batch, gh, gw, heads, -1)
                    .contiguous().requires_grad_(True) for t in (q, k, v)]
            g_grid = g[:, :, gcfg["prefix"]:].transpose(1, 2).reshape(grid[0].shape).contiguous()
            natten_case = (lambda: natten.functional.na2d(*grid, kernel_size=2 * gcfg["radius"] + 1), grid, g_grid)
        io = 4 * _nbytes(q)
        moved = {"fwd": io, "fwd_bwd": io + 5 * _nbytes(q) + 3 * _nbytes(q)}
        row = {"model": name, "batch": args.vit_batch, "heads": heads, "tokens": n}
        try:
            with torch.no_grad():
                row["max_abs_diff_triton_vs_engine"] = _max_diff(krause_fns["krause_triton"](), krause_fns["krause_engine"]())
        except Exception as exc:  # noqa: BLE001
            row["check_error"] = str(exc)[:200]
        for backward, label in ((True, "fwd_bwd"), (False, "fwd")):
            cases = {nm: _step(fn, [q, k, v, ls], g, backward) for nm, fn in krause_fns.items()}
            cases["sdpa"] = _step(sdpa, [q, k, v], g, backward)
            fn, leaves, gt = natten_case
            cases["natten_2d"] = _step(fn, leaves, gt, backward) if leaves else fn
            row[label] = _measure(cases, device, args, memory=backward and not args.skip_memory)
            _add_bandwidth(row[label], dict.fromkeys(cases, moved[label]), args.peak_bandwidth)
        rows.append(row)
        _print_row(f"2-D {name}", row)
        del q, k, v, g
        _empty_cache(device)
    return rows


# --------------------------------------------------------------------------- decode
def bench_decode(args, device, deadline) -> list[dict]:
    from krause.dense import krause_attention_grouped

    c = args.decode_config
    b, h, hkv, d, w = c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c["window"]
    gen = torch.Generator().manual_seed(0)
    k_ring = _randn((b, hkv, w, d), device, args.dtype, gen)
    v_ring = _randn((b, hkv, w, d), device, args.dtype, gen)
    q = _randn((b, h, d), device, args.dtype, gen)
    ls = torch.full((h,), 1.5, device=device)
    rows = []
    for pos in args.decode_positions:
        if time.monotonic() > deadline:
            rows.append({"position": pos, "skipped": "time budget spent"})
            continue
        lengths = torch.full((b,), pos, device=device, dtype=torch.int32)
        slot_ok = (torch.arange(w, device=device) < pos)[None, None, None, :]  # (B, 1, 1, W) candidates
        cases = {
            "krause_triton": lambda: kernels.decode_krause_attention_triton(q, k_ring, v_ring, ls, lengths, c["top_k"], pos=pos),
            "krause_torch": lambda: krause_attention_grouped(q[:, :, None], k_ring, v_ring, ls, slot_ok, c["top_k"]),
        }
        try:
            k_cache = _randn((b, hkv, pos, d), device, args.dtype, gen)
            v_cache = _randn((b, hkv, pos, d), device, args.dtype, gen)
            cases["sdpa_cache"] = lambda: F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, enable_gqa=True)
        except torch.OutOfMemoryError as exc:
            cases["sdpa_cache"] = _raiser(exc)
        attended = min(pos, w)  # a Krause step reads the ring's filled slots, SDPA the whole cache
        ring = _nbytes(q) * 2 + 2 * b * hkv * attended * d * q.element_size()
        moved = {"krause_triton": ring, "krause_torch": ring,
                 "sdpa_cache": _nbytes(q) * 2 + 2 * b * hkv * pos * d * q.element_size()}
        row = {"position": pos}
        with torch.no_grad():
            try:
                row["max_abs_diff_triton_vs_torch"] = _max_diff(cases["krause_triton"](), cases["krause_torch"]()[:, :, 0])
            except Exception as exc:  # noqa: BLE001
                row["check_error"] = str(exc)[:200]
            row["step"] = _measure(cases, device, args, memory=False)
            _add_bandwidth(row["step"], moved, args.peak_bandwidth)
        rows.append(row)
        _print_row(f"decode position {pos}", row)
        k_cache = v_cache = None
        _empty_cache(device)
    return rows


# --------------------------------------------------------------------------- report
def _time(res, name):
    r = res.get(name, {})
    return r.get("median_s")


def _print_row(title, row):
    for label in ("fwd_bwd", "fwd", "step"):
        if label not in row:
            continue
        res = row[label]
        lines = [[name, T.fmt_time(r.get("median_s")), T.fmt_bytes(r.get("peak_bytes")),
                  "—" if r.get("pct_bandwidth") is None else f"{r['pct_bandwidth']:.1f}%", r.get("error", "")]
                 for name, r in res.items()]
        print(f"\n{title} [{label}]")
        print(T.table(["case", "median", "peak memory", "% of bandwidth", "error"], lines), flush=True)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def targets(causal, grid, decode) -> list[dict]:
    out = []
    row16 = next((r for r in causal if r.get("tokens") == 16384 and "fwd_bwd" in r), None)
    if row16:
        res = row16["fwd_bwd"]
        tri = _time(res, "krause_triton")
        out.append({"target": "causal T=16k fwd+bwd: triton / flex sliding-window softmax", "goal": "<= 1.0",
                    "measured": _ratio(tri, _time(res, "flex_sliding"))})
        out.append({"target": "causal T=16k fwd+bwd: triton / SDPA causal", "goal": "<= 0.1",
                    "measured": _ratio(tri, _time(res, "sdpa_causal"))})
    vitb = next((r for r in grid if r.get("model") == "ViT-B/16" and "fwd_bwd" in r), None)
    if vitb:
        out.append({"target": "2-D ViT-B/16 fwd+bwd: triton / SDPA", "goal": "<= 1.0",
                    "measured": _ratio(_time(vitb["fwd_bwd"], "krause_triton"), _time(vitb["fwd_bwd"], "sdpa"))})
    steps = [_time(r["step"], "krause_triton") for r in decode if "step" in r]
    steps = [s for s in steps if s is not None]
    if len(steps) >= 2:
        out.append({"target": "decode step: slowest / fastest position (flat in position)", "goal": "<= 1.2",
                    "measured": max(steps) / min(steps)})
    for t in out:
        t["met"] = None if t["measured"] is None else t["measured"] <= float(t["goal"].split()[-1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes, smaller ViT batch, 2 rounds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=None, help="JSON output (default results/attention_cuda[_quick].json)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    p.add_argument("--max-seconds-per-case", type=float, default=3.0)
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new rows after this many seconds")
    p.add_argument("--only", choices=["causal", "2d", "decode"], default=None)
    p.add_argument("--causal-tokens", type=int, nargs="*", default=None)
    p.add_argument("--decode-positions", type=int, nargs="*", default=None)
    p.add_argument("--vit-batch", type=int, default=None, help="2-D batch (default 256, quick 32)")
    p.add_argument("--decode-batch", type=int, default=DECODE["batch"],
                   help=f"decode batch (default {DECODE['batch']}; the interpreter's smoke run takes 1)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device memory bandwidth in GB/s for the %% column (default: known GPUs by name)")
    args = p.parse_args(argv)
    if args.decode_batch < 1:
        p.error(f"--decode-batch must be >= 1, got {args.decode_batch}")
    args.decode_config = dict(DECODE, batch=args.decode_batch)

    device = torch.device(args.device)
    interpreted = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
    # CPU only under the Triton interpreter, with tiny sizes: a check of this script's plumbing
    if not (device.type == "cuda" and torch.cuda.is_available()) and not (device.type == "cpu" and interpreted):
        print(f"--device: this benchmark needs a CUDA device, got {args.device!r} "
              f"(cuda available: {torch.cuda.is_available()})", file=sys.stderr)
        return 2
    ok, why = kernels.triton_available()
    if not ok:
        print(f"triton kernels unavailable: {why}", file=sys.stderr)
        return 2
    args.dtype = getattr(torch, args.dtype)
    args.peak_bandwidth = args.peak_gbps * 1e9 if args.peak_gbps else known_peak_bandwidth(device)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.causal_tokens = args.causal_tokens or (CAUSAL_T_QUICK if args.quick else CAUSAL_T)
    args.decode_positions = args.decode_positions or (DECODE_POSITIONS_QUICK if args.quick else DECODE_POSITIONS)
    args.vit_batch = args.vit_batch or (32 if args.quick else 256)
    args.out = args.out or ("results/attention_cuda_quick.json" if args.quick else "results/attention_cuda.json")
    deadline = time.monotonic() + (args.budget_s if args.budget_s else float("inf"))

    info = T.machine_info(device)
    print("machine:", T.describe_machine(info), flush=True)
    print("memory bandwidth for the % column:", "unknown (give --peak-gbps)" if not args.peak_bandwidth
          else f"{args.peak_bandwidth / 1e9:,.0f} GB/s", flush=True)
    import triton

    payload = {"benchmark": "attention_cuda", "machine": info, "triton": triton.__version__,
               "dtype": str(args.dtype), "quick": args.quick, "repeats": args.repeats,
               "memory_method": T.MEMORY_METHOD.get("cuda"), "peak_bandwidth_bytes_per_s": args.peak_bandwidth, "causal_config": CAUSAL, "grid_config": GRID,
               "decode_config": args.decode_config, "causal": [], "grid_2d": [], "decode": [], "targets": []}
    sections = [("causal", bench_causal), ("grid_2d", bench_2d), ("decode", bench_decode)]
    for key, fn in sections:
        if args.only and {"causal": "causal", "grid_2d": "2d", "decode": "decode"}[key] != args.only:
            continue
        payload[key] = fn(args, device, deadline)
        payload["targets"] = targets(payload["causal"], payload["grid_2d"], payload["decode"])
        T.write_json(args.out, payload)  # after every section: a cut-off run keeps what it measured
    print("\ntargets:")
    print(T.table(["target", "goal", "measured", "met"],
                  [[t["target"], t["goal"], T.fmt_ratio(t["measured"]), t["met"]] for t in payload["targets"]]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
