"""Krause attention: distance-based, local, top-k sparse attention.

Public ops (see SPEC section 1):
    causal_krause_attention(q, k, v, log_sigma, window, top_k)
    local_krause_attention_2d(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens=1)
"""

from .ops import causal_krause_attention, local_krause_attention_2d
from .reference import causal_krause_attention_reference, local_krause_attention_2d_reference

__all__ = [
    "causal_krause_attention",
    "local_krause_attention_2d",
    "causal_krause_attention_reference",
    "local_krause_attention_2d_reference",
]
