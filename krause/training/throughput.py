"""Throughput (samples or tokens per second) and model FLOPs utilisation (MFU).

    meter = Throughput(flops_per_sample=train_flops_per_sample(model, example), peak_flops=peak, world_size=W)
    meter.update(samples=global_batch, tokens=global_batch * seq_len)   # after each optimizer step
    metrics.log(step=step, **meter.rates())   # samples_per_s, tokens_per_s, tflops_per_gpu, mfu

FLOPs per sample come from `torch.utils.flop_counter.FlopCounterMode` over one forward
and backward (Krause ops register their sparse cost with it: krause/flops.py), or from
an analytic formula the caller passes. MFU = achieved FLOP/s per device / peak FLOP/s
of one device; the peak is configurable (`peak_flops`, e.g. from a --peak_tflops
flag), with `known_peak_flops` for a few accelerators' dense bf16 numbers.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["Throughput", "count_flops", "train_flops_per_sample", "known_peak_flops", "known_peak_bandwidth"]

#: dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets
_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (named beside every benchmark table: ratios shift between CPUs),
    with its x86 family and model numbers: a VM often shows only a generic name ("Intel(R)
    Xeon(R) Processor", "AMD EPYC"), and the numbers still tell the core generation."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def known_peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 peak of a known CUDA device (by name), else None (CPU: give a peak yourself)."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAKS.items() if k in name), None)


#: peak device-memory bandwidth (bytes/s) from the vendors' data sheets; the first name match wins
_BANDWIDTHS = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
               ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("A10G", 0.6e12),
               ("V100", 0.9e12))


def known_peak_bandwidth(device: torch.device | str | None = None) -> float | None:
    """The memory bandwidth (bytes/s) of a known CUDA device (by name), else None."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _BANDWIDTHS if k in name), None)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs counted by FlopCounterMode while `fn()` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_flops_per_sample(model: nn.Module, example: torch.Tensor,
                           loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """FLOPs of one forward + backward per sample of `example` (its first dim is the batch).

    Gradients are computed into a throw-away pass (the model's .grad are restored)."""
    saved = [(p, p.grad) for p in model.parameters()]
    was = model.training
    model.train()

    def step() -> None:
        out = model(example)
        out = out[0] if isinstance(out, (tuple, list)) else out
        (loss_fn(out) if loss_fn is not None else out.float().sum()).backward()

    try:
        total = count_flops(step)
    finally:
        for p, g in saved:
            p.grad = g
        model.train(was)
    return total / example.shape[0]


class Throughput:
    """Rates over the steps since the last `rates()` call (a logging window)."""

    def __init__(self, flops_per_sample: float | None = None, peak_flops: float | None = None, world_size: int = 1,
                 clock: Callable[[], float] = time.perf_counter):
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
        self.flops_per_sample, self.peak_flops, self.world_size = flops_per_sample, peak_flops, max(1, world_size)
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.t0 = self.clock()
        self.samples = 0
        self.tokens = 0
        self.steps = 0

    def update(self, samples: int = 0, tokens: int = 0, steps: int = 1) -> None:
        self.samples += int(samples)
        self.tokens += int(tokens)
        self.steps += int(steps)

    def rates(self, reset: bool = True) -> dict[str, float]:
        elapsed = max(self.clock() - self.t0, 1e-9)
        out = {"samples_per_s": self.samples / elapsed, "steps_per_s": self.steps / elapsed}
        if self.tokens:
            out["tokens_per_s"] = self.tokens / elapsed
        if self.flops_per_sample:
            per_device = self.flops_per_sample * self.samples / elapsed / self.world_size
            out["tflops_per_device"] = per_device / 1e12
            if self.peak_flops:
                out["mfu"] = per_device / self.peak_flops
        if reset:
            self.reset()
        return out
