"""Which implementation runs a Krause op, as data: ``ROUTES`` says which backends each
requested ``impl`` tries, in order, and ``REFUSALS`` says, per backend, why it cannot take
a call (device, dtype, shape); the first backend that does not refuse runs. Every decision
carries the reasons the others refused (logged once at DEBUG level on the ``krause``
logger; ``explain`` returns them), NATTEN-style.

Backends:
    triton     fused Triton kernels (``krause.kernels``): CUDA, or the interpreter
    compiled   the compiled CPU kernels (``krause.cpu``), the fast ops' CPU kernel
    dense      the one dense formula (``krause.reference``) where the causal band would
               score every key anyway; for the 2-D op the engine's dense masked path
    engine     the linear-time PyTorch engine (``krause.engine``): any device
    flex       FlexAttention with a block-sparse mask and a top-k threshold (``krause.flex``)
    reference  dense O(N^2) masks + autograd: any device, for tests
``auto`` takes the Triton kernels only on a device a GPU check has verified (a record
written by ``scripts/gpu_check.sh``, see ``gpu_verification``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from typing import NamedTuple

import torch

from . import cpu
from .neighbourhoods import band_block_size

IMPLS = ("auto", "fast", "reference", "flex", "triton")
OPS = ("causal", "local2d")
BACKENDS = ("triton", "compiled", "dense", "engine", "flex", "reference")

# requested impl -> the backends it may run, in order of preference
ROUTES: dict[str, tuple[str, ...]] = {
    "auto": ("triton", "compiled", "dense", "engine"),
    "fast": ("compiled", "engine"),
    "triton": ("triton",),
    "flex": ("flex",),
    "reference": ("reference",),
}

# Up to this many tokens the engine's 2-D op runs one dense score matmul instead of
# per-offset sparse products (the engine only: the compiled and Triton kernels take any grid).
DENSE_2D_MAX_TOKENS = 300

log = logging.getLogger("krause")


class Call(NamedTuple):
    """What a backend's refusal may depend on (plain constants: no tensor shapes, so
    torch.compile can evaluate a decision once, even with dynamic shapes)."""

    op: str
    device: str  # device type
    dtype: torch.dtype | None  # None: q, k and v differ
    window: int | None = None
    one_span: bool | None = None  # causal: the keys the queries see fit in one band span
    grid: tuple | None = None
    radius: int | None = None
    num_prefix: int = 0


def keys_in_one_span(window: int, num_queries: int, num_keys: int) -> bool:
    """Whether the causal band would score one span covering every key the queries see
    (Tk' <= C + W - 1 after end alignment)."""
    return min(num_keys, num_queries + window - 1) <= band_block_size(window) + window - 1


def make_call(op: str, device, dtype=torch.float32, window=None, num_queries=None, num_keys=None, grid=None,
              radius=None, num_prefix=0) -> Call:
    one_span = None if window is None or num_keys is None else keys_in_one_span(window, num_queries or num_keys,
                                                                                num_keys)
    return Call(op, torch.device(device).type, dtype, window, one_span, grid and tuple(grid), radius, num_prefix)


class Choice(NamedTuple):
    backend: str
    refused: dict  # backend -> why it did not run


# --------------------------------------------------------------------------- GPU verification
def verification_paths() -> list[str]:
    """Where verification records are read from: $KRAUSE_GPU_VERIFICATION, the user's
    cache, and the record shipped in the package."""
    user = os.environ.get("KRAUSE_GPU_VERIFICATION") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "krause", "gpu_verification.json")
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "gpu_verification.json")
    return [user, shipped]


def read_records() -> list[dict]:
    records = []
    for path in verification_paths():
        try:
            with open(path) as f:
                records += json.load(f).get("records", [])
        except (OSError, ValueError, AttributeError):
            continue
    return records


def gpu_verification(device_name: str, triton_version: str) -> str | None:
    """None when a passed record exists for this GPU and Triton version, else why not."""
    records = read_records()
    for r in records:
        if r.get("device") == device_name and r.get("triton") == triton_version and r.get("passed") is True:
            return None
    seen = sorted({f"{r.get('device')} / triton {r.get('triton')}" for r in records if r.get("passed") is True})
    return (f"not verified on {device_name} with triton {triton_version} (records: {', '.join(seen) or 'none'}; "
            "run scripts/gpu_check.sh)")


def _verified(device: str) -> str | None:
    if device != "cuda":
        return f"auto takes the Triton kernels only on a verified CUDA device, not {device}"
    try:
        import triton

        return gpu_verification(torch.cuda.get_device_name(), triton.__version__)
    except Exception as exc:  # no triton, no CUDA
        return f"cannot check the GPU verification: {exc}"


# --------------------------------------------------------------------------- refusals
def _triton_reason(device: str) -> str | None:
    """None when the Triton kernels can run on this device type, else why not."""
    try:
        kernels = importlib.import_module("krause.kernels")
    except ImportError as e:  # the kernels failed to import
        return f"krause.kernels cannot be imported ({e})"
    ok, why = kernels.triton_available()
    if not ok:
        return why
    if device != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return f"the kernels need a CUDA device or TRITON_INTERPRET=1, got {device}"
    return None


def _dtype_refusal(dtype: torch.dtype | None, accepted) -> str:
    if dtype is None:
        return f"q, k and v have different dtypes: the kernels take one of {accepted} for all three"
    return f"dtype {dtype}: the kernels take {accepted}"


def _refuse_triton(call: Call) -> str | None:
    why = _triton_reason(call.device)
    if why is not None:
        return why
    from . import kernels
    from .kernels.ops import DTYPES

    if call.dtype not in DTYPES:
        return _dtype_refusal(call.dtype, DTYPES)
    if call.op == "causal" and call.window is not None:
        ok, why = kernels.causal_triton_supported(call.window)
    elif call.op == "local2d" and call.grid is not None:
        ok, why = kernels.local2d_triton_supported(call.grid, call.radius, call.num_prefix)
    else:  # no shape given (explain for a device)
        ok, why = True, ""
    return None if ok else why


def _refuse_compiled(call: Call) -> str | None:
    if call.device != "cpu":
        return f"CPU only, not {call.device}"
    if call.dtype not in cpu.DTYPES:
        return _dtype_refusal(call.dtype, cpu.DTYPES)
    if not cpu.active():
        return cpu.status()
    return None


def _refuse_dense(call: Call) -> str | None:
    if call.op == "causal":
        if call.one_span is None:
            return "depends on the window and the number of keys"
        return None if call.one_span else "the keys exceed one band span: the band does less arithmetic"
    if call.grid is None:
        return "depends on the grid"
    tokens = call.num_prefix + call.grid[0] * call.grid[1]
    if tokens > DENSE_2D_MAX_TOKENS:
        return f"{tokens} tokens > DENSE_2D_MAX_TOKENS ({DENSE_2D_MAX_TOKENS})"
    return None


def _refuse_flex(call: Call) -> str | None:
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError:
        return f"FlexAttention is not in torch {torch.__version__}"
    return None


REFUSALS = {
    "triton": _refuse_triton,
    "compiled": _refuse_compiled,
    "dense": _refuse_dense,
    "engine": lambda call: None,
    "flex": _refuse_flex,
    "reference": lambda call: None,
}

# Only auto adds these (an explicit impl is the caller's choice).
_AUTO_REFUSALS = {
    "triton": lambda call: _verified(call.device),
}


# --------------------------------------------------------------------------- decisions
_CHOICES: dict[tuple, Choice] = {}


def choose(call: Call, impl: str = "auto") -> Choice:
    """The backend that runs ``call`` for the requested ``impl``, with why the others refused.
    Decided once per distinct (call, impl, CPU kernel switch) and logged at DEBUG level."""
    key = (call, impl, cpu.engine_forced())
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen = _decide(call, impl)
        _CHOICES[key] = chosen
    return chosen


@torch.compiler.assume_constant_result
def backend_for(impl: str, op: str, device: str, dtype: torch.dtype, window: int | None = None,
                one_span: bool | None = None, grid: tuple | None = None, radius: int | None = None,
                num_prefix: int = 0) -> str:
    """``choose(...).backend`` from constants, which torch.compile evaluates once while
    tracing and bakes into the graph (the decision reads files and builds the CPU kernel)."""
    return choose(Call(op, device, dtype, window, one_span, grid, radius, num_prefix), impl).backend


def clear_cache() -> None:
    """Forgets past decisions (after installing triton, writing a GPU record, or in tests)."""
    _CHOICES.clear()


def _decide(call: Call, impl: str) -> Choice:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if call.op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {call.op!r}")
    refused = {}
    for backend in ROUTES[impl]:
        why = REFUSALS[backend](call)
        if why is None and impl == "auto" and backend in _AUTO_REFUSALS:
            why = _AUTO_REFUSALS[backend](call)
        if why is None:
            log.debug("krause %s on %s (%s): %s runs; refused %s", call.op, call.device, call.dtype, backend, refused)
            return Choice(backend, refused)
        refused[backend] = why
    reasons = list(refused.values()) if len(refused) == 1 else [f"{b}: {w}" for b, w in refused.items()]
    raise ValueError(f"impl={impl!r} cannot run {call.op} on {call.device}: {'; '.join(reasons)}")


def choose_impl(op: str, device, impl: str = "auto", **call) -> str:
    """The backend (one of ``BACKENDS``) that runs ``op`` on ``device``; ``call``: dtype
    (default float32), window, num_queries, num_keys, grid, radius, num_prefix."""
    return choose(make_call(op, device, **call), impl).backend


def explain(op: str, device, impl: str = "auto", **call) -> dict[str, str]:
    """For every backend: 'chosen', 'available' or why it is refused (for humans)."""
    c = make_call(op, device, **call)
    try:
        chosen = choose(c, impl).backend
    except ValueError:
        chosen = None
    out = {}
    for backend in BACKENDS:
        why = REFUSALS[backend](c)
        if why is None and impl == "auto" and backend in _AUTO_REFUSALS:
            why = _AUTO_REFUSALS[backend](c)
        out[backend] = "chosen" if backend == chosen else (why or "available")
    return out
