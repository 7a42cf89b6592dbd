"""The benchmark helpers and issue 17's target table run end to end at a tiny size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import _timing as T


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_a_transient_tensor_and_then_refuses_cpu_timings():
    """In a child process: the measurement changes glibc's allocator for the rest of the
    process, so a CPU timing after it is refused (a CUDA one is not)."""
    code = textwrap.dedent("""
        import torch
        from benchmarks import _timing as T

        def transient():
            x = torch.ones(16 << 20)  # 64 MiB, freed before returning
            return float(x[0])

        T.time_interleaved({"before": lambda: None}, repeats=1)  # allowed: nothing measured yet
        peak = T.peak_memory(transient, "cpu")
        assert 60 << 20 <= peak <= 96 << 20, peak
        assert T.peak_memory(lambda: None, "cpu") < 16 << 20
        T.check_allocator("cuda")
        for timing in (lambda: T.time_interleaved({"after": lambda: None}, repeats=1), lambda: T.time_once(lambda: None)):
            try:
                timing()
            except RuntimeError as e:
                assert "time all cases first" in str(e)
            else:
                raise AssertionError("a CPU timing after peak_memory was not refused")
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_target_table_runs_and_prints_a_clean_table(tmp_path):
    out = tmp_path / "targets.json"
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- targets -->\nold\n<!-- /targets -->\nafter\n")
    res = subprocess.run([sys.executable, "-m", "benchmarks.targets", "--quick", "--only", "op", "2d", "--out", str(out),
                          "--readme", str(readme)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    for noise in ("profiler", "gpuGetDeviceCount", "CUDA_HOME"):
        assert noise not in res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_model"] and {r["measure"].split(" ")[0] for r in data["targets"]} >= {"Krause", "2-D"}
    assert all(r["measured"] > 0 for r in data["targets"])
    text = readme.read_text()
    assert text.startswith("before\n<!-- targets -->") and text.endswith("<!-- /targets -->\nafter\n")
    assert "old" not in text and "| measure |" in text and data["machine"]["cpu_model"] in text


# Every benchmark runs end to end at a tiny size, as `python -m benchmarks.NAME`, so none rots.
def test_huge_page_slope_runs_in_a_child_with_torch_thp_switch(tmp_path, monkeypatch):
    """The slope's second measurement runs in a fresh process with THP_MEM_ALLOC_ENABLE=1 (torch reads it
    once), from any working directory, and its JSON says so."""
    from benchmarks import targets

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    res = targets.measure_slope_huge_pages([128, 256], 1, 1)
    assert res["THP_MEM_ALLOC_ENABLE"] == "1" and os.environ.get("THP_MEM_ALLOC_ENABLE") is None
    assert sorted(int(t) for t in res["krause_time_s"]) == [128, 256] and all(s > 0 for s in res["krause_time_s"].values())
    assert math.isfinite(res["slope"])
    row = [r for r in targets.rows_of({"causal": {"sdpa_at": 256, "ratio": 0.1, "engine_ratio": 1.0, "slope": 1.0,
                                                  "krause_time_s": {"128": 1.0, "256": 2.0}, "huge_pages": res}})
           if "THP_MEM_ALLOC_ENABLE" in r["measure"]]
    assert len(row) == 1 and row[0]["measured"] == res["slope"]


# (benchmarks.targets is run above and benchmarks.generation in test_autoregressive_benchmark.py.)
TINY_RUNS = {
    "attention_scaling": ["--quick", "--only", "causal", "--causal-tokens", "128", "256", "--repeats", "1"],
    "checkpoint": ["--quick", "--dim", "64", "--blocks", "2", "--worlds", "1"],
    "llm_overhead": ["--quick", "--lengths", "64", "--repeats", "1", "--decode_steps", "2"],
    "lm_throughput": ["--quick", "--blocks", "64", "--repeats", "1"],
    "vision_step": ["--quick", "--shapes", "cifar", "--batch", "2", "--repeats", "1", "--depth", "1", "--threads", "1"],
    # the GPU benchmark's plumbing, on CPU under the Triton interpreter (the decode section is the cheapest)
    "attention_cuda": ["--device", "cpu", "--quick", "--only", "decode", "--repeats", "1", "--decode-positions", "16",
                       "--decode-batch", "2", "--skip-memory"],
}


def test_every_benchmark_module_is_covered():
    names = {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py") and not f.startswith("_")}
    assert names == set(TINY_RUNS) | {"targets", "generation"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_benchmark_runs_at_a_tiny_size(name, tmp_path):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if name == "attention_cuda":
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *TINY_RUNS[name], "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    payload = json.loads(out.read_text())
    assert payload, f"{name} wrote an empty result"
    assert "AMD" in res.stdout or "Intel" in res.stdout or "cpu" in res.stdout.lower()  # the machine line
    for noise in ("profiler_start", "gpuGetDeviceCount"):
        assert noise not in res.stdout + res.stderr
    if name == "attention_scaling":  # the memory pass (after every timing) filled in the timed rows
        cases = [r["results"][n] for r in payload["causal"] for n in ("krause", "reference")]
        assert all(c["median_s"] > 0 and c["peak_bytes"] > 0 for c in cases), cases
    if name == "attention_cuda":  # the decode row checked the Triton step against torch (bf16: a few ulps)
        row = payload["decode"][0]
        assert payload["decode_config"]["batch"] == 2 and "check_error" not in row, row
        assert row["max_abs_diff_triton_vs_torch"] <= 0.05, row


def test_gpu_benchmark_peers_and_bandwidth_column(monkeypatch):
    """The peer libraries' rows (flash-attn / NATTEN, absent here) and the % of bandwidth figures."""
    import types

    import torch.nn.functional as F

    from benchmarks import attention_cuda as A

    def window_softmax(q, k, v, causal, window_size):  # a stand-in flash_attn_func: (B, T, H, D)
        n = q.shape[1]
        i = torch.arange(n)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window_size[0])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             enable_gqa=True)
        return out.transpose(1, 2)

    fake = types.SimpleNamespace(flash_attn_func=window_softmax)
    monkeypatch.setattr(A, "_optional", lambda name: fake if name == "flash_attn" else ModuleNotFoundError("natten x"))
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    g = torch.randn_like(q)
    fn, leaves, gt = A._peer_causal("flash_window", q, k, v, g, window=4)
    out = fn()
    assert out.shape == (1, 16, 4, 8) and len(leaves) == 3 and gt.shape == out.shape
    A._step(fn, leaves, gt, backward=True)()
    assert all(t.grad is None for t in leaves)  # autograd.grad, not .backward: the leaves stay clean
    missing, leaves, _ = A._peer_causal("natten_causal", q, k, v, g, window=4)
    assert leaves == []
    with pytest.raises(ModuleNotFoundError, match="natten"):
        missing()
    res = {"a": {"median_s": 2.0}, "b": {"error": "x"}}
    A._add_bandwidth(res, {"a": 1e9, "b": 1e9}, peak=1e9)
    assert res["a"]["pct_bandwidth"] == pytest.approx(50.0) and "pct_bandwidth" not in res["b"]
    A._add_bandwidth(res, {"a": 1e9}, peak=None)  # unknown device: no figure rather than a wrong one
    assert res["a"]["min_bytes"] == 1e9


def test_cpu_model_names_family_and_model_numbers(tmp_path):
    """A VM's generic CPU name gets the x86 family/model numbers of the first processor;
    a file without a model name falls back to the platform's word."""
    from krause.training.throughput import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
                    "model name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\n"
                    "model name\t: Other\n")
    assert cpu_model(str(info)) == "Intel(R) Xeon(R) Processor (family 6, model 207)"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n")
    assert cpu_model(str(info)) == "AMD EPYC"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # e.g. an ARM board
    assert cpu_model(str(info)) and "(" not in cpu_model(str(info))
    assert cpu_model(str(tmp_path / "missing"))
