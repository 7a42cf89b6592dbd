"""benchmarks/generation.py --quick runs end to end and reports what it promises."""

from __future__ import annotations

import importlib
import json

import pytest
import torch



def _load():
    return importlib.import_module("benchmarks.generation")


@pytest.mark.slow
def test_generation_benchmark_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        bench = _load()
        out = tmp_path / "generation.json"
        # MNIST shape: whole-image decoding and memory; CIFAR-10 shape: step time at tokens 300 / 3000.
        assert bench.main(["--quick", "--device", "cpu", "--threads", "1", "--batch", "2", "--repeats", "1",
                           "--shapes", "mnist", "--skip", "train", "--out", str(out)]) == 0
        mnist = json.loads(out.read_text())["shapes"]["mnist"]["attn"]
        assert bench.main(["--quick", "--device", "cpu", "--threads", "1", "--batch", "2", "--repeats", "1",
                           "--shapes", "cifar10", "--skip", "decode,memory", "--train_batch", "1",
                           "--out", str(out)]) == 0
        result = json.loads(out.read_text())
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
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
