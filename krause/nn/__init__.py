"""Attention modules and the one registry that builds them.

``build_attention(name, *args, krause=KrauseConfig(...), **shared)`` builds the module
registered as ``name`` (``attention_names()`` lists them: softmax, krause, gated,
sliding_window, topk, linear, longformer, routing and the vision/Swin twins); every family builds its attention
through it. Each Krause module has a standard-attention twin with the same parameter names
(the Krause one adds only ``log_sigma``); all settings live in one ``KrauseConfig``."""

from ._common import krause_attention_probs
from .baselines import SlidingWindowAttention, TopKAttention, topk_causal_attention
from .causal import CausalKrauseAttention, CausalProjections, CausalSelfAttention
from .config import KrauseConfig, check_sigma
from .gated import GatedKrauseAttention, gate_weights, gated_mix, init_gate
from .linear import CausalLinearAttention, causal_linear_attention, elu_feature_map
from .longformer import LongformerAttention, longformer_mask
from .routing import RoutingAttention, nearest_cluster, routing_attention, routing_mask
from .registry import ALIASES, REGISTRY, TWINS, attention_names, build_attention, resolve_name
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
    "ALIASES",
    "CausalLinearAttention",
    "LinearAttentionState",
    "LongformerAttention",
    "RoutingAttention",
    "longformer_mask",
    "nearest_cluster",
    "routing_attention",
    "routing_mask",
    "REGISTRY",
    "attention_names",
    "causal_linear_attention",
    "check_sigma",
    "elu_feature_map",
    "resolve_name",
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
    "gate_weights",
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


def __getattr__(name):
    if name == "LinearAttentionState":  # a transformers cache layer: transformers is imported on first use only
        from ..cache import LinearAttentionState

        return LinearAttentionState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
