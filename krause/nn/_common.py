"""Argument checks and small pieces shared by the attention modules."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validation as V
from ..reference import repeat_kv


def check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def check_dropout(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_heads(dim: int, num_heads: int, num_kv_heads: int | None = None) -> tuple[int, int]:
    """Returns (head_dim, num_kv_heads); num_kv_heads None means one key/value head per query head."""
    V.check_positive_int("dim", dim)
    V.check_positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads: dim {dim} is not divisible by num_heads {num_heads}")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    V.check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    return dim // num_heads, num_kv_heads


def log_sigma_parameter(sigma: float, num_heads: int | None) -> nn.Parameter:
    """sigma stored as its log (sigma = exp(log_sigma) stays positive under any update):
    a scalar when ``num_heads`` is None, else one per head."""
    shape = () if num_heads is None else (num_heads,)
    return nn.Parameter(torch.full(shape, math.log(check_sigma(sigma))))


def krause_attention_probs(q, k, log_sigma, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dense Krause attention weights (B, H, Nq, Nk), fp32, for analysis and small inputs.

    ``candidates`` is a boolean mask broadcastable to (B, H, Nq, Nk). Each row keeps its
    ``min(top_k, #candidates)`` nearest keys and softmaxes ``-||q - k||^2 / (2 sigma^2)``
    over them; every other weight is exactly 0. O(Nq Nk) memory: not a training path for
    long sequences.
    """
    h = q.shape[1]
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    qf, kf = q.float(), repeat_kv(k, h).float()
    dist = qf.pow(2).sum(-1)[..., :, None] + kf.pow(2).sum(-1)[..., None, :] - 2.0 * qf @ kf.transpose(-1, -2)
    dist = dist.clamp_min(0.0).masked_fill(~candidates, float("inf"))
    kk = min(top_k, dist.shape[-1])
    nearest = dist.topk(kk, dim=-1, largest=False).indices
    keep = torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, nearest, True) & candidates
    coef = (0.5 * torch.exp(-2.0 * log_sigma.float())).reshape(-1, 1, 1)
    # Dropped slots hold inf; zero them before scaling so no inf * 0 or -inf * ... leaks into autograd.
    logits = (dist.masked_fill(~keep, 0.0) * -coef).masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)
