"""benchmarks/generation.py --quick runs end to end and reports what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> str:
    """``python -m benchmarks.generation ARGS`` in a child (its CPU memory measurement changes the
    allocator of the process it runs in); returns its stdout."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.generation", *args], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout


@pytest.mark.slow
def test_generation_benchmark_quick(tmp_path):
    out = tmp_path / "generation.json"
    common = ["--quick", "--device", "cpu", "--threads", "1", "--batch", "2", "--repeats", "1"]
    # MNIST shape: whole-image decoding and memory; CIFAR-10 shape: step time at tokens 300 / 3000.
    _run(*common, "--shapes", "mnist", "--skip", "train", "--out", str(out))
    mnist = json.loads(out.read_text())["shapes"]["mnist"]["attn"]
    table = _run(*common, "--shapes", "cifar10", "--skip", "decode,memory", "--train_batch", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert "KARM speedup" in table and "karm_step_3000_over_300" in table

    for attn in ("krause", "vanilla", "linear"):
        r = mnist[attn]
        assert r["images_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(784 * r["images_per_s"])
        assert r["decode_memory_bytes"] == r["cache_bytes_last_token"] + r["step_peak_bytes"]
    # quick models: 2 layers x (K + V) x batch 2 x 2 heads x head dim 32, fp32
    per_token = 2 * 2 * 2 * 2 * 32 * 4
    assert mnist["krause"]["cache_bytes_last_token"] == 128 * per_token  # the ring buffer: W = 128 tokens
    assert mnist["vanilla"]["cache_bytes_last_token"] == 784 * per_token  # every token, sized once
    assert mnist["linear"]["cache_bytes_last_token"] == 2 * (2 * 2 * 32 * 32 + 2 * 2 * 32) * 4  # (S, z) per layer

    cifar = result["shapes"]["cifar10"]
    for attn in ("krause", "vanilla", "linear"):
        r = cifar["attn"][attn]
        assert r["step_s_at_300"] > 0 and r["step_s_at_3000"] > 0 and r["train_step_s"] > 0
        assert r["step_3000_over_300"] == pytest.approx(r["step_s_at_3000"] / r["step_s_at_300"])
    assert result["checks"]["karm_step_3000_over_300"]["target"] == 1.2
    assert cifar["model"]["window"] == 256 and cifar["model"]["top_k"] == 192 and cifar["model"]["seq_len"] == 3072
