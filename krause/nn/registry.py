"""The one attention registry: a name maps to one module class, built from one ``KrauseConfig``.

    build_attention("gated", dim, num_heads, krause=KrauseConfig(window=32, top_k=16))

Every family builds its attention here and nowhere else. An entry says which
``KrauseConfig`` fields its module reads: the Krause modules take the whole config, a
baseline only its own knobs (``sliding_window`` the window, ``topk`` top_k,
``longformer`` the window and global_tokens, ``routing`` num_clusters), softmax and
linear attention none, so a setting can never reach a module that ignores it silently.

``layout`` says what the module's ``forward`` reads: "causal" (a (B, T, C) decoder
sequence; ``forward(x, cache=None)``, ``new_cache(batch_size, device, dtype, capacity)``),
"vision" (a prefix + patch-grid sequence of a ViT) or "window" (Swin windows).

The twin kinds of the first factory ("causal", "vision", "window" with ``krause=None`` for
the standard twin) stay accepted by ``build_attention`` for the vision family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .baselines import SlidingWindowAttention, TopKAttention
from .causal import CausalKrauseAttention, CausalSelfAttention
from .config import FIELDS, KrauseConfig
from .gated import GatedKrauseAttention
from .linear import CausalLinearAttention
from .longformer import LongformerAttention
from .routing import RoutingAttention
from .swin import WindowAttention, WindowKrauseAttention
from .vision import LocalKrauseAttention2d, StandardAttention

WHOLE_CONFIG = ("*",)  # an entry whose module takes ``config=KrauseConfig``


@dataclass(frozen=True)
class Attention:
    """One registered attention: its module class, the layout it reads, the
    ``KrauseConfig`` fields it is built with, and layout arguments it does not take."""

    cls: type[nn.Module]
    layout: str
    reads: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()

    @property
    def takes_config(self) -> bool:
        return self.reads == WHOLE_CONFIG


REGISTRY: dict[str, Attention] = {
    "softmax": Attention(CausalSelfAttention, "causal"),
    "krause": Attention(CausalKrauseAttention, "causal", WHOLE_CONFIG),
    "gated": Attention(GatedKrauseAttention, "causal", WHOLE_CONFIG),
    "sliding_window": Attention(SlidingWindowAttention, "causal", ("window",)),
    "topk": Attention(TopKAttention, "causal", ("top_k",)),
    "linear": Attention(CausalLinearAttention, "causal"),
    "longformer": Attention(LongformerAttention, "causal", ("window", "global_tokens")),
    "routing": Attention(RoutingAttention, "causal", ("num_clusters",)),
    "vision_softmax": Attention(StandardAttention, "vision", ignores=("grid", "num_prefix_tokens")),
    "vision_krause": Attention(LocalKrauseAttention2d, "vision", WHOLE_CONFIG),
    "swin_softmax": Attention(WindowAttention, "window"),
    "swin_krause": Attention(WindowKrauseAttention, "window", WHOLE_CONFIG),
}

#: Families' own names for a registered attention (their CLI flags and saved configs keep them).
ALIASES = {"standard": "softmax", "vanilla": "softmax"}

#: The first factory's twin kinds: (Krause member, standard member).
TWIN_KINDS = {"causal": ("krause", "softmax"), "vision": ("vision_krause", "vision_softmax"),
              "window": ("swin_krause", "swin_softmax")}


@dataclass(frozen=True)
class Twins:
    """A Krause module and its standard twin (same parameters but ``log_sigma``)."""

    krause: type[nn.Module]
    standard: type[nn.Module]


TWINS = {kind: Twins(REGISTRY[k].cls, REGISTRY[s].cls) for kind, (k, s) in TWIN_KINDS.items()}


def attention_names(layout: str | None = None) -> list[str]:
    """The registered names (of one ``layout`` if given), sorted."""
    return sorted(n for n, e in REGISTRY.items() if layout is None or e.layout == layout)


def resolve_name(name: str, layout: str | None = None, argument: str = "attention") -> str:
    """The registered name of ``name`` (an alias resolved); unknown -> one line naming
    ``argument`` and listing the registered names (of ``layout`` if given)."""
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in REGISTRY or (layout is not None and REGISTRY[key].layout != layout):
        known = attention_names(layout)
        aliases = sorted(a for a, n in ALIASES.items() if n in known)
        raise ValueError(f"{argument} {name!r} is not registered; registered names: {', '.join(known)}"
                         + (f" (aliases: {', '.join(aliases)})" if aliases else ""))
    return key


def build_attention(name: str, *args, krause: KrauseConfig | None = None, **shared) -> nn.Module:
    """The module registered as ``name`` (or an alias), built from ``args`` / ``shared`` (sizes,
    biases, dropouts, the grid of a vision layout) and the Krause settings ``krause``.

    A Krause module with ``krause=None`` takes its class preset; a baseline reads its knob
    from ``krause`` (or ``KrauseConfig()``'s default). Krause settings passed loose raise.
    A twin kind ("causal", "vision", "window") builds its Krause member when ``krause`` is
    given and its standard member when it is None.
    """
    loose = sorted(set(shared) & FIELDS)
    if loose:
        raise ValueError(f"{loose[0]} is a Krause setting: pass it inside krause=KrauseConfig(...), not loose")
    if krause is not None and not isinstance(krause, KrauseConfig):
        raise ValueError(f"krause must be a KrauseConfig or None, got {type(krause).__name__}")
    if name in TWIN_KINDS:
        name = TWIN_KINDS[name][krause is None]
    entry = REGISTRY[resolve_name(name)]
    shared = {k: v for k, v in shared.items() if k not in entry.ignores}
    if entry.takes_config:
        return entry.cls(*args, config=krause, **shared)
    settings = krause if krause is not None else KrauseConfig()
    return entry.cls(*args, **{f: getattr(settings, f) for f in entry.reads}, **shared)


def adapt_attention(name: str, attn: nn.Module, *args, krause: KrauseConfig | None = None, **shared) -> nn.Module:
    """The module registered as ``name`` built around an existing attention module's
    projections (its class's ``from_attention``): how a family swaps the attention of a
    model it did not write (timm's ViT / Swin) without naming a module class. ``krause=None``
    takes the class preset."""
    if krause is not None and not isinstance(krause, KrauseConfig):
        raise ValueError(f"krause must be a KrauseConfig or None, got {type(krause).__name__}")
    entry = REGISTRY[resolve_name(name)]
    if not hasattr(entry.cls, "from_attention"):
        adaptable = sorted(n for n, e in REGISTRY.items() if hasattr(e.cls, "from_attention"))
        raise ValueError(f"attention {name!r} cannot be built from an existing module; these can: "
                         f"{', '.join(adaptable)}")
    return entry.cls.from_attention(attn, *args, config=krause, **shared)


def attention_class(name: str) -> type[nn.Module]:
    """The module class registered as ``name`` (e.g. to find a family's Krause layers)."""
    return REGISTRY[resolve_name(name)].cls
