"""Shared helpers for the benchmarks: interleaved timing, peak memory, machine info,
JSON output and plain-text tables.

Timing. ``time_interleaved`` runs every case once per round, rotating the order each
round, so a slow phase of a shared machine (other processes, thermal or frequency
changes) hits all cases alike instead of whichever happened to run then; it reports
the median over rounds. Ratios between cases measured in one call are what to trust.

Peak memory. ``peak_memory`` reports the peak of *additional* tensor memory while a
function runs, above what was live when it started (so inputs are excluded, outputs
and gradients are included):

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before — bytes held by tensors, not the caching allocator's
  reserve.
- CPU (Linux): the process's peak resident memory while ``fn`` runs above its resident
  memory at the start: the kernel's high-water mark (VmHWM in /proc/self/status) is reset
  first by writing 5 to /proc/self/clear_refs. glibc is told to serve every allocation
  of 128 KiB or more with its own mmap (mallopt M_MMAP_THRESHOLD; no dynamic threshold),
  so a freed tensor's pages go back to the OS at once and the figure follows tensor
  memory. It counts every thread's allocations and also what is not a tensor (library
  workspaces, the Python heap), and only pages actually touched; it needs no profiler,
  so nothing is printed and the kernels run with their usual threads. Where /proc or
  glibc is missing it is None (shown as "—"). That glibc setting stays for the rest of
  the process (fresh pages, so a page fault per 4 KiB, for every large tensor), so a
  benchmark measures CPU memory after all its timings; the timing functions refuse to run
  on the CPU after it (``check_allocator``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from krause.training.atomic import atomic_file
from krause.training.throughput import cpu_model


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    max_seconds_per_case: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Median wall time (seconds) of each zero-argument callable, measured in interleaved
    rounds.

    Every case runs ``warmup`` untimed times first, then ``repeats`` rounds run each case
    once, in an order rotated by one each round. A case whose runs have used up
    ``max_seconds_per_case`` stops early (keeping at least one timed run), so one slow
    baseline cannot take over a benchmark.

    Returns ``{name: {"median_s", "times_s", "cpu_median_s"}}``: wall times, and the
    process CPU time (user + system, all threads) of the same runs. On a shared machine
    the CPU time is the steadier measure of work (it leaves out time spent waiting for a
    core); for a single-threaded run it is close to the wall time on an idle machine.
    """
    check_allocator(device)
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            if max_seconds_per_case is not None and times[name] and sum(times[name]) >= max_seconds_per_case:
                continue
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {"median_s": statistics.median(ts), "times_s": ts, "cpu_median_s": statistics.median(cpu[name])}
        for name, ts in times.items()
    }


def time_once(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    check_allocator(device)
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- memory
_LIBC = None


def check_allocator(device: torch.device | str) -> None:
    """Refuses a CPU timing once ``peak_memory`` has measured on the CPU in this process: it
    leaves glibc mapping every block of 128 KiB or more fresh (no way back to glibc's own
    adaptive threshold), so later timings would pay a page fault per 4 KiB of every large
    tensor, which users' processes do not. Benchmarks time everything first."""
    if torch.device(device).type == "cpu" and _LIBC:
        raise RuntimeError(
            "CPU timing after a CPU peak_memory measurement: the allocator setting it needs stays for the "
            "rest of the process and would slow every later timing; time all cases first, then measure memory")


def _libc():
    """glibc, set to mmap every block of 128 KiB or more (None elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: fixed, so freed large blocks are unmapped
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _cpu_peak_rss(fn: Callable[[], Any]) -> int | None:
    libc = _libc()
    try:
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        base = _status_bytes("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        fn()
        return None
    fn()
    return max(0, _status_bytes("VmHWM:") - base)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int | None:
    """Peak bytes allocated by ``fn`` above what was live when it started (None: unknown here)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type == "cpu":
        return _cpu_peak_rss(fn)
    raise ValueError(f"peak_memory: unsupported device {device}")


MEMORY_METHOD = {
    "cpu": "peak resident memory (VmHWM after a reset via /proc/self/clear_refs) above the resident memory at "
    "the start, glibc serving blocks >= 128 KiB by mmap; separate untimed run after every timing",
    "cuda": "torch.cuda.max_memory_allocated minus memory_allocated at the start; separate untimed run",
}


# --------------------------------------------------------------------------- machine
def minor_page_faults(fn: Callable[[], Any], runs: int = 3) -> float | None:
    """Mean minor page faults per call of fn (each a first touch of freshly mapped memory: on
    some VMs a few µs each), or None where getrusage is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(runs):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / runs


def page_fault_cost_s(nbytes: int = 128 << 20, runs: int = 3) -> float | None:
    """Seconds per minor page fault on this machine: filling freshly allocated buffers of
    nbytes (each allocation maps new pages), divided by the faults counted."""
    def fresh():
        torch.empty(nbytes // 4).fill_(0.0)

    faults = minor_page_faults(fresh, runs)
    if not faults:
        return None
    start = time.perf_counter()
    for _ in range(runs):
        fresh()
    return (time.perf_counter() - start) / runs / faults


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (how busy a shared machine was), where available."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # PyTorch's CPU allocator uses 2 MiB pages when this is 1 (fewer page faults)
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    try:
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict[str, Any]) -> str:
    text = f"{info['cpu_model']}, {info['cpu_count']} cores ({info['torch_threads']} torch threads)"
    if "ram_gib" in info:
        text += f", {info['ram_gib']} GiB RAM"
    if "gpu" in info:
        text += f"; {info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}"
    return text + f"; torch {info['torch']}; device {info['device']}"


# --------------------------------------------------------------------------- output
def write_json(path: str, payload: Any) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with atomic_file(path, "w") as f:  # a killed run never leaves half a JSON file
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A fixed-width text table, or a GitHub markdown table when ``markdown``."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    if markdown:
        rule = "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"
        lines = ["| " + " | ".join(cells[0]) + " |", rule]
        lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
