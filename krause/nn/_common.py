"""Argument checks and small pieces shared by the attention modules."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validation as V
from ..dense import krause_weights
from .config import check_sigma


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
    """Dense Krause attention weights (B, H, Nq, Nk), fp32, for analysis and small inputs
    (``krause.dense.krause_weights`` with log_sigma checked)."""
    return krause_weights(q, k, V.check_log_sigma(log_sigma, q.shape[1], q), candidates, top_k)
