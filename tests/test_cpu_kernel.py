"""The compiled CPU kernel's build, fallback and determinism, and dispatch as data
(routes, refusals, GPU verification records). Its numbers are held to the oracle in
test_conformance.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import krause
from krause import cpu, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_kernel = pytest.mark.skipif(not cpu.active(), reason=f"compiled CPU kernel: {cpu.status()}")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=600)


def test_import_does_not_build_and_a_failed_build_is_one_warning(tmp_path):
    """A compiler that fails (CXX=false, in a fresh extension dir): importing krause builds
    nothing; the first op tries once, logs one warning naming the fallback, and every op
    then runs the engine with the reference's results."""
    code = """
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        import krause
        from krause import cpu
        assert not cpu._state["tried"], "import built the extension"
        q, k, v = (torch.randn(2, 2, 30, 8) for _ in range(3))
        ls = torch.zeros(2, requires_grad=True)
        for _ in range(3):
            out = krause.causal_krause_attention(q, k, v, ls, 8, 3)
            out.sum().backward()
            grid = krause.local_krause_attention_2d(q[:, :, :26], k[:, :, :26], v[:, :, :26], 0.0, (5, 5), 1,
                                                    "manhattan", 2)
        ref = krause.causal_krause_attention(q, k, v, ls, 8, 3, impl="reference")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert not cpu.active() and cpu.status().startswith("build failed")
        print("EXPLAIN", krause.dispatch.explain("causal", "cpu", window=8, num_queries=30, num_keys=30)["compiled"])
    """
    res = _python(code, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path), KRAUSE_CPU_KERNEL="1")
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if "compiled CPU kernel could not be built" in ln]
    assert len(warnings) == 1 and "PyTorch engine" in warnings[0], res.stderr
    assert "EXPLAIN build failed" in res.stdout


def test_kernel_switch_off_by_environment():
    res = _python("""
        import torch, krause
        from krause import cpu
        q = torch.randn(1, 2, 20, 8)
        krause.causal_krause_attention(q, q, q, 0.0, 4, 2)
        assert not cpu.active() and not cpu._state["tried"], cpu.status()
    """, KRAUSE_CPU_KERNEL="0")
    assert res.returncode == 0, res.stderr


def _grads(fn, *leaves, seed=0):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return [out.detach()] + [t.grad for t in leaves]


@needs_kernel
@pytest.mark.parametrize("op", ["causal", "local2d"])
def test_same_input_same_bits_whatever_the_thread_count(op):
    """Forward and backward are bit-identical across runs and intra-op thread counts (no
    float atomics; every reduction has one fixed order)."""
    g = torch.Generator().manual_seed(0)
    if op == "causal":  # 150 tokens: three backward blocks of 4W = 64 queries (even, odd, even)
        q, k, v = torch.randn(3, 4, 150, 16, generator=g), torch.randn(3, 2, 150, 16, generator=g), \
            torch.randn(3, 2, 150, 16, generator=g)

        def fn(q, k, v, ls):
            return krause.causal_krause_attention(q, k, v, ls, 16, 5, impl="fast")
    else:
        q, k, v = (torch.randn(3, 4, 1 + 81, 16, generator=g) for _ in range(3))

        def fn(q, k, v, ls):
            return krause.local_krause_attention_2d(q, k, v, ls, (9, 9), 2, "chebyshev", 6, 1, impl="fast")
    ls = torch.rand(4, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            runs.append(_grads(fn, q, k, v, ls))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@needs_kernel
# rank counting up to 8 vectors of lanes (a partial last one at 33 and 80); bisection beyond (200, 300)
@pytest.mark.parametrize("window", [8, 16, 33, 64, 80, 200, 300])
@pytest.mark.parametrize("levels", [3, 1000])  # c_j from 3 values (ties everywhere) or 1000 (few; c_j^2 exact in fp32)
def test_kept_sets_follow_the_rule_whatever_the_ties(window, levels):
    """Every query keeps the top_k smallest distances, ties to the lower key index, whether the
    ties sit inside the kept set, across its boundary, or nowhere. q = 0 and keys c_j e_1 make
    dist_ij = c_j^2 exactly."""
    g = torch.Generator().manual_seed(window * levels)
    t, top_k = 2 * window + 7, max(1, window // 3)
    c = torch.randint(0, levels, (t,), generator=g).float()
    k = torch.zeros(1, 1, t, 4)
    k[0, 0, :, 0] = c
    q, v = torch.zeros(1, 1, t, 4), torch.randn(1, 1, t, 4, generator=g)
    _, _, dist, kept = cpu.load().causal_forward(q, k, v, torch.empty(0, dtype=torch.bool), torch.ones(1), 0, window,
                                                 top_k, top_k, True)
    for i in range(t):
        cand = range(max(0, i - window + 1), i + 1)
        rule = sorted(sorted(cand, key=lambda j: (c[j].item() ** 2, j))[:top_k])
        assert kept[0, 0, i, :len(rule)].tolist() == rule, i
        assert (kept[0, 0, i, len(rule):] == -1).all()
        assert dist[0, 0, i, :len(rule)].tolist() == [c[j].item() ** 2 for j in rule]


@needs_kernel
def test_compiled_kernel_takes_non_contiguous_and_low_precision_inputs():
    q, k, v = (torch.randn(2, 20, 3, 8).transpose(1, 2) for _ in range(3))  # (B, H, T, D) views
    assert not q.is_contiguous()
    out = krause.causal_krause_attention(q, k, v, 0.2, 5, 2, impl="fast")
    ref = krause.causal_krause_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.2, 5, 2, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    q, k, v = (t.half() for t in (q, k, v))
    half = krause.causal_krause_attention(q, k, v, 0.2, 5, 2, impl="fast")
    assert half.dtype == torch.float16
    ref = krause.causal_krause_attention(q, k, v, 0.2, 5, 2, impl="reference")  # fp32 math on the same fp16 values
    torch.testing.assert_close(half.float(), ref.float(), atol=2e-3, rtol=2e-3)


@needs_kernel
def test_fake_kernels_describe_the_compiled_outputs():
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    ls = torch.zeros(2)
    torch.library.opcheck(torch.ops.krause.causal_fwd.default, (q, k, v, ls, None, 8, 4))
    torch.library.opcheck(torch.ops.krause.causal_fwd.default, (q[:, :, 15:], k, v, ls, None, 8, 4))  # Tq < Tk
    out = torch.ops.krause.causal_fwd(q, k, v, ls, None, 8, 4)
    assert out[3].dtype == torch.int32 and out[1].shape == (1, 2, 20, 4)
    with cpu.use_engine():
        assert torch.ops.krause.causal_fwd(q, k, v, ls, None, 8, 4)[3].numel() == 0


# --------------------------------------------------------------------------- dispatch
def test_routes_and_refusals_are_data():
    assert set(dispatch.ROUTES) == set(dispatch.IMPLS)
    assert all(b in dispatch.REFUSALS for route in dispatch.ROUTES.values() for b in route)
    why = dispatch.explain("causal", "cuda", window=8, num_queries=64, num_keys=64)
    assert why["compiled"] == "CPU only, not cuda"
    with cpu.use_engine():
        dispatch.clear_cache()
        assert dispatch.choose_impl("causal", "cpu", window=8, num_queries=999, num_keys=999) == "engine"
        assert dispatch.choose_impl("causal", "cpu", window=8, num_queries=9, num_keys=9) == "dense"
    dispatch.clear_cache()
    with pytest.raises(ValueError, match="^impl must be one of"):
        dispatch.choose_impl("causal", "cpu", "cuda")


def test_auto_takes_triton_only_with_a_matching_gpu_record(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    import triton

    record_path = tmp_path / "gpu_verification.json"
    monkeypatch.setenv("KRAUSE_GPU_VERIFICATION", str(record_path))
    monkeypatch.setattr(dispatch, "_triton_reason", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "read_records", lambda: [
        r for p in [str(record_path)] if os.path.exists(p) for r in json.load(open(p))["records"]])
    call = dict(window=8, num_queries=64, num_keys=64)
    try:
        dispatch.clear_cache()
        why = dispatch.explain("causal", "cuda", **call)
        assert why["triton"].startswith("not verified on NVIDIA H100 80GB HBM3") and why["engine"] == "chosen"
        record = {"device": "NVIDIA H100 80GB HBM3", "triton": triton.__version__, "passed": True,
                  "max_abs_error": {"out": 1e-6}, "speed": {}}
        record_path.write_text(json.dumps({"records": [{**record, "passed": False}]}))
        dispatch.clear_cache()
        assert dispatch.choose_impl("causal", "cuda", **call) == "engine"
        record_path.write_text(json.dumps({"records": [{**record, "triton": "0.0.1"}]}))
        dispatch.clear_cache()
        assert dispatch.choose_impl("causal", "cuda", **call) == "engine"
        record_path.write_text(json.dumps({"records": [record]}))
        dispatch.clear_cache()
        assert dispatch.choose_impl("causal", "cuda", **call) == "triton"
    finally:
        dispatch.clear_cache()


def test_verification_record_writer(tmp_path):
    """scripts/gpu_check.sh's record writer (krause.kernels.verify) on CPU with the
    interpreter: the record names the device, versions, max errors and speed."""
    pytest.importorskip("triton")
    out = tmp_path / "verification.json"
    res = subprocess.run([sys.executable, "-m", "krause.kernels.verify", "--out", str(out), "--tests-passed", "1",
                          "--tiny"], env={**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rec = json.loads(out.read_text())["records"][0]
    assert rec["device"] == "cpu (triton interpreter)" and rec["passed"] is False  # never a GPU verification
    assert set(rec["max_abs_error"]) >= {"causal", "local2d"}
    assert all(0 <= e < 1e-3 for errs in rec["max_abs_error"].values() for e in errs.values())
    assert rec["torch"] == torch.__version__ and "triton" in rec and rec["speed"]


def test_build_name_separates_checkouts_sources_and_flags(tmp_path):
    # one build folder per (checkout, source text, flags): two checkouts never rebuild each other's
    a, b = tmp_path / "a" / "k.cpp", tmp_path / "b" / "k.cpp"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("int x;\n")
    name = cpu.build_name(str(a), "AVX2", ["-O3"])
    assert name.startswith("krause_cpu_avx2_") and name == cpu.build_name(str(a), "AVX2", ["-O3"])
    assert name != cpu.build_name(str(b), "AVX2", ["-O3"])
    assert name != cpu.build_name(str(a), "AVX2", ["-O2"])
    a.write_text("int y;\n")
    assert name != cpu.build_name(str(a), "AVX2", ["-O3"])
