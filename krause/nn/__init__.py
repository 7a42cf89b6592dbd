"""Attention modules: each Krause module has a standard-attention twin with the same
parameter names (the Krause one adds only ``log_sigma``) and the same shared constructor
arguments; Krause settings live in a ``KrauseConfig`` that only Krause modules take, and
``build_attention`` builds either twin of a kind from one set of arguments."""

from ._common import krause_attention_probs
from .baselines import SlidingWindowAttention, TopKAttention, topk_causal_attention
from .causal import CausalKrauseAttention, CausalProjections, CausalSelfAttention
from .config import KrauseConfig
from .factory import TWINS, build_attention
from .gated import GatedKrauseAttention, gated_mix, init_gate
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
    "CausalProjections",
    "CausalSelfAttention",
    "GatedKrauseAttention",
    "KrauseConfig",
    "LocalKrauseAttention2d",
    "SlidingWindowAttention",
    "StandardAttention",
    "TopKAttention",
    "TWINS",
    "WindowAttention",
    "WindowKrauseAttention",
    "build_attention",
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
