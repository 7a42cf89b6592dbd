"""One factory for every Krause module and its standard twin.

``build_attention(kind, *args, krause=None, **shared)`` builds the standard twin of
``kind`` when ``krause`` is None and the Krause module configured by it otherwise, from
the same shared arguments (sizes, biases, dropouts). Krause settings travel only inside a
``KrauseConfig``: passed loose, or to a standard twin, they raise, so a softmax baseline
can never silently run with (or ignore) a Krause knob.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .causal import CausalKrauseAttention, CausalSelfAttention
from .config import FIELDS, KrauseConfig
from .swin import WindowAttention, WindowKrauseAttention
from .vision import LocalKrauseAttention2d, StandardAttention


@dataclass(frozen=True)
class Twins:
    """A Krause module, its standard twin and the input-layout arguments (not settings)
    that only the Krause module reads."""

    krause: type[nn.Module]
    standard: type[nn.Module]
    krause_layout: tuple[str, ...] = ()


TWINS = {
    "causal": Twins(CausalKrauseAttention, CausalSelfAttention),
    "vision": Twins(LocalKrauseAttention2d, StandardAttention, ("grid", "num_prefix_tokens")),
    "window": Twins(WindowKrauseAttention, WindowAttention),
}


def build_attention(kind: str, *args, krause: KrauseConfig | None = None, **shared) -> nn.Module:
    """The Krause module of ``kind`` ("causal", "vision" or "window") configured by
    ``krause``, or with ``krause=None`` its standard twin, built from the same arguments.

    The layout arguments the Krause module needs and its twin has no use for (the patch
    grid of "vision") are given alike and dropped for the twin.
    """
    if kind not in TWINS:
        raise ValueError(f"kind must be one of {sorted(TWINS)}, got {kind!r}")
    loose = sorted(set(shared) & FIELDS)
    if loose:
        raise ValueError(f"{loose[0]} is a Krause setting: pass it inside krause=KrauseConfig(...), not loose")
    twins = TWINS[kind]
    if krause is None:
        return twins.standard(*args, **{k: v for k, v in shared.items() if k not in twins.krause_layout})
    if not isinstance(krause, KrauseConfig):
        raise ValueError(f"krause must be a KrauseConfig or None, got {type(krause).__name__}")
    return twins.krause(*args, config=krause, **shared)
