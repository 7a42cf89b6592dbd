"""Attention modules: each Krause module has a standard-attention twin with the same
constructor arguments and parameter names (the Krause one adds only ``log_sigma``)."""

from ._common import krause_attention_probs
from .baselines import SlidingWindowAttention, TopKAttention, topk_causal_attention
from .causal import CausalKrauseAttention, CausalSelfAttention
from .gated import GatedCache, GatedKrauseAttention, gated_mix, init_gate
from .swin import (
    WindowAttention,
    WindowKrauseAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from .vision import LocalKrauseAttention2d, StandardAttention, topk_schedule

__all__ = [
    "CausalKrauseAttention",
    "CausalSelfAttention",
    "GatedCache",
    "GatedKrauseAttention",
    "LocalKrauseAttention2d",
    "SlidingWindowAttention",
    "StandardAttention",
    "TopKAttention",
    "WindowAttention",
    "WindowKrauseAttention",
    "gated_mix",
    "init_gate",
    "krause_attention_probs",
    "relative_position_index",
    "shifted_window_mask",
    "topk_causal_attention",
    "topk_schedule",
    "window_partition",
    "window_reverse",
]
