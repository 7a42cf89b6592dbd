"""Model presets and ``build_model``.

"100m": the paper's model (dim 768, 8 layers, 12 heads, FFN 2048, 1024 positions).
"200m": not in the first release; chosen here as dim 1024, 10 layers, 16 heads (head
dim 64 as in 100m), FFN 3072 (3x dim; 100m has 2.67x), 1024 positions: about
200M parameters with the gated mix (exact counts: ``python -m language_models_100m.params``).
"tiny": a few-thousand-parameter model for tests and smoke runs.

A preset's ``krause`` entry overrides fields of the family's ``KrauseConfig``
(``model.KRAUSE_PRESET``) by their ``KrauseConfig`` names, visibly; a name that is not a
``KrauseConfig`` field fails naming it.
"""

from __future__ import annotations

from huggingface_hub.errors import StrictDataclassClassValidationError

from krause.nn import KrauseConfig, resolve_name

from .model import ATTENTIONS, KRAUSE_FIELDS, KRAUSE_PRESET, KrauseLMConfig, KrauseLMForCausalLM

PRESETS: dict[str, dict] = {
    "100m": dict(n_embd=768, n_layer=8, n_head=12, n_inner=2048, n_positions=1024),
    "200m": dict(n_embd=1024, n_layer=10, n_head=16, n_inner=3072, n_positions=1024),
    "tiny": dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=64, krause=dict(window=8, top_k=4)),
}


def _flatten_krause(fields: dict) -> None:
    """Replaces a ``krause`` entry (a dict of KrauseConfig overrides or a KrauseConfig) by the
    flat KrauseLMConfig fields it sets."""
    krause = fields.pop("krause", None)
    if krause is None:
        return
    if isinstance(krause, KrauseConfig):
        given = krause.to_dict()
    elif isinstance(krause, dict):
        KRAUSE_PRESET.replace(**krause)  # an unknown or bad field fails here, by its name
        given = krause
    else:
        raise ValueError(f"krause must be a dict of KrauseConfig fields or a KrauseConfig, got {krause!r}")
    unused = sorted(f for f in given if f not in KRAUSE_FIELDS and given[f] != getattr(KRAUSE_PRESET, f))
    if unused:
        raise ValueError(f"krause.{unused[0]}: the language models do not read it (they read {sorted(KRAUSE_FIELDS)})")
    fields.update({KRAUSE_FIELDS[f]: v for f, v in given.items() if f in KRAUSE_FIELDS})


def model_config(config="100m", attention: str | None = None, **overrides) -> KrauseLMConfig:
    """A ``KrauseLMConfig`` from a preset name (or a config / dict) with ``attention`` (None:
    the config's own, "gated" for a preset) and overrides (``krause=dict(window=...)``
    overrides Krause settings by their KrauseConfig names)."""
    if isinstance(config, KrauseLMConfig):
        fields = config.to_dict()
    elif isinstance(config, dict):
        fields = dict(config)
    elif isinstance(config, str) and config in PRESETS:
        fields = dict(PRESETS[config])
    else:
        raise ValueError(f"config must be one of {sorted(PRESETS)}, a KrauseLMConfig or a dict, got {config!r}")
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    if attention is None:  # build_model(cfg) keeps cfg's attention (it once silently became "gated")
        attention = fields.get("attention", "gated")
    if attention not in ATTENTIONS:
        resolve_name(attention, "causal")  # a registry name passes; else the registered names
    _flatten_krause(fields)
    overrides = dict(overrides)
    _flatten_krause(overrides)
    fields.update(overrides, attention=attention)
    try:
        return KrauseLMConfig(**fields)
    except StrictDataclassClassValidationError as e:  # huggingface_hub's multi-line wrapper -> its one line
        raise ValueError(str(e.__cause__ or e).strip().splitlines()[-1].strip()) from None


def build_model(config="100m", attention: str | None = None, **overrides) -> KrauseLMForCausalLM:
    """A freshly initialised causal LM: ``config`` in {"100m", "200m", "tiny"}, a
    ``KrauseLMConfig`` or a dict of its fields; ``attention`` in ``ATTENTIONS`` (or any
    causal name of the attention registry), None for the config's own ("gated" for a preset)."""
    return KrauseLMForCausalLM(model_config(config, attention, **overrides))
