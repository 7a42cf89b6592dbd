"""The compiled CPU kernels of the Krause ops (``krause_cpu.cpp``).

Built on first use with ``torch.utils.cpp_extension.load`` (ninja + the C++ compiler,
cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``: a
machine compiles once), for the SIMD level torch itself runs at on this CPU. ``krause.ops``
registers them as the CPU kernels of its custom ops, so every caller gets them.

Where the build fails (no compiler, no ninja, a compile error) one warning names the
fallback and the ops run the PyTorch engine (``krause.engine``) instead. Set
``KRAUSE_CPU_KERNEL=0`` to use the engine without trying to build.

    active() -> bool          the kernels are built (building them now if needed) and enabled
    status() -> str           one line for humans: built where, or why not
    use_engine(True/False)    switch to the engine (tests and benchmarks compare the two)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading

import torch

log = logging.getLogger("krause")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "krause_cpu.cpp")
_lock = threading.Lock()
_state: dict = {"module": None, "error": None, "tried": False, "engine": os.environ.get("KRAUSE_CPU_KERNEL", "1") == "0"}

# torch's CPU capability -> the compiler flags and ATen macro that make at::vec::Vectorized
# use the same instructions (the JIT build runs on the machine that uses it).
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


# Input dtypes the kernels take (converted to fp32 on the way in; fp32 accumulation).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def engine_forced() -> bool:
    """True inside ``use_engine()`` or with KRAUSE_CPU_KERNEL=0."""
    return _state["engine"]


def runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled kernels take this call (CPU, one supported dtype, built, enabled)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and k.dtype == v.dtype == q.dtype and active()


def _simd() -> str:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an old torch, or no CPU capability query
        return "DEFAULT"
    return cap if cap in _SIMD_FLAGS else "DEFAULT"


def _build():
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on a CPU-only machine
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    simd = _simd()
    flags = ["-O3", *_SIMD_FLAGS.get(simd, [])]
    return cpp_extension.load(name=build_name(_SOURCE, simd, flags), sources=[_SOURCE], extra_cflags=flags, verbose=False)


def build_name(source: str, simd: str, flags: list[str]) -> str:
    """The extension's name, one per (checkout, source text, flags).

    torch keys its build folder by name and ninja rebuilds when the command (which holds the
    source's path) changes, so two checkouts sharing one name would rebuild on every switch."""
    digest = hashlib.sha256()
    for part in (os.path.abspath(source), " ".join(flags)):
        digest.update(part.encode() + b"\0")
    with open(source, "rb") as f:
        digest.update(f.read())
    return f"krause_cpu_{simd.lower()}_{digest.hexdigest()[:12]}"


def _first_error(exc: Exception) -> str:
    """The compiler's first error line (a build failure's message is the whole build log)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0][:300]}"


def load():
    """The compiled module, building it on the first call; None if the build failed."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["module"] = _build()
            except Exception as exc:  # no compiler, no ninja, a compile error: the engine runs instead
                _state["error"] = _first_error(exc)
                log.warning("krause: the compiled CPU kernel could not be built (%s); "
                            "the Krause ops run the PyTorch engine (krause.engine) on CPU instead", _state["error"])
            _state["tried"] = True
    return _state["module"]


@torch.compiler.disable
def active() -> bool:
    """True when the Krause ops' CPU kernels run the compiled code."""
    return not _state["engine"] and load() is not None


def status() -> str:
    if _state["engine"]:
        return "disabled (the PyTorch engine runs; KRAUSE_CPU_KERNEL=0 or use_engine)"
    if not _state["tried"]:
        return "not built yet (builds on first use)"
    if _state["module"] is None:
        return f"build failed, the PyTorch engine runs instead: {_state['error']}"
    return f"built ({_simd()}): {_state['module'].__file__}"


@contextlib.contextmanager
def use_engine(engine: bool = True):
    """Within the block the CPU ops run the PyTorch engine (``engine=True``) or the compiled kernels."""
    before = _state["engine"]
    _state["engine"] = engine
    try:
        yield
    finally:
        _state["engine"] = before


def _as_is(x: torch.Tensor) -> bool:
    """Whether the kernels take x without a copy (fp32, contiguous)."""
    return x.dtype == torch.float32 and x.is_contiguous()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if _as_is(x) else x.to(torch.float32).contiguous()  # the common case without two calls into torch


_NO_PADDING = torch.empty(0, dtype=torch.bool)  # read only: the kernels' "no key_valid"


def causal_saved_slots(num_queries: int, num_keys: int, window: int, top_k: int) -> int:
    """Ks: the most keys a causal query keeps (the last dim of the saved tensors)."""
    return max(1, min(top_k, window, num_keys))


def causal_forward(q, k, v, log_sigma, key_valid, window: int, top_k: int, saved: bool = True):
    """End-aligned causal Krause forward: q (B, H, Tq, D), k, v (B, Hkv, Tk, D), Tq <= Tk;
    log_sigma () or (H,). Returns out (q's dtype) and the saved probs, dist, kept (with
    ``saved=False``, inference, those three are empty: the kernel writes only out)."""
    mod = load()
    tq, tk = q.shape[2], k.shape[2]
    first = max(0, tk - tq - window + 1)  # keys older than the first query's window are never read
    # The kernel reads only the keys in the queries' windows, so older keys cost nothing where
    # k and v go in as they are; cut them off only where k or v is copied anyway (a dtype
    # conversion or a non-contiguous layout), so the copy holds only the keys read.
    if _as_is(k) and _as_is(v):
        first = 0
    if first:
        k, v = k[:, :, first:], v[:, :, first:]
        key_valid = key_valid[:, first:] if key_valid is not None else None
    kf, vf, qf = _f32(k), _f32(v), _f32(q)
    valid = key_valid.contiguous() if key_valid is not None else _NO_PADDING
    out, probs, dist, kept = mod.causal_forward(
        qf, kf, vf, valid, _f32(log_sigma), tk - first - tq, window, top_k, causal_saved_slots(tq, tk, window, top_k), saved)
    if first and saved:
        kept = torch.where(kept >= 0, kept + first, kept)  # indices into the full keys
    return out.to(q.dtype), probs, dist, kept


@functools.lru_cache(maxsize=32)
def grid_candidate_lists(grid, radius: int, metric: str, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR candidate lists (ptr int64 (N+1,), idx int32) of the 2-D op's queries."""
    from ..masks import grid_candidate_mask

    mask = grid_candidate_mask(grid, radius, metric, num_prefix)
    ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    ptr[1:] = mask.sum(-1).cumsum(0)
    return ptr, mask.nonzero()[:, 1].to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _widest_grid_row(grid, radius: int, metric: str, num_prefix: int) -> int:
    """The most candidates any query of the 2-D op has (plain Python: fake kernels call it)."""
    from ..masks import grid_offsets

    rows, cols = grid
    if num_prefix:
        return num_prefix + rows * cols  # a prefix query sees every token
    offsets = grid_offsets(radius, metric)
    return max(sum(0 <= r + dr < rows and 0 <= c + dc < cols for dr, dc in offsets)
               for r in range(rows) for c in range(cols))


def local2d_saved_slots(grid, radius: int, metric: str, top_k: int, num_prefix: int) -> int:
    return max(1, min(top_k, _widest_grid_row(tuple(grid), radius, metric, num_prefix)))


def local2d_forward(q, k, v, log_sigma, grid, radius: int, metric: str, top_k: int, num_prefix: int):
    mod = load()
    ptr, idx = grid_candidate_lists(tuple(grid), radius, metric, num_prefix)
    ks = local2d_saved_slots(grid, radius, metric, top_k, num_prefix)
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    out, probs, dist, kept = mod.listed_forward(qf, kf, vf, _f32(log_sigma), ptr, idx, top_k, ks)
    return out.to(q.dtype), probs, dist, kept


def backward(grad_out, q, k, v, log_sigma, probs, dist, kept, window: int = 0):
    """dq, dk, dv (fp32) and dcoef (H,) from the saved rows of either forward; ``window``:
    the causal op's (its queries end-aligned), 0 for the 2-D op's candidate lists."""
    dq, dk, dv, dcoef = load().backward(_f32(grad_out), _f32(q), _f32(k), _f32(v), _f32(log_sigma), probs.contiguous(),
                                        dist.contiguous(), kept.contiguous(), window)
    return dq, dk, dv, dcoef.sum(0)
