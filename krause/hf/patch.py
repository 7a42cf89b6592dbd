"""``patch_model``: Krause attention in a built transformers causal LM, in place.

- ``mix="krause"`` (Krause attention only): a thin wrapper over the registered path,
  ``attn_implementation="krause"`` (:mod:`krause.hf.attention`): any architecture whose
  attention goes through transformers' ``AttentionInterface``; q/k/v are the model's own.
- ``mix="gated"`` (the paper's gated mixture): keeps each pretrained attention module,
  unchanged, as the standard branch and adds a Krause branch with its own q/k/v/o. The
  interface cannot supply a second set of projections, so this mix re-creates the q/k
  path of the architectures in :data:`GATED_ARCHITECTURES` (Llama and Qwen2: linear
  projections, RoPE, no q/k norm). The module's class becomes a subclass
  (``KrauseLlamaAttention`` / ``KrauseQwen2Attention``) whose forward runs the original
  forward and then the Krause branch:

  - ``krause_q_proj`` .. ``krause_o_proj``: Linear layers sharing the pretrained q/k/v/o
    weight (and Qwen2's bias) Parameters, so they start as exact copies at no memory cost;
    LoRA then adapts each branch separately (``krause.hf.lora`` unties them before a merge).
    While they share, the Krause branch reuses the standard branch's base q/k/v products of
    the same hidden states (:class:`SharedLinear`): one read of those weights a step, one
    matmul (and one backward) each, the paper's LoRA recipe (a frozen shared base, two adapters);
  - the same RoPE (cos, sin) the model hands every layer, the same grouped-query heads;
  - ``krause.causal_krause_attention`` over the last ``window`` keys (queries end-aligned to
    the keys the :class:`~krause.hf.cache.KrauseCacheLayer` keeps), padding from the layer's mask;
  - ``krause_sigma`` (per-head log sigma) and ``krause_gate`` (Linear(2d -> 2), starting at
    ``gate_init`` on the standard branch), both fp32, in their own submodules so peft can
    train and save them (``modules_to_save``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn.config import check_sigma
from ..nn.gated import gated_mix, init_gate
from ..ops import causal_krause_attention
from .attention import KrauseSigma, use_krause_attention
from .cache import krause_cache_layer
from .masks import new_token_validity

MIXES = ("gated", "krause")
# model_type -> (causal LM class, attention class) of the architectures the gated mix supports
GATED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "transformers.models.llama.modeling_llama.LlamaAttention"),
    "qwen2": ("Qwen2ForCausalLM", "transformers.models.qwen2.modeling_qwen2.Qwen2Attention"),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
KRAUSE_PROJECTIONS = tuple(f"krause_{name}" for name in PROJECTIONS)
CONFIG_KEY = "krause_patch"  # the patch settings, recorded on model.config


@dataclass(frozen=True)
class KrausePatchConfig:
    """The settings ``patch_model`` applied (saved as ``krause_config.json`` next to adapters)."""

    mix: str = "gated"
    window: int = 32
    top_k: int = 16
    sigma: float = 5.5
    gate_init: float = 0.8
    impl: str = "auto"

    def __post_init__(self):
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        for name in ("window", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        object.__setattr__(self, "sigma", check_sigma(self.sigma))  # the project's one sigma check
        if not isinstance(self.gate_init, (int, float)) or not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init must be in (0, 1), got {self.gate_init!r}")
        from ..dispatch import IMPLS

        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KrausePatchConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class KrauseGate(nn.Module):
    """Linear(2d -> 2) gate logits, kept in fp32 (inputs are cast to it)."""

    def __init__(self, hidden_size: int, gate_init: float, device=None):
        super().__init__()
        self.proj = nn.Linear(2 * hidden_size, 2, dtype=torch.float32, device=device)
        init_gate(self.proj, gate_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        dtype = self.proj.weight.dtype
        return self.proj(features if features.dtype == dtype else features.to(dtype))


class ProjectionMemo:
    """The standard branch's base q/k/v products during one forward of a gated attention module
    (``outputs`` is None outside it), for the Krause branch's :class:`SharedLinear` layers."""

    def __init__(self):
        self.outputs: dict | None = None

    def __deepcopy__(self, memo):  # a copied model records its own products
        return ProjectionMemo()

    def __reduce__(self):  # a pickled model too (and no recorded tensor is written)
        return ProjectionMemo, ()


def _remember_product(module, args, output):
    """Forward hook of a standard-branch base projection: records its output while recording
    (not an inference-mode tensor: it has no version counter to tell an in-place change)."""
    memo = module.__dict__.get("_krause_memo")
    if memo is not None and memo.outputs is not None and args and not output.is_inference():
        memo.outputs[(id(module.weight), id(module.bias))] = (args[0], output, output._version)


class SharedLinear(nn.Linear):
    """A Linear holding another Linear's weight/bias Parameters (no copy). Where that Linear has
    just computed the product of the same input tensor in this module's forward (and nothing
    changed it in place since), it returns that product instead of computing it again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memo = self.__dict__.get("_krause_memo")
        if memo is not None and memo.outputs is not None:
            hit = memo.outputs.get((id(self.weight), id(self.bias)))
            if hit is not None and hit[0] is x and hit[1]._version == hit[2]:
                return hit[1]
        return super().forward(x)


class KrauseAttentionMixin:
    """Forward of a gated-mix attention module (mixed into the model's own attention class)."""

    krause_config: KrausePatchConfig

    def krause_projections(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, name) for name in KRAUSE_PROJECTIONS)

    def krause_branch(self, hidden_states, position_embeddings, cache_layer, valid_new, return_probs=False):
        """(B, T, d) Krause-branch output (and with ``return_probs`` the queries/keys for analysis)."""
        cfg = self.krause_config
        q_proj, k_proj, v_proj, o_proj = self.krause_projections()
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._krause_rope(q, k, cos, sin)
        if cache_layer is not None:
            k, v, key_padding_mask = cache_layer.update_krause(k, v, valid_new)
        else:
            key_padding_mask = valid_new
        log_sigma = self.krause_sigma()
        out = causal_krause_attention(
            q, k, v, log_sigma, cfg.window, cfg.top_k, key_padding_mask=key_padding_mask, impl=cfg.impl
        )
        out = o_proj(out.transpose(1, 2).reshape(*input_shape, -1).contiguous())
        if return_probs:
            return out, (q, k, log_sigma, key_padding_mask)
        return out

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cfg = self.krause_config
        batch, length = hidden_states.shape[:2]
        cache_layer = krause_cache_layer(past_key_values, self.layer_idx, cfg.window)
        valid_new = None  # no mask, no padding (sdpa's decoding steps)
        if attention_mask is not None:
            past, kv_offset = 0, 0
            if cache_layer is not None:
                past = cache_layer.krause_seen
                kv_offset = cache_layer.get_mask_sizes(length)[1]
            valid_new = new_token_validity(attention_mask, batch, length, past, kv_offset)
        memo = self.__dict__.get("_krause_memo")
        recording = memo is not None and not torch.compiler.is_compiling()
        if recording:
            memo.outputs = {}
        try:
            out_std, attn_weights = super().forward(
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
            out_krause = self.krause_branch(hidden_states, position_embeddings, cache_layer, valid_new)
        finally:
            if recording:
                memo.outputs = None
        return gated_mix(out_std, out_krause, self.krause_gate), attn_weights


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        rope = getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb")
        _PATCHED_CLASSES[cls] = type(
            f"Krause{cls.__name__}",
            (KrauseAttentionMixin, cls),
            {"_krause_rope": staticmethod(rope), "__module__": __name__},
        )
    return _PATCHED_CLASSES[cls]


def __getattr__(name: str) -> type:
    """The gated classes by name (``KrauseLlamaAttention``, ...): they are made on first patch,
    and pickle (``torch.save(model)``) looks them up here in a process that has not made them."""
    for _, path in GATED_ARCHITECTURES.values():
        if name == f"Krause{path.rpartition('.')[2]}":
            return _patched_class(_class_at(path))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _class_at(path: str) -> type:
    """The class at a dotted path of :data:`GATED_ARCHITECTURES` (imported on demand)."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _gated_attention_class(model) -> type:
    """The attention class of ``model`` if the gated mix supports its architecture (else ValueError)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = GATED_ARCHITECTURES.get(model_type)
    if names is None or type(model).__name__ != names[0]:
        supported = ", ".join(lm for lm, _ in GATED_ARCHITECTURES.values())
        raise ValueError(
            f"model: the gated mix supports {supported}, got {type(model).__name__} (model_type {model_type!r}); "
            "mix='krause' (attn_implementation='krause') covers any architecture using transformers' AttentionInterface"
        )
    return _class_at(names[1])


def _shared_linear(source: nn.Linear, memo: ProjectionMemo | None = None) -> SharedLinear:
    """A Linear holding ``source``'s own weight/bias Parameters (no copy, no new bias); with
    ``memo``, it reuses the product ``source`` computed for the same input (``source`` records it)."""
    linear = SharedLinear(source.in_features, source.out_features, bias=source.bias is not None, device="meta")
    linear.weight = source.weight
    if source.bias is not None:
        linear.bias = source.bias
    if memo is not None:
        source._krause_memo = linear._krause_memo = memo
        source.register_forward_hook(_remember_product)
    return linear


def is_patched(model: nn.Module) -> bool:
    """Does ``model`` run Krause attention (gated mix, patch_model(mix="krause") or attn_implementation="krause")."""
    return any(isinstance(m, KrauseSigma) for m in model.modules())


def patched_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The gated-mix attention modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, KrauseAttentionMixin)]


def patch_model(
    model, *, mix: str = "gated", window: int = 32, top_k: int = 16, sigma: float = 5.5,
    gate_init: float = 0.8, impl: str = "auto",
):
    """Turns, in place, every attention layer of ``model`` into Krause attention; returns it.

    Args:
        mix: "gated" (the pretrained attention gated with a new Krause branch; Llama and
            Qwen2) or "krause" (Krause attention only, on the model's own q/k/v: any
            architecture using transformers' AttentionInterface, via attn_implementation="krause").
        window, top_k, sigma: the Krause attention's causal window W, kept neighbours and
            initial sigma (per head).
        gate_init: the gate's initial weight on the standard branch (gated mix).
        impl: the core op's implementation ("auto", "fast", "reference", "flex", "triton").
    """
    cfg = KrausePatchConfig(mix=mix, window=window, top_k=top_k, sigma=sigma, gate_init=gate_init, impl=impl)
    if is_patched(model) or getattr(getattr(model, "config", None), CONFIG_KEY, None):
        raise ValueError("model: it is already patched with Krause attention; patch a fresh model")
    if mix == "krause":
        use_krause_attention(model, window=window, top_k=top_k, sigma=sigma, impl=impl)
        setattr(model.config, CONFIG_KEY, cfg.to_dict())
        return model
    attention_class = _gated_attention_class(model)
    if getattr(model.config, "_attn_implementation", None) == "flex_attention":
        raise ValueError(
            "model: attn_implementation 'flex_attention' hands layers a BlockMask the Krause branch cannot read; "
            "load the model with 'sdpa', 'eager' or 'flash_attention_2'"
        )
    text_config = model.config
    attentions = [m for m in model.modules() if isinstance(m, attention_class)]
    if len(attentions) != text_config.num_hidden_layers:
        raise ValueError(
            f"model: found {len(attentions)} attention modules for {text_config.num_hidden_layers} layers"
        )
    for attn in attentions:
        device = attn.q_proj.weight.device
        attn.__class__ = _patched_class(type(attn))
        attn.krause_config = cfg
        attn._krause_memo = ProjectionMemo()
        for name in PROJECTIONS:  # o_proj's inputs differ between the branches: nothing to reuse
            memo = attn._krause_memo if name != "o_proj" else None
            setattr(attn, f"krause_{name}", _shared_linear(getattr(attn, name), memo))
        attn.krause_gate = KrauseGate(text_config.hidden_size, gate_init, device=device)
        attn.krause_sigma = KrauseSigma(text_config.num_attention_heads, sigma, device=device)
    setattr(model.config, CONFIG_KEY, cfg.to_dict())
    return model


def untie_krause_projections(model: nn.Module) -> int:
    """Gives every Krause projection of a gated model its own copy of the weights it shares with
    the standard branch (before a LoRA merge writes into them); returns how many tensors were copied."""
    copied = 0
    for attn in patched_attention_modules(model):
        for name in PROJECTIONS:
            std = getattr(attn, name)
            kr = getattr(attn, f"krause_{name}")
            std_base = std.get_base_layer() if hasattr(std, "get_base_layer") else std
            kr_base = kr.get_base_layer() if hasattr(kr, "get_base_layer") else kr
            for pname in ("weight", "bias"):
                p = getattr(kr_base, pname, None)
                if p is not None and p.data_ptr() == getattr(std_base, pname).data_ptr():
                    setattr(kr_base, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                    copied += 1
    return copied
