"""``attn_implementation="krause"``: Krause attention in any transformers causal LM whose
attention goes through transformers' ``AttentionInterface``.

    import krause.hf
    krause.hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="krause")

The attention function receives q, k, v *after* the model's own projections, q/k norms
(Qwen3, OLMo 2) and RoPE, so it is right for every such architecture by construction.
:func:`register` adds

- ``"krause"`` to ``AttentionInterface`` (:func:`krause_attention_forward`) and to
  ``AttentionMaskInterface`` (:func:`krause_padding_mask`: the layers get the 2-D padding
  mask, the only fact the causal-window op needs from it);
- a torch module-registration hook. When a causal attention module of a model built with
  ``attn_implementation="krause"`` is attached to its decoder layer it gets ``krause_sigma``
  (:class:`KrauseSigma`, per-head log sigma in fp32: a real parameter, in the state dict,
  saved and reloaded, trained by the optimiser and by peft's ``modules_to_save``) and a
  forward pre-hook that puts a standalone :class:`~krause.hf.cache.KrauseCacheLayer` (the
  last W keys/values) at its index of whatever cache it is handed, so decoding holds O(W)
  per layer. The enclosing model's ``_init_weights`` learns sigma's initial value (it is
  missing from a plain pretrained checkpoint).

Settings come from the ``krause`` entry of the model's (text) config, a dict with
``window``, ``top_k``, ``sigma``, ``impl`` (defaults: :class:`krause.nn.KrauseConfig`) and
``layers`` (indices of the Krause layers; None = all). The resolved entry is written back,
so ``save_pretrained`` keeps it and ``from_pretrained`` reads it. Layers left out run the
model's own eager attention. A layer with its own sliding window S (Gemma 2/3, Qwen2 /
Mistral / Phi-3 with a window) keeps it: its Krause window is min(W, S). Logit soft-capping
and attention dropout act on softmax logits/weights and have no Krause counterpart.

The paper's gated mixture is not registered ("krause_mix"): it needs a second set of
q/k/v/o projections and a gate on both branches' o_proj outputs, while the interface hands
one q/k/v and returns before o_proj. It stays in :func:`krause.hf.patch_model` (mix="gated").
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch import nn

from ..dense import causal_candidates
from ..nn.config import KrauseConfig
from ..ops import causal_krause_attention
from .cache import krause_cache_layer
from .masks import attendable_keys

IMPLEMENTATION = "krause"
CONFIG_ENTRY = "krause"  # the settings, on the model's (text) config
OP_SETTINGS = ("window", "top_k", "sigma", "impl")
SETTINGS = OP_SETTINGS + ("layers",)
# model_type of the tiny random configs tests/test_hf_attention.py builds (lora_llms/README.md lists them)
TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3")

_hook_handle = None


class KrauseSigma(nn.Module):
    """Per-head log sigma of one Krause layer (fp32 whatever the model dtype: lr-sized steps
    on ln 5.5 ~ 1.7 vanish in bf16)."""

    def __init__(self, num_heads: int, sigma: float, device=None):
        super().__init__()
        self.initial_sigma = float(sigma)
        self.log_sigma = nn.Parameter(torch.full((num_heads,), math.log(sigma), dtype=torch.float32, device=device))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_sigma.fill_(math.log(self.initial_sigma))

    def forward(self) -> torch.Tensor:
        return self.log_sigma


def krause_settings(config) -> dict:
    """The resolved ``krause`` entry of ``config`` (defaults filled in, checked)."""
    raw = getattr(config, CONFIG_ENTRY, None)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config.{CONFIG_ENTRY} must be a dict of Krause settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise ValueError(f"config.{CONFIG_ENTRY}: {unknown[0]!r} is not a setting; known: {list(SETTINGS)}")
    op = KrauseConfig().replace(**{k: raw[k] for k in OP_SETTINGS if k in raw})
    if op.top_k > op.window:
        raise ValueError(
            f"config.{CONFIG_ENTRY}: top_k {op.top_k} exceeds window {op.window} "
            "(a query has at most window candidates)"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    layers = raw.get("layers")
    if layers is not None:
        n = config.num_hidden_layers
        if (not isinstance(layers, (list, tuple)) or len(set(layers)) != len(layers)
                or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers)):
            raise ValueError(
                f"config.{CONFIG_ENTRY}: layers must be distinct layer indices in [0, {n}), got {layers!r}")
        layers = sorted(layers)
    return {"window": op.window, "top_k": op.top_k, "sigma": op.sigma, "impl": op.impl, "layers": layers}


def own_sliding_window(module) -> int | None:
    """The sliding window the model itself gives this attention layer (None: full attention)."""
    if hasattr(module, "sliding_window"):  # Gemma 2/3, Qwen2/3: per layer
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)  # Mistral, Phi-3: every layer


def _configured_for_krause(module) -> bool:
    # Reads the instance dict only: the registration hook sees every submodule torch registers
    # anywhere, some half-built with a __getattr__ that recurses (peft's wrappers).
    config = module.__dict__.get("config")
    return config is not None and getattr(config, "_attn_implementation", None) == IMPLEMENTATION


def is_krause_candidate(module) -> bool:
    """A causal self-attention module of a model configured with attn_implementation="krause"."""
    attrs = module.__dict__
    return (
        _configured_for_krause(module)
        and isinstance(attrs.get("layer_idx"), int)
        and attrs.get("is_causal", getattr(type(module), "is_causal", False)) is True
        and "krause_window" not in attrs
    )


def enable_krause(module, settings: dict) -> None:
    """Gives one attention module its Krause settings, sigma and cache hook (or marks it standard)."""
    if settings["layers"] is not None and module.layer_idx not in settings["layers"]:
        module.krause_window = None  # this layer keeps the model's own attention
        return
    own = own_sliding_window(module)
    module.krause_window = settings["window"] if own is None else min(settings["window"], own)
    module.krause_top_k = min(settings["top_k"], module.krause_window)
    module.krause_impl = settings["impl"]
    param = next(module.parameters(), None)
    module.krause_sigma = KrauseSigma(module.config.num_attention_heads, settings["sigma"],
                                      device=None if param is None else param.device)
    module.register_forward_pre_hook(_install_window_cache, with_kwargs=True)


def krause_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules running Krause attention (registered path), in order."""
    return [m for m in model.modules() if m.__dict__.get("krause_window") is not None and hasattr(m, "krause_sigma")]


def _install_window_cache(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if cache is not None:
        krause_cache_layer(cache, module.layer_idx, module.krause_window, standalone=True)


def _teach_sigma_init(model) -> None:
    """Makes ``model._init_weights`` set a sigma missing from the checkpoint to its initial value
    (from_pretrained materialises missing parameters with torch.empty, then calls it)."""
    if "_init_weights" in model.__dict__:
        return
    init_others = model._init_weights

    def init_weights(module):
        if isinstance(module, KrauseSigma):
            if not getattr(module.log_sigma, "_is_hf_initialized", False):
                module.reset_parameters()
        else:
            init_others(module)

    model._init_weights = init_weights


def _on_module_registered(parent, name, child):
    """torch's global registration hook: sets up Krause attention modules as models are built."""
    if child is None:
        return None
    if is_krause_candidate(child):
        settings = krause_settings(child.config)
        setattr(child.config, CONFIG_ENTRY, settings)  # resolved, so save_pretrained keeps it
        enable_krause(child, settings)
        return None
    if _configured_for_krause(parent) and hasattr(type(parent), "_init_weights") and any(
            isinstance(m, KrauseSigma) for m in child.modules()):
        _teach_sigma_init(parent)
    return None


def krause_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                        attention_mask=None, **kwargs):
    """The "krause" entry of AttentionMaskInterface: the (B, L) bool validity of every token
    so far (True = real), or None without padding. The causal window is the op's own."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def key_validity(attention_mask, batch_size: int, num_keys: int):
    """(B, num_keys) validity of the keys an attention function received (the last num_keys
    positions), from the mask handed to it, or None (no padding)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask of type {type(attention_mask).__name__} is not supported by Krause attention")
    keys = attendable_keys(attention_mask)
    if keys.shape[-1] < num_keys:
        raise ValueError(f"attention_mask covers {keys.shape[-1]} positions, fewer than the {num_keys} keys")
    valid = keys[:, keys.shape[-1] - num_keys:]
    if valid.shape[0] != batch_size:
        if valid.shape[0] != 1:
            raise ValueError(f"attention_mask batch size {valid.shape[0]} does not match the input's {batch_size}")
        valid = valid.expand(batch_size, num_keys)
    return valid


def _standard_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """A layer left out of ``layers``: the model's own eager attention with a causal mask built
    from the padding mask (and the layer's sliding window)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__}: no eager_attention_forward next to it to run a non-Krause layer")
    tq, tk = query.shape[-2], key.shape[-2]
    pos = torch.arange(tk - tq, tk, device=query.device)[:, None]
    j = torch.arange(tk, device=query.device)[None, :]
    allowed = j <= pos
    window = kwargs.get("sliding_window")
    if window is not None:
        allowed = allowed & (j > pos - window)
    allowed = allowed[None, None]
    valid = key_validity(attention_mask, query.shape[0], tk)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, additive, scaling=scaling, dropout=dropout, **kwargs)


def krause_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "krause" entry of AttentionInterface: (B, H, Tq, D) queries, (B, Hkv, Tk, D) keys and
    values (the last Tk positions, queries end-aligned) -> ((B, Tq, H, D), weights or None).

    Weights (dense, fp32) are returned only while ``module.krause_return_weights`` is set
    (attention analysis)."""
    if "krause_window" not in module.__dict__:
        raise ValueError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no Krause settings: "
            "the model was built before krause.hf.register() was called; call it, then build or load the model with "
            "attn_implementation='krause' (or switch a built one with krause.hf.patch_model(model, mix='krause'))"
        )
    window = module.krause_window
    if window is None:
        return _standard_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    valid = key_validity(attention_mask, query.shape[0], key.shape[-2])
    log_sigma = module.krause_sigma()
    out = causal_krause_attention(query, key, value, log_sigma, window, module.krause_top_k,
                                  key_padding_mask=valid, impl=module.krause_impl)
    weights = None
    if getattr(module, "krause_return_weights", False):
        from ..nn import krause_attention_probs

        candidates = causal_candidates(query.shape[-2], key.shape[-2], window, valid, device=query.device)
        weights = krause_attention_probs(query, key, log_sigma, candidates, module.krause_top_k)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Registers ``attn_implementation="krause"`` with transformers (idempotent). Call it before
    building or loading a model with it."""
    global _hook_handle
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, krause_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, krause_padding_mask)
    if _hook_handle is None:
        _hook_handle = torch.nn.modules.module.register_module_module_registration_hook(_on_module_registered)


def use_krause_attention(model, **settings):
    """Switches a built model to Krause attention in place (settings as the config entry's);
    returns it. The path of ``patch_model(mix="krause")``."""
    register()
    text_config = model.config.get_text_config(decoder=True)
    if krause_attention_modules(model):
        raise ValueError("model: it already runs Krause attention")
    previous_impl = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    candidates = [m for m in model.modules() if is_krause_candidate(m)]
    try:
        if text_config._attn_implementation != IMPLEMENTATION or not candidates:
            raise ValueError(
                f"model: {type(model).__name__} (model_type {getattr(text_config, 'model_type', None)!r}) does not run "
                f"its attention through transformers' AttentionInterface; tested: {', '.join(TESTED_ARCHITECTURES)}"
            )
        resolved = krause_settings(_with_entry(text_config, settings))
    except ValueError:
        if model.config._attn_implementation == IMPLEMENTATION:
            model.set_attn_implementation(previous_impl)
        raise
    setattr(text_config, CONFIG_ENTRY, resolved)
    for module in candidates:
        enable_krause(module, resolved)
    return model


def _with_entry(config, entry: dict):
    """A shallow copy of ``config`` carrying ``entry`` as its Krause settings (to check them first)."""
    probe = copy.copy(config)
    setattr(probe, CONFIG_ENTRY, entry)
    return probe
