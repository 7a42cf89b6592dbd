"""LoRA with peft on Krause models: build, save, load, merge.

- :func:`lora_model` wraps a model with peft LoRA (r 16, alpha 32, dropout 0.1 by default)
  on q/k/v/o (of both branches for the gated mix) and the MLP's gate/up/down; on a Krause
  model sigma (``krause_sigma``, and the gated mix's ``krause_gate``) is a fully trainable
  ``modules_to_save``.
- :func:`save` writes the peft adapter (with sigma and gate) and ``krause_config.json``
  (the patch settings or the ``krause`` config entry, and a fingerprint of the base model).
- :func:`load` rebuilds that model on a base model: a patched adapter patches the base the
  same way; an adapter of an ``attn_implementation="krause"`` model needs a base built that
  way; then it loads the adapter. A base of another architecture or size is refused.
- merging: Krause-only models share nothing, so peft's own merge is right as it is. The
  gated mix's Krause projections share the pretrained weights, so :func:`merge_and_unload`
  (and peft's ``merge_and_unload`` / ``merge_adapter`` on a gated model made here) first
  gives them their own copy, so each branch merges its own LoRA delta; the result is still
  a Krause model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .attention import CONFIG_ENTRY, IMPLEMENTATION, krause_attention_modules
from .patch import (
    CONFIG_KEY,
    KRAUSE_PROJECTIONS,
    PROJECTIONS,
    KrausePatchConfig,
    is_patched,
    patch_model,
    patched_attention_modules,
    untie_krause_projections,
)

KRAUSE_CONFIG_FILE = "krause_config.json"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FINGERPRINT_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size",
)


def base_fingerprint(model: nn.Module) -> dict:
    """The architecture facts an adapter depends on."""
    config = model.config
    return {key: getattr(config, key, None) for key in FINGERPRINT_KEYS}


def patch_config_of(model: nn.Module) -> KrausePatchConfig | None:
    data = getattr(model.config, CONFIG_KEY, None)
    return KrausePatchConfig.from_dict(data) if data else None


def lora_config(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.1):
    """The paper's LoRA config for ``model`` (Krause or not)."""
    from peft import LoraConfig

    targets = list(PROJECTIONS) + list(MLP_PROJECTIONS)
    modules_to_save = None
    if is_patched(model):
        modules_to_save = ["krause_sigma"]  # fully trainable and saved with the adapter
        if patched_attention_modules(model):  # gated mix: the Krause branch's own projections and the gate
            targets += list(KRAUSE_PROJECTIONS)
            modules_to_save.insert(0, "krause_gate")
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        modules_to_save=modules_to_save, bias="none", task_type="CAUSAL_LM",
    )


def _untie_before_merge(peft_model) -> None:
    """Makes every merge path of a gated ``peft_model`` untie the shared projections first
    (models without shared weights keep peft's merge untouched)."""
    lora = peft_model.base_model
    if not patched_attention_modules(lora.model):
        return

    def wrap(method_name):
        original = getattr(lora, method_name)

        def untie_then(*args, **kwargs):
            untie_krause_projections(lora.model)
            return original(*args, **kwargs)

        untie_then.__doc__ = original.__doc__
        object.__setattr__(lora, method_name, untie_then)

    for name in ("merge_and_unload", "merge_adapter"):
        wrap(name)


def lora_model(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.1, config=None):
    """``peft.get_peft_model`` with :func:`lora_config` (or ``config``), merge-safe for shared weights."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config or lora_config(model, r, alpha, dropout))
    _untie_before_merge(peft_model)
    return peft_model


def save(peft_model, out_dir, **save_kwargs) -> Path:
    """Writes the adapter (with gate and sigma) and ``krause_config.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), **save_kwargs)
    write_krause_config(peft_model, out_dir)
    return out_dir


def write_krause_config(model: nn.Module, out_dir) -> Path:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patch = patch_config_of(base)
    registered = None
    if patch is None and krause_attention_modules(base):
        registered = getattr(base.config.get_text_config(decoder=True), CONFIG_ENTRY)
    data = {"patch": patch.to_dict() if patch else None, "krause": registered, "base": base_fingerprint(base)}
    path = Path(out_dir) / KRAUSE_CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_krause_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / KRAUSE_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"adapter_dir: {adapter_dir} has no {KRAUSE_CONFIG_FILE} (not saved by krause.hf.save)")
    return json.loads(path.read_text())


def check_base(base: nn.Module, saved_fingerprint: dict) -> None:
    found = base_fingerprint(base)
    diffs = [f"{k}: adapter {saved_fingerprint.get(k)!r} vs base {found[k]!r}"
             for k in FINGERPRINT_KEYS if k in saved_fingerprint and saved_fingerprint[k] != found[k]]
    if diffs:
        raise ValueError("base: the adapter was trained on another model (" + "; ".join(diffs) + ")")


def load(base: nn.Module, adapter_dir, is_trainable: bool = False):
    """Rebuilds the saved model on ``base``: for a patched adapter an unpatched causal LM (patched
    here with the saved settings); for an ``attn_implementation="krause"`` adapter a model built
    that way. Then loads the adapter (with sigma and gate)."""
    from peft import PeftModel

    data = read_krause_config(adapter_dir)
    check_base(base, data.get("base", {}))
    if data.get("patch"):
        if is_patched(base):
            raise ValueError("base: pass the unpatched pretrained model; load() applies the saved patch itself")
        patch_model(base, **data["patch"])
    elif data.get("krause"):
        if not krause_attention_modules(base):
            raise ValueError(
                f"base: the adapter was trained with attn_implementation={IMPLEMENTATION!r}; call krause.hf.register() "
                f"and load the base with attn_implementation={IMPLEMENTATION!r}"
            )
        found = getattr(base.config.get_text_config(decoder=True), CONFIG_ENTRY)
        if found != data["krause"]:
            raise ValueError(f"base: Krause settings {found} differ from the adapter's {data['krause']}")
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    _untie_before_merge(peft_model)
    return peft_model


def merge_and_unload(peft_model) -> nn.Module:
    """Merges every LoRA delta into its own branch's weights and returns the plain (still patched) model."""
    untie_krause_projections(peft_model.get_base_model())
    return peft_model.merge_and_unload()
