"""``KrauseConfig``: the settings of every attention module, with one set of defaults,
validated once, here (``check_sigma`` is the one sigma check of the project).

Krause modules take a config (or keyword overrides of their preset); the baselines take
only the fields they read (the registry, ``krause.nn.registry``, passes them), so a
softmax module cannot silently accept a Krause argument. A new knob is a new field of
this class and nothing else in the constructors. A family config embeds one
``KrauseConfig``: its presets override fields by name (``KrauseConfig().replace``), so a
misspelt field fails naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import _validation as V
from ..dispatch import IMPLS


def check_sigma(sigma, name: str = "sigma") -> float:
    """sigma as a float; one line naming ``name`` unless it is a finite number > 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {sigma!r}")
    return float(sigma)


@dataclass(frozen=True)
class KrauseConfig:
    """Krause attention settings (the method and its knobs: docs/method.md).

    window: causal candidate window W (keys i - W < j <= i), causal modules.
    top_k: nearest candidates kept per query.
    sigma: initial sigma (> 0), stored by the module as ``log_sigma``.
    radius, metric: the 2-D neighbourhood of the vision module ("manhattan" or "chebyshev").
    per_head_sigma: one sigma per head (True) or one per layer.
    impl: which implementation runs the op ("auto", "fast", "reference", "flex", "triton";
        see ``krause.dispatch``).
    global_tokens: the first tokens every later token sees besides its window
        (``longformer``; 0 makes it a sliding window).
    num_clusters: k-means clusters of queries and keys (``routing``).
    """

    window: int = 128
    top_k: int = 96
    sigma: float = 2.5
    radius: int = 1
    metric: str = "manhattan"
    per_head_sigma: bool = True
    impl: str = "auto"
    global_tokens: int = 4
    num_clusters: int = 8

    def __post_init__(self) -> None:
        V.check_positive_int("window", self.window)
        V.check_positive_int("top_k", self.top_k)
        object.__setattr__(self, "sigma", check_sigma(self.sigma))
        V.check_nonnegative_int("radius", self.radius)
        V.check_metric(self.metric)
        if not isinstance(self.per_head_sigma, bool):
            raise ValueError(f"per_head_sigma must be a bool, got {self.per_head_sigma!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        V.check_nonnegative_int("global_tokens", self.global_tokens)
        V.check_positive_int("num_clusters", self.num_clusters)

    def replace(self, **changes) -> "KrauseConfig":
        """A copy with some fields changed (checked like the constructor's)."""
        unknown = sorted(set(changes) - FIELDS)
        if unknown:
            raise ValueError(f"{unknown[0]} is not a Krause setting; KrauseConfig fields are {sorted(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = frozenset(f.name for f in dataclasses.fields(KrauseConfig))


def resolve_config(preset: KrauseConfig, config: KrauseConfig | None, overrides: dict) -> KrauseConfig:
    """The config a Krause module runs with: ``config`` (or the module's ``preset``) with
    keyword ``overrides`` applied."""
    if config is not None and not isinstance(config, KrauseConfig):
        raise ValueError(f"config must be a KrauseConfig, got {type(config).__name__}")
    return (config if config is not None else preset).replace(**overrides)


def config_from_fields(values: dict, names: dict[str, str], base: KrauseConfig | None = None) -> KrauseConfig:
    """The ``KrauseConfig`` of a family config that stores its fields flat under its own
    names (``names``: KrauseConfig field -> family field; ``values`` keyed by KrauseConfig
    field): ``base`` (default ``KrauseConfig()``) with them replaced. An error names the
    family's field, so the user sees the flag or key they set."""
    try:
        return (base or KrauseConfig()).replace(**values)
    except ValueError as e:
        message = str(e)
        for field, family_name in names.items():
            if message.startswith(field + " "):
                raise ValueError(family_name + message[len(field):]) from None
        raise
