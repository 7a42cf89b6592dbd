"""Which implementation runs a Krause op: one ``choose_impl`` that says why it refused
the others (logged at DEBUG level on the ``krause`` logger), NATTEN-style.

Implementations:
    reference  dense O(N^2) masks + autograd (``krause.reference``): any device, for tests
    fast       the linear-time engine (``krause.engine``) as custom ops: any device
    flex       FlexAttention with a block-sparse mask and a top-k threshold (``krause.flex``)
    triton     fused Triton kernels (``krause.kernels``), CUDA or the Triton interpreter
``auto`` takes the best one that can run: triton on CUDA once verified on a GPU, else fast.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

IMPLS = ("auto", "fast", "reference", "flex", "triton")
OPS = ("causal", "local2d")

log = logging.getLogger("krause")


def _triton_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    try:
        kernels = importlib.import_module("krause.kernels")
    except ImportError as e:  # triton missing or the kernels failed to import
        return f"krause.kernels cannot be imported ({e})"
    ok, why = kernels.triton_available()
    if not ok:
        return why
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return f"the kernels need a CUDA device or TRITON_INTERPRET=1, got {device.type}"
    return None


def _triton_verified() -> bool:
    """The fused kernels are chosen by ``auto`` only once a GPU run has verified them."""
    try:
        kernels = importlib.import_module("krause.kernels")
    except ImportError:
        return False
    return bool(getattr(kernels, "VERIFIED_ON_GPU", False))


def refusal(impl: str, op: str, device: torch.device, *, key_padding_mask=None) -> str | None:
    """None when ``impl`` can run ``op`` on ``device``, else the reason it cannot."""
    if impl in ("reference", "fast"):
        return None
    if impl == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError:
            return f"FlexAttention is not in torch {torch.__version__}"
        return None
    if impl == "triton":
        return _triton_reason(device)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _auto_refusal(impl: str, op: str, device: torch.device, **kw) -> str | None:
    """Why ``auto`` does not pick ``impl`` (None: it may)."""
    if impl == "reference":
        return "dense O(N^2): only on request"
    if impl == "flex":
        return "keeps every tie at the k-th distance (not exactly top_k): only on request"
    if impl == "triton":
        if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            return f"no CUDA device ({device.type})"
        why = refusal(impl, op, device, **kw)
        if why is None and not _triton_verified():
            why = "not yet verified on a GPU (krause.kernels.VERIFIED_ON_GPU is False)"
        return why
    return refusal(impl, op, device, **kw)


# (op, device type, requested impl) -> chosen impl: decided (and logged) once per process,
# so the hot path is a dict lookup that torch.compile traces without a graph break.
_CHOICES: dict[tuple[str, str, str], str] = {}


def choose_impl(op: str, device: torch.device, impl: str = "auto", *, key_padding_mask=None) -> str:
    """The implementation that runs ``op`` ("causal" or "local2d") on ``device``.

    An explicit ``impl`` that cannot run raises ValueError saying why; ``auto`` picks
    triton, then fast, logging why it refused the others.
    """
    device = torch.device(device)
    chosen = _CHOICES.get((op, device.type, impl))
    if chosen is None:
        chosen = _decide(op, device, impl)
        _CHOICES[(op, device.type, impl)] = chosen
    return chosen


def clear_cache() -> None:
    """Forgets past decisions (after installing triton, or in tests)."""
    _CHOICES.clear()


@torch.compiler.disable
def _decide(op: str, device: torch.device, impl: str, key_padding_mask=None) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl != "auto":
        why = refusal(impl, op, device, key_padding_mask=key_padding_mask)
        if why is not None:
            raise ValueError(f"impl={impl!r} cannot run {op} on {device}: {why}")
        return impl
    refused = {}
    for candidate in ("triton", "fast"):
        why = _auto_refusal(candidate, op, device, key_padding_mask=key_padding_mask)
        if why is None:
            others = {c: _auto_refusal(c, op, device) for c in ("reference", "flex")}
            refused.update({c: w for c, w in others.items() if w})
            log.debug("krause %s on %s: impl=%s; refused %s", op, device.type, candidate, refused)
            return candidate
        refused[candidate] = why
    raise AssertionError("the fast engine runs everywhere")  # pragma: no cover


def triton_shape_refusal(op: str, q, k, v, *, window=None, grid=None, radius=None, num_prefix_tokens=1) -> str | None:
    """Why the Triton kernels cannot take this call's dtypes/shapes (None: they can).
    Checked per call, since ``choose_impl`` decides per device, not per shape."""
    from . import kernels
    from .kernels.ops import DTYPES

    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernels take one dtype of {DTYPES}"
    ok, why = (kernels.causal_triton_supported(window) if op == "causal"
               else kernels.local2d_triton_supported(grid, radius, num_prefix_tokens))
    return None if ok else why


def explain(op: str, device, impl: str = "auto") -> dict[str, str]:
    """For every implementation, 'chosen', 'available' or why it is refused (for humans)."""
    device = torch.device(device)
    chosen = choose_impl(op, device, impl) if impl == "auto" or refusal(impl, op, device) is None else None
    out = {}
    for candidate in IMPLS[1:]:
        why = refusal(candidate, op, device)
        out[candidate] = "chosen" if candidate == chosen else (why or "available")
    return out
