"""The benchmark helpers and issue 17's target table run end to end at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import _timing as T


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_a_transient_tensor_and_no_profiler():
    def transient():
        x = torch.ones(16 << 20)  # 64 MiB, freed before returning
        return float(x[0])

    peak = T.peak_memory(transient, "cpu")
    assert 60 << 20 <= peak <= 96 << 20
    assert T.peak_memory(lambda: None, "cpu") < 16 << 20


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
