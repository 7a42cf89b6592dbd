"""Argument checks shared by every Krause op and module.

Every bad argument raises ``ValueError`` whose message starts with the argument's name,
so a researcher sees at once which knob is wrong.
"""

from __future__ import annotations

import math
import os

import torch

METRICS = ("manhattan", "chebyshev")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end_aligned: bool = False
) -> tuple[int, int, int, int, int]:
    """Checks (B, H, Nq, D) queries against (B, Hkv, Nk, D) keys/values; returns B, H, Hkv, Nk, D.

    Nq must equal Nk, or with ``end_aligned`` be at most Nk (the queries are the last Nq
    positions of the keys)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, tokens, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k batch size {k.shape[0]} does not match q batch size {b}")
    if end_aligned and n > k.shape[2]:
        raise ValueError(f"q has {n} tokens but k only {k.shape[2]}: queries must be the last Tq <= Tk positions")
    if not end_aligned and k.shape[2] != n:
        raise ValueError(f"k has {k.shape[2]} tokens but q has {n}")
    if k.shape[3] != d:
        raise ValueError(f"k head_dim {k.shape[3]} does not match q head_dim {d}")
    hkv = k.shape[1]
    if hkv < 1 or h % hkv != 0:
        raise ValueError(f"k heads: q has {h} heads, which is not divisible by the {hkv} key/value heads")
    if n < 1:
        raise ValueError("q must hold at least one token")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    return b, h, hkv, k.shape[2], d


def check_key_padding_mask(mask, batch_size: int, num_keys: int, like: torch.Tensor):
    """A (B, Tk) bool mask (True = real token) on ``like``'s device, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = real token), got {got}")
    if tuple(mask.shape) != (batch_size, num_keys):
        raise ValueError(f"key_padding_mask must have shape ({batch_size}, {num_keys}), got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {like.device}")
    return mask


def check_log_sigma(log_sigma, num_heads: int, like: torch.Tensor) -> torch.Tensor:
    """Returns log_sigma as a tensor of shape () or (num_heads,) on ``like``'s device."""
    if not isinstance(log_sigma, torch.Tensor):
        if isinstance(log_sigma, bool) or not isinstance(log_sigma, (int, float)):
            raise ValueError(f"log_sigma must be a float or a tensor, got {type(log_sigma).__name__}")
        if not math.isfinite(float(log_sigma)):
            raise ValueError(f"log_sigma must be finite, got {log_sigma}")
        return torch.tensor(float(log_sigma), device=like.device, dtype=torch.float32)
    if log_sigma.numel() == 1:
        log_sigma = log_sigma.reshape(())
    elif log_sigma.shape != (num_heads,):
        raise ValueError(
            f"log_sigma must be a scalar or have shape ({num_heads},) (one per head), got {tuple(log_sigma.shape)}"
        )
    if not log_sigma.is_floating_point():
        raise ValueError(f"log_sigma must be floating point, got {log_sigma.dtype}")
    if log_sigma.device != like.device:
        raise ValueError(f"log_sigma is on {log_sigma.device} but q is on {like.device}")
    if DEBUG_CHECKS and not torch.compiler.is_compiling():
        check_finite("log_sigma", log_sigma)
    return log_sigma


# Opt-in checks that cost a host-device sync (set KRAUSE_DEBUG=1 or krause._validation.DEBUG_CHECKS = True).
DEBUG_CHECKS = os.environ.get("KRAUSE_DEBUG", "") not in ("", "0")


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite, got {t.detach().cpu().flatten()[:8].tolist()}")


def check_grid(grid, num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise ValueError(f"grid must be a (rows, cols) pair of ints, got {grid!r}")
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must have positive sides, got {grid!r}")
    check_nonnegative_int("num_prefix_tokens", num_prefix_tokens)
    if rows * cols + num_prefix_tokens != num_tokens:
        raise ValueError(
            f"grid {rows}x{cols} plus {num_prefix_tokens} prefix tokens is "
            f"{rows * cols + num_prefix_tokens} tokens, but the input has {num_tokens}"
        )
    return rows, cols


def check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric
