"""Issue 17's targets, side by side in one run: the Krause op on its CPU kernel against
standard attention (SDPA) where the paper says it is cheaper.

    python -m benchmarks.targets --threads 1 --readme README.md   # full run; rewrites the README table
    python -m benchmarks.targets --quick                # smoke run (small sizes, one round)

Rows (CPU, fp32, forward + backward unless said otherwise; each ratio from one
interleaved timing of its cases, median wall time):
  lm        language_models_100m small config (dim 128, 2 layers, 2 heads), block 4096,
            batch 1, one train step: Krause tokens/s / standard; gated time / standard
  op        causal op B=1, H=8, D=64, W=32, top_k=16 at T=4096: achieved useful GFLOP/s of
            the Krause op / SDPA's (FLOPs from FlopCounterMode; SDPA's causal pairs only, as
            FlopCounterMode counts the full square; the JSON keeps the ratio against that too)
  2d        ViT-S heads (H=6, D=64), 1 CLS + 8x8 grid, Manhattan r=1, top_k 2, B=32:
            Krause time / SDPA time
  causal    the op's shape at T=16k: Krause / SDPA (causal) time; Krause time at 8k-64k:
            the slope of log time against log T (1.0 = linear), with the default allocator
            and again with torch's THP_MEM_ALLOC_ENABLE=1 (huge pages for large tensors)
  decode    a small Llama (hidden 512, 4 layers, 8 heads, 2 KV heads) with 2,048 tokens of
            context: one greedy decoding step, patched (krause.hf.patch_model, gated) /
            unpatched, forward only (median of 100 interleaved steps)
The engine column repeats the Krause cases with the PyTorch engine (krause.engine, the
op's CPU kernel before the compiled one) in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


from benchmarks import _timing as T

import krause
from krause import cpu

README_BEGIN, README_END = "<!-- targets -->", "<!-- /targets -->"
CAUSAL = dict(batch=1, heads=8, head_dim=64, window=32, top_k=16)


def _fwd_bwd(fn, leaves, grad):
    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
    return run


def _engine(run):
    def wrapped():
        with cpu.use_engine():
            run()
    return wrapped


def _flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _causal_cases(t: int, with_sdpa: bool, with_engine: bool):
    c = CAUSAL
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(c["batch"], c["heads"], t, c["head_dim"], generator=g).requires_grad_(True)
               for _ in range(3))
    ls = torch.zeros(c["heads"], requires_grad=True)
    grad = torch.randn(q.shape, generator=g)
    cases = {"krause": _fwd_bwd(lambda q, k, v, ls: krause.causal_krause_attention(q, k, v, ls, c["window"],
                                                                                   c["top_k"]), (q, k, v, ls), grad)}
    if with_engine:
        cases["engine"] = _engine(cases["krause"])
    if with_sdpa:
        cases["sdpa"] = _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v),
                                 grad)
    return cases


def measure_op(t: int, repeats: int) -> dict:
    """Useful-FLOP rates. FlopCounterMode counts causal SDPA as the full T x T square; its
    useful work is the T (T + 1) / 2 causal pairs (the CPU flash kernel skips the masked
    blocks), so the SDPA rate is computed from that share; the dense count is kept too."""
    cases = _causal_cases(t, True, True)
    counted = {name: _flops(run) for name, run in cases.items() if name != "engine"}
    flops = {"krause": counted["krause"], "engine": counted["krause"],
             "sdpa": counted["sdpa"] * (t + 1) // (2 * t)}
    timing = T.time_interleaved(cases, repeats=repeats)
    rate = {name: flops[name] / timing[name]["median_s"] / 1e9 for name in cases}
    dense_rate = counted["sdpa"] / timing["sdpa"]["median_s"] / 1e9
    # fresh output and gradient pages: a cost of the machine's memory mapping, not of the op
    faults = {name: T.minor_page_faults(cases[name]) for name in ("krause", "sdpa")}
    return {"T": t, "gflops": flops, "flop_counter_gflops": counted, "gflop_per_s": rate,
            "time_s": {n: r["median_s"] for n, r in timing.items()},
            "page_faults_per_call": faults, "page_fault_s": T.page_fault_cost_s(),
            "ratio": rate["krause"] / rate["sdpa"], "engine_ratio": rate["engine"] / rate["sdpa"],
            "ratio_vs_dense_count": rate["krause"] / dense_rate}


def causal_times(tokens: list[int], repeats: int, baselines_at: int | None = None):
    """The Krause op's fwd+bwd median time and page faults per call at each T, and at
    T = baselines_at SDPA's and the engine's times from the same interleaved rounds."""
    times, faults, baselines = {}, {}, {}
    for t in tokens:
        with_baselines = t == baselines_at
        cases = _causal_cases(t, with_baselines, with_baselines)
        timing = T.time_interleaved(cases, repeats=repeats if with_baselines else max(2, repeats))
        times[t] = timing["krause"]["median_s"]
        faults[t] = T.minor_page_faults(cases["krause"], runs=1)
        if with_baselines:
            baselines = {name: timing[name]["median_s"] for name in ("sdpa", "engine")}
    return times, faults, baselines


def measure_causal(tokens: list[int], sdpa_at: int, repeats: int) -> dict:
    times, faults, baselines = causal_times(tokens, repeats, sdpa_at)
    sdpa, engine = baselines["sdpa"], baselines["engine"]
    # the slope without the smallest size too: page faults (and caches) can differ there
    return {"krause_time_s": times, "page_faults_per_call": faults, "page_fault_s": T.page_fault_cost_s(),
            "sdpa_time_s": sdpa, "engine_time_s": engine, "ratio": times[sdpa_at] / sdpa, "engine_ratio": engine / sdpa,
            "slope": log_log_slope(times), "slope_without_smallest": log_log_slope({t: times[t] for t in tokens[1:]})}


def measure_slope_huge_pages(tokens: list[int], repeats: int, threads: int | None) -> dict:
    """The slope again in a fresh process with torch's THP_MEM_ALLOC_ENABLE=1: its CPU
    allocator then asks Linux for transparent huge pages for large tensors, so mapping a
    fresh output costs one page fault per 2 MiB instead of one per 4 KiB. Where THP is off
    (or not Linux) this measures the default allocator again."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = ("import json, os, sys, torch; from benchmarks import targets; a = json.loads(sys.argv[1]); "
            "a['threads'] and torch.set_num_threads(a['threads']); "
            "times, faults, _ = targets.causal_times(a['tokens'], a['repeats']); "
            "print(json.dumps({'krause_time_s': times, 'page_faults_per_call': faults, "
            "'THP_MEM_ALLOC_ENABLE': os.environ.get('THP_MEM_ALLOC_ENABLE')}))")
    args = json.dumps({"tokens": tokens, "repeats": repeats, "threads": threads})
    out = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"the huge-page slope run failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    times = {int(t): s for t, s in res["krause_time_s"].items()}
    return {**res, "slope": log_log_slope(times)}


def log_log_slope(times: dict) -> float:
    """Least-squares slope of log time against log size (1.0 = linear)."""
    xs, ys = [math.log(t) for t in times], [math.log(s) for s in times.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure_2d(batch: int, repeats: int) -> dict:
    grid, h, d = (8, 8), 6, 64
    n = 1 + grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, h, n, d, generator=g).requires_grad_(True) for _ in range(3))
    ls = torch.zeros((), requires_grad=True)
    grad = torch.randn(q.shape, generator=g)
    kr = _fwd_bwd(lambda q, k, v, ls: krause.local_krause_attention_2d(q, k, v, ls, grid, 1, "manhattan", 2, 1),
                  (q, k, v, ls), grad)
    cases = {"krause": kr, "engine": _engine(kr),
             "sdpa": _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)}
    timing = T.time_interleaved(cases, repeats=repeats)
    s = {name: r["median_s"] for name, r in timing.items()}
    return {"time_s": s, "ratio": s["krause"] / s["sdpa"], "engine_ratio": s["engine"] / s["sdpa"]}


def measure_lm(block: int, repeats: int) -> dict:
    from benchmarks.lm_throughput import make_case

    steps = {name: make_case(name, "small", block, 1, torch.device("cpu"), "fp32")[1]
             for name in ("standard", "krause", "gated")}
    steps["krause (engine)"] = _engine(steps["krause"])
    timing = T.time_interleaved(steps, repeats=repeats)
    s = {name: r["median_s"] for name, r in timing.items()}
    return {"block": block, "step_s": s, "krause_speed": s["standard"] / s["krause"],
            "engine_speed": s["standard"] / s["krause (engine)"], "gated_time": s["gated"] / s["standard"]}


def measure_decode(context: int, steps: int) -> dict:
    import krause.hf
    from benchmarks.llm_overhead import build

    shape = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192)
    torch.manual_seed(0)
    plain = build("llama", "cpu", torch.float32, **shape)
    patched = build("llama", "cpu", torch.float32, **shape)
    patched.load_state_dict(plain.state_dict())
    krause.hf.patch_model(patched)
    from transformers import DynamicCache

    ids = torch.randint(0, shape["vocab_size"], (1, context))
    state = {}
    with torch.no_grad():
        for name, model in (("unpatched", plain), ("patched", patched)):
            out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
            state[name] = (model, out.past_key_values, out.logits[:, -1:].argmax(-1))

    def step(name):
        def run():
            model, cache, token = state[name]
            with torch.no_grad():
                out = model(token, past_key_values=cache, use_cache=True)
            state[name] = (model, cache, out.logits[:, -1:].argmax(-1))
        return run

    cases = {"unpatched": step("unpatched"), "patched": step("patched"), "patched (engine)": _engine(step("patched"))}
    timing = T.time_interleaved(cases, repeats=steps)
    s = {name: r["median_s"] for name, r in timing.items()}
    return {"context": context, "step_s": s, "ratio": s["patched"] / s["unpatched"],
            "engine_ratio": s["patched (engine)"] / s["unpatched"]}


def rows_of(res: dict) -> list[dict]:
    """(measure, issue's 'today', target, measured, engine in this run, met)."""
    rows = []

    def add(name, today, goal, value, engine, higher_is_better=False):
        met = value >= goal if higher_is_better else value <= goal
        rows.append(dict(measure=name, today=today, target=f"{'≥' if higher_is_better else '≤'} {goal:g}",
                         measured=value, engine=engine, met=met))

    if "lm" in res:
        lm = res["lm"]
        add(f"LM small, block {lm['block']}: Krause tokens/s ÷ standard", "0.36", 1.5, lm["krause_speed"],
            lm["engine_speed"], True)
        add(f"LM small, block {lm['block']}: gated time ÷ standard", "4.5", 1.3, lm["gated_time"], None)
    if "op" in res:
        add(f"Krause op GFLOP/s ÷ SDPA GFLOP/s (causal pairs) at T={res['op']['T']}", "~0.10", 0.5, res["op"]["ratio"],
            res["op"]["engine_ratio"], True)
    if "2d" in res:
        add(f"2-D 8×8 grid B={res['2d']['batch']}: Krause ÷ SDPA time", "1.6", 1.0, res["2d"]["ratio"],
            res["2d"]["engine_ratio"])
    if "decode" in res:
        add(f"HF decode step, {res['decode']['context']} context: patched ÷ unpatched", "1.75", 1.15,
            res["decode"]["ratio"], res["decode"]["engine_ratio"])
    if "causal" in res:
        c = res["causal"]
        add(f"causal T={c['sdpa_at']}: Krause ÷ SDPA time (fwd+bwd)", "0.06", 0.06, c["ratio"], c["engine_ratio"])
        lo, hi = (f(int(t) for t in c["krause_time_s"]) for f in (min, max))  # JSON keys are strings
        add(f"causal time slope {lo // 1024}k–{hi // 1024}k (log-log)", "0.79", 1.10, c["slope"], None)
        if "huge_pages" in c:
            add("same slope, THP_MEM_ALLOC_ENABLE=1 (huge pages)", "—", 1.10, c["huge_pages"]["slope"], None)
    return rows


def markdown(rows: list[dict], info: dict, out: str, kernel: str | None = None) -> str:
    body = T.table(["measure", "issue (before)", "target", "measured", "engine, same run", ""],
                   [[r["measure"], r["today"], r["target"], f"{r['measured']:.3f}",
                     "—" if r["engine"] is None else f"{r['engine']:.3f}", "met" if r["met"] else "MISSED"]
                    for r in rows], markdown=True)
    return (f"Machine: {T.describe_machine(info)}; load average before/after "
            f"{info.get('load_before')} / {info.get('load_after')}; compiled CPU kernel: "
            f"{(kernel or cpu.status()).split(':')[0]}. "
            f"JSON: `{out}`.\n\n{body}\n")


def update_readme(path: str, text: str) -> None:
    with open(path) as f:
        readme = f.read()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} section to rewrite")
    command = "python -m benchmarks.targets --threads 1 --out docs/benchmarks/targets.json --readme README.md"
    block = (f"{README_BEGIN}\nIssue 17's targets, side by side in one run per section (`{command}` measures "
             f"and rewrites this table; `--only SECTION --update` re-measures one section; the sections are "
             f"described in `benchmarks/targets.py`):\n\n{text}{README_END}")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: block, readme))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=["lm", "op", "2d", "causal", "decode"], default=None)
    p.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every case (default: torch's)")
    p.add_argument("--out", default="results/targets.json")
    p.add_argument("--readme", default=None, help="rewrite the targets section of this README")
    p.add_argument("--render", action="store_true", help="measure nothing: print (and --readme) the table of --out")
    p.add_argument("--update", action="store_true",
                   help="keep the sections of an existing --out that this run does not measure (run them in parts)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    sections = args.only or ["lm", "op", "2d", "causal", "decode"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        with open(args.out) as f:
            saved = json.load(f)
        text = markdown(rows_of(saved["results"]), saved["machine"], args.out, saved.get("compiled_cpu_kernel"))
        print(text)
        if args.readme:
            update_readme(args.readme, text)
        return 0
    info = T.machine_info("cpu")
    info["load_before"] = T.load_average()
    print(T.describe_machine(info), f"| compiled CPU kernel: {cpu.status()}", flush=True)
    cpu.active()  # build (or fail to) before anything is timed
    res = {}
    if "op" in sections:
        res["op"] = measure_op(1024 if args.quick else 4096, repeats)
        print("op done", flush=True)
    if "2d" in sections:
        batch = 4 if args.quick else 32
        res["2d"] = {**measure_2d(batch, repeats), "batch": batch}
        print("2d done", flush=True)
    if "causal" in sections:
        tokens = [1024, 2048, 4096] if args.quick else [8192, 16384, 32768, 65536]
        sdpa_at = tokens[1]
        res["causal"] = {**measure_causal(tokens, sdpa_at, repeats), "sdpa_at": sdpa_at,
                         "huge_pages": measure_slope_huge_pages(tokens, repeats, args.threads)}
        print("causal done", flush=True)
    if "lm" in sections:
        res["lm"] = measure_lm(256 if args.quick else 4096, repeats)
        print("lm done", flush=True)
    if "decode" in sections:
        res["decode"] = measure_decode(128 if args.quick else 2048, 3 if args.quick else 100)
        print("decode done", flush=True)
    info["load_after"] = T.load_average()
    if args.update and os.path.exists(args.out):
        with open(args.out) as f:
            res = {**json.load(f)["results"], **res}
    rows = rows_of(res)
    text = markdown(rows, info, args.out)
    print(text)
    T.write_json(args.out, {"machine": info, "compiled_cpu_kernel": cpu.status().split(":")[0], "settings": vars(args),
                            "results": res, "targets": rows})
    print(f"wrote {args.out}")
    if args.readme:
        update_readme(args.readme, text)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
