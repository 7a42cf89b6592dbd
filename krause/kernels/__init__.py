"""Fused Triton kernels of Krause attention (the ``impl="triton"`` path).

Entry points (triton is imported on first use, so importing this package is free):

    causal_krause_attention_triton(q, k, v, log_sigma, window, top_k, key_padding_mask=None)
    local_krause_attention_2d_triton(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens)
    decode_krause_attention_triton(q, k_ring, v_ring, log_sigma, lengths, top_k, pos=None, *, window=None, valid=None)
    triton_available() -> (ok, reason)
    causal_triton_supported(window) -> (ok, reason)
    local2d_triton_supported(grid, radius, num_prefix_tokens) -> (ok, reason)

Semantics are those of ``krause.reference`` with one rule made explicit: among
candidates at exactly equal distance the lower key index (the older token) is kept
first. Kernels, tiling and the backward are described in ``krause/kernels/_triton.py``.
Enable ``TRITON_INTERPRET=1`` before the first import to run them on CPU.
"""

from __future__ import annotations

import os

import torch

from .. import _validation as V

def triton_available() -> tuple[bool, str]:
    """(True, "") when the kernels can run here (a CUDA device, or the Triton interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable: {exc}"
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    major, _ = torch.cuda.get_device_capability()
    if torch.version.hip is None and major < 8:
        return False, f"CUDA capability {major}.x: the kernels need sm_80 or newer (bf16 tensor cores)"
    return True, ""


def _ops():
    from . import ops  # imports triton and registers the krause::triton_* custom ops

    return ops


def _check_dtypes(q, k, v):
    from .ops import DTYPES

    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_device(q):
    if torch.compiler.is_compiling():  # no host queries in a traced graph; an unusable device fails at launch
        return
    ok, why = triton_available()
    if not ok:
        raise ValueError(f"impl='triton' unavailable: {why}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
        raise ValueError(f"q is on {q.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def causal_krause_attention_triton(q, k, v, log_sigma, window: int, top_k: int, key_padding_mask=None):
    """Causal sliding-window Krause attention, fused. q (B, H, Tq, D); k, v (B, Hkv, Tk, D),
    Tq <= Tk (queries are the last Tq positions); key_padding_mask (B, Tk) bool, True = real.
    Returns (B, H, Tq, D) in q's dtype; differentiable in q, k, v, log_sigma."""
    V.check_positive_int("window", window)
    V.check_positive_int("top_k", top_k)
    b, h, _, tk, _ = V.check_qkv(q, k, v, end_aligned=True)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    key_padding_mask = V.check_key_padding_mask(key_padding_mask, b, tk, q)
    _check_dtypes(q, k, v)
    _check_device(q)
    ops = _ops()
    ok, why = ops.causal_supported(window)
    if not ok:
        raise ValueError(f"window: {why}")
    out, _, _ = ops._causal_fwd_op(q, k, v, log_sigma, key_padding_mask, window, top_k)
    return out


def causal_triton_supported(window: int) -> tuple[bool, str]:
    """Whether the causal kernels handle this window (W <= 1985: block + W - 1 keys in one 2048-key tile)."""
    return _ops().causal_supported(window)


def local2d_triton_supported(grid, radius: int, num_prefix_tokens: int = 1) -> tuple[bool, str]:
    """Whether the 2-D kernels handle this neighbourhood (their tiles have a maximum width)."""
    return _ops().local2d_supported(tuple(grid), radius, num_prefix_tokens)


def local_krause_attention_2d_triton(q, k, v, log_sigma, grid, radius: int, metric: str, top_k: int,
                                     num_prefix_tokens: int = 1):
    """2-D local Krause attention on a row-major patch grid after ``num_prefix_tokens``
    prefix tokens, fused. q (B, H, N, D); k, v (B, Hkv, N, D). Returns (B, H, N, D)."""
    V.check_nonnegative_int("radius", radius)
    metric = V.check_metric(metric)
    V.check_positive_int("top_k", top_k)
    _, h, _, n, _ = V.check_qkv(q, k, v)
    rows, cols = V.check_grid(grid, n, num_prefix_tokens)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    _check_dtypes(q, k, v)
    _check_device(q)
    ops = _ops()
    ok, why = ops.local2d_supported((rows, cols), radius, num_prefix_tokens)
    if not ok:
        raise ValueError(f"grid: {why}")
    out, _, _ = ops._local_fwd_op(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix_tokens)
    return out


def decode_krause_attention_triton(q, k_ring, v_ring, log_sigma, lengths, top_k: int, pos: int | None = None, *,
                                   window: int | None = None, valid=None):
    """One decoding step: q (B, H, D) or (B, H, 1, D) against a ring buffer k_ring, v_ring
    (B, Hkv, C, D) laid out as a ring buffer (token p in slot p % C).

    ``pos``: tokens written to the ring so far, the new one included (default
    ``lengths.max()``). ``lengths`` (B,) or None: real tokens of each row; a row's real
    tokens are its last ``lengths[b]`` ones (earlier slots are left padding), so a slot is
    a candidate when its token is among the last min(lengths[b], pos, window) written.
    ``window`` defaults to C; ``valid`` (B, C) bool optionally marks further slots invalid
    (per-slot padding, as the cache stores it). Inference only (no autograd)."""
    V.check_positive_int("top_k", top_k)
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[2] != 1:
            raise ValueError(f"q must hold one token per row for decoding, got shape {tuple(q.shape)}")
        q = q[:, :, 0]
    if q.dim() != 3 or k_ring.dim() != 4 or k_ring.shape != v_ring.shape:
        raise ValueError(f"q must be (B, H, D) and k_ring, v_ring (B, Hkv, C, D); got {tuple(q.shape)}, "
                         f"{tuple(k_ring.shape)}, {tuple(v_ring.shape)}")
    b, h, d = q.shape
    capacity = k_ring.shape[2]
    if k_ring.shape[0] != b or k_ring.shape[3] != d or h % k_ring.shape[1] != 0:
        raise ValueError(f"k_ring shape {tuple(k_ring.shape)} does not fit q {tuple(q.shape)}")
    if lengths is None:
        if pos is None:
            raise ValueError("pos is needed when lengths is None")
        lengths = torch.full((b,), pos, dtype=torch.int32, device=q.device)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (b,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape ({b},)")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or tuple(valid.shape) != (b, capacity)):
        raise ValueError(f"valid must be a bool tensor of shape ({b}, {capacity})")
    window = capacity if window is None else V.check_positive_int("window", window)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    _check_dtypes(q, k_ring, v_ring)
    _check_device(q)
    if pos is None:
        pos = int(lengths.max())
    V.check_nonnegative_int("pos", pos)
    out = _ops()._decode_op(q, k_ring, v_ring, log_sigma, lengths.to(q.device), valid, pos, window, top_k)
    return out[:, :, None] if squeeze else out


__all__ = [
    "causal_krause_attention_triton",
    "local_krause_attention_2d_triton",
    "decode_krause_attention_triton",
    "triton_available",
    "causal_triton_supported",
    "local2d_triton_supported",
]
