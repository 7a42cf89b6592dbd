"""Krause attention: distance-based, local, top-k sparse attention.

Functional ops (SPEC section 1), linear-time on every device:
    causal_krause_attention(q, k, v, log_sigma, window, top_k)
    local_krause_attention_2d(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens=1)

Modules with standard-attention twins live in ``krause.nn``, decoding caches in
``krause.cache``, the shared training machinery in ``krause.training``.
"""

from . import nn
from .cache import KrauseWindowCache, RingKVCache, SlidingWindowCache, StandardKVCache
from .nn import topk_schedule
from .ops import causal_krause_attention, local_krause_attention_2d
from .reference import causal_krause_attention_reference, local_krause_attention_2d_reference

__all__ = [
    "causal_krause_attention",
    "local_krause_attention_2d",
    "causal_krause_attention_reference",
    "local_krause_attention_2d_reference",
    "topk_schedule",
    "nn",
    "KrauseWindowCache",
    "RingKVCache",
    "SlidingWindowCache",
    "StandardKVCache",
]
