"""Krause attention: distance-based, local, top-k sparse attention.

Functional ops (docs/api.md), linear-time on every device:
    causal_krause_attention(q, k, v, log_sigma, window, top_k, *, key_padding_mask=None, impl="auto")
    local_krause_attention_2d(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens=1, *, impl="auto")

``krause.dense`` holds the one dense formula, ``krause.dispatch`` chooses the implementation.

Modules with standard-attention twins live in ``krause.nn``, decoding caches in
``krause.cache`` (transformers cache layers: imported on first use, so ``import krause``
stays torch-only), the shared training machinery in ``krause.training``.
"""

from . import nn
from .nn import KrauseConfig, topk_schedule
from .ops import causal_krause_attention, local_krause_attention_2d
from .reference import causal_krause_attention_reference, local_krause_attention_2d_reference

__all__ = [
    "causal_krause_attention",
    "local_krause_attention_2d",
    "causal_krause_attention_reference",
    "local_krause_attention_2d_reference",
    "topk_schedule",
    "KrauseConfig",
    "nn",
    "GatedCacheLayer",
    "KVCacheLayer",
    "KrauseWindowLayer",
    "SlidingWindowLayer",
    "WindowCacheLayer",
]

_CACHE_NAMES = {"GatedCacheLayer", "KVCacheLayer", "KrauseWindowLayer", "SlidingWindowLayer", "WindowCacheLayer"}


def __getattr__(name):
    if name in _CACHE_NAMES:
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
