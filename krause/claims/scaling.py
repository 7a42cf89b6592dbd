"""Claim 6: linear cost. Time and memory of causal Krause attention grow linearly with the
sequence length, standard (SDPA) attention's quadratically (benchmarks/attention_scaling.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from .common import Context, MissingPrerequisite, new_figure, result, save_figure, verdict

NAME = "scaling"
TITLE = "Linear cost in the sequence length"
COMPARISON = ("benchmarks/attention_scaling.py --only causal: forward + backward of causal Krause attention "
              "(W=32, top_k=16) and of causal SDPA on the same random q, k, v (B=1, H=8, D=64, fp32, CPU), "
              "median wall time of interleaved rounds and peak memory, at each T; slopes of log-log fits")
EXPECTATION = "Krause attention costs O(T) time and memory for a fixed window, standard attention O(T^2)"
MAX_SLOPE = 1.25
RULE = f"agree if Krause's fitted log-log slope is <= {MAX_SLOPE} for time AND for memory"

FULL = dict(tokens=(512, 1024, 2048, 4096), repeats=3, max_seconds=30)
TINY = dict(tokens=(128, 256), repeats=1, max_seconds=5)


def benchmark_script() -> Path:
    """benchmarks/attention_scaling.py of the checkout this krause comes from."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_scaling.py"
    if not path.is_file():
        raise MissingPrerequisite(f"{path} not found: the benchmarks ship with a source checkout, not the wheel")
    return path


def fit_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x) (nan with fewer than two positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def run(ctx: Context):
    s = TINY if ctx.tiny else FULL
    script = benchmark_script()
    out_json = ctx.out_dir / "attention_scaling.json"
    cmd = [sys.executable, "-m", "benchmarks.attention_scaling", "--only", "causal", "--causal-tokens", *map(str, s["tokens"]),
           "--repeats", str(s["repeats"]), "--max-seconds-per-case", str(s["max_seconds"]),
           "--reference-memory-fraction", "0", "--out", str(out_json),  # the dense reference is not this claim's
           "--threads", str(torch.get_num_threads())]  # the runner's thread count
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(script.parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=script.parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    payload = json.loads(out_json.read_text())
    rows_in = payload["causal"]
    series = {}
    for name in ("krause", "sdpa"):
        ts = [r["T"] for r in rows_in if "median_s" in r["results"].get(name, {})]
        series[name] = {
            "T": ts,
            "seconds": [r["results"][name]["median_s"] for r in rows_in if r["T"] in ts],
            "bytes": [r["results"][name].get("peak_bytes") for r in rows_in if r["T"] in ts],
        }
        series[name]["time_slope"] = fit_slope(series[name]["T"], series[name]["seconds"])
        series[name]["memory_slope"] = fit_slope(series[name]["T"], series[name]["bytes"])
    rows = []
    for r in rows_in:
        k, q = r["results"].get("krause", {}), r["results"].get("sdpa", {})
        rows.append([f"{r['T']:,}", _ms(k.get("median_s")), _ms(q.get("median_s")), _mib(k.get("peak_bytes")),
                     _mib(q.get("peak_bytes"))])
    rows.append(["log-log slope", f"{series['krause']['time_slope']:.2f}", f"{series['sdpa']['time_slope']:.2f}",
                 f"{series['krause']['memory_slope']:.2f}", f"{series['sdpa']['memory_slope']:.2f}"])
    k_time, k_mem = series["krause"]["time_slope"], series["krause"]["memory_slope"]
    figure = _plot(series, ctx.out_dir / "linear_cost.png")
    return result(
        sys.modules[__name__], verdict(k_time <= MAX_SLOPE and k_mem <= MAX_SLOPE),
        headers=["T", "Krause ms", "SDPA ms", "Krause MiB", "SDPA MiB"], rows=rows,
        measured={"krause_time_slope": k_time, "krause_memory_slope": k_mem,
                  "sdpa_time_slope": series["sdpa"]["time_slope"], "sdpa_memory_slope": series["sdpa"]["memory_slope"]},
        seeds=[0], figure=figure,
        details={"benchmark": str(script), "command": cmd, "series": series, "machine": payload.get("machine"),
                 "note": "seed 0 = the benchmark's fixed random inputs; one timing run per size (median of rounds)"})


def _ms(s):
    return "-" if s is None else f"{1e3 * s:.1f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _plot(series, path: Path) -> str:
    fig, (ax_t, ax_m) = new_figure(2, width=5.2)
    for name, label in (("krause", "Krause (W=32, k=16)"), ("sdpa", "SDPA causal")):
        d = series[name]
        ax_t.loglog(d["T"], d["seconds"], marker="o", base=2, label=f"{label}: slope {d['time_slope']:.2f}")
        mem = [(t, b) for t, b in zip(d["T"], d["bytes"]) if b]
        if mem:
            ax_m.loglog([m[0] for m in mem], [m[1] / 2**20 for m in mem], marker="o", base=2,
                        label=f"{label}: slope {d['memory_slope']:.2f}")
    for ax, yl in ((ax_t, "forward + backward time (s)"), (ax_m, "peak memory (MiB)")):
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Causal attention cost vs sequence length (CPU, fp32)")
    return save_figure(fig, path)
