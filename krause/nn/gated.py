"""Gated mix of standard and Krause attention (docs/method.md; used by the 100M language
models and the LoRA LLMs).

Two branches with their own q/k/v/o projections — causal softmax attention over the whole
prefix and causal-window Krause attention — are mixed per token by a learned gate:

    g = softmax(gate([out_std; out_krause]))      gate: Linear(2d -> 2)
    out = g0 * out_std + g1 * out_krause

The gate starts near ``gate_init`` on the standard branch (weight N(0, 0.01), bias
[ln(gate_init / (1 - gate_init)), 0]), so a model begins close to standard attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import check_dropout
from .causal import CausalKrauseAttention, CausalSelfAttention
from .config import KrauseConfig, resolve_config


def gated_mix(out_std: torch.Tensor, out_krause: torch.Tensor, gate: nn.Module, return_gate: bool = False):
    """Mixes two (..., d) branch outputs by ``softmax(gate([out_std; out_krause]))``.

    ``gate`` maps 2d features to 2 logits (a Linear(2d, 2)). The softmax runs in fp32.
    Returns the mix, and with ``return_gate`` also the (..., 2) gate weights.
    """
    weights = gate_weights(out_std, out_krause, gate)
    if weights.dtype != out_std.dtype:
        weights = weights.to(out_std.dtype)
    # g0 a + g1 b as b + g0 (a - b) (g1 = 1 - g0): one op instead of three, which a decoding step feels
    out = torch.lerp(out_krause, out_std, weights[..., :1])
    return (out, weights) if return_gate else out


def gate_weights(out_std: torch.Tensor, out_krause: torch.Tensor, gate: nn.Module) -> torch.Tensor:
    """The (..., 2) fp32 gate weights ``softmax(gate([out_std; out_krause]))`` of ``gated_mix``."""
    if out_std.shape != out_krause.shape:
        raise ValueError(f"out_krause shape {tuple(out_krause.shape)} does not match out_std {tuple(out_std.shape)}")
    logits = gate(torch.cat([out_std, out_krause], dim=-1))
    return torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)


def init_gate(gate: nn.Linear, gate_init: float) -> None:
    """Weight N(0, 0.01), bias [logit(gate_init), 0]: softmax starts at ~gate_init on branch 0."""
    if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or not 0.0 < gate_init < 1.0:
        raise ValueError(f"gate_init must be in (0, 1), got {gate_init!r}")
    with torch.no_grad():
        nn.init.normal_(gate.weight, mean=0.0, std=0.01)
        gate.bias.copy_(torch.tensor([math.log(gate_init / (1.0 - gate_init)), 0.0]))


class GatedKrauseAttention(nn.Module):
    """Standard causal attention and causal-window Krause attention, gated per token.

    Submodules: ``standard`` (CausalSelfAttention), ``krause`` (CausalKrauseAttention,
    holding ``log_sigma``, configured by ``config`` / keyword overrides of ``preset``, which
    is ``KrauseConfig()``'s defaults) and ``gate`` (Linear(2 dim, 2)).
    """

    preset = KrauseConfig()

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, config: KrauseConfig | None = None,
                 *, gate_init: float = 0.8, bias: bool = True, proj_drop: float = 0.0, **overrides):
        super().__init__()
        config = resolve_config(self.preset, config, overrides)
        self.standard = CausalSelfAttention(dim, num_heads, num_kv_heads, bias=bias)
        self.krause = CausalKrauseAttention(dim, num_heads, num_kv_heads, config, bias=bias)
        self.gate = nn.Linear(2 * dim, 2)
        init_gate(self.gate, gate_init)
        self.proj_drop = nn.Dropout(check_dropout("proj_drop", proj_drop))

    @property
    def config(self) -> KrauseConfig:
        return self.krause.config

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        out_std = self.standard(x, cache.standard if cache is not None else None, key_padding_mask)
        out_krause = self.krause(x, cache.krause if cache is not None else None, key_padding_mask)
        return self.proj_drop(gated_mix(out_std, out_krause, self.gate))

    def gate_weights(self, x: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        """(B, T, 2) gate weights (standard, Krause) of every token of x, for analysis."""
        out_std = self.standard(x, key_padding_mask=key_padding_mask)
        out_krause = self.krause(x, key_padding_mask=key_padding_mask)
        return gated_mix(out_std, out_krause, self.gate, return_gate=True)[1]

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A ``krause.cache.GatedCacheLayer``: the standard branch's full KV and the Krause window."""
        from ..cache import GatedCacheLayer

        return GatedCacheLayer(self.standard.new_cache(batch_size, device, dtype, capacity),
                               self.krause.new_cache(batch_size, device, dtype, capacity))
