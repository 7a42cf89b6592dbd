"""LoRA with peft on Krause models: build, save, load, merge.

- :func:`lora_model` wraps a model with peft LoRA (r 16, alpha 32, dropout 0.1 by default)
  on q/k/v/o (of both branches for the gated mix) and the MLP's gate/up/down; on a Krause
  model sigma (``krause_sigma``, and the gated mix's ``krause_gate``) is a fully trainable
  ``modules_to_save``.
- :func:`save` writes the peft adapter (with sigma and gate) and ``krause_config.json``
  (the patch settings or the ``krause`` config entry, and a fingerprint of the base model),
  then seals the folder (``krause_integrity.json``: the size and CRC-32 of every file).
- :func:`load` first checks that seal (:func:`verify_adapter`: a damaged file is refused in one
  line naming it; an unsealed adapter, from before adapters were sealed, is refused with the
  command that seals it: ``python -m krause.hf seal DIR``), then rebuilds that model on a base
  model: a patched adapter patches the base the same way; an adapter of an
  ``attn_implementation="krause"`` model needs a base built that way; then it loads the
  adapter. A base of another architecture or size is refused.
- merging: Krause-only models share nothing, so peft's own merge is right as it is. The
  gated mix's Krause projections share the pretrained weights, so :func:`merge_and_unload`
  (and peft's ``merge_and_unload`` / ``merge_adapter`` on a gated model made here) first
  gives them their own copy, so each branch merges its own LoRA delta; the result is still
  a Krause model.
"""

from __future__ import annotations

import json
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
    """Writes the adapter (with gate and sigma) and ``krause_config.json`` to ``out_dir``, then its
    integrity record (last: an adapter without one is an unfinished save)."""
    from ..training.checkpointer import seal_directory

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), **save_kwargs)
    write_krause_config(peft_model, out_dir)
    seal_directory(out_dir)
    return out_dir


def seal_command(adapter_dir) -> str:
    return f"python -m krause.hf seal {adapter_dir}"


def verify_adapter(adapter_dir) -> None:
    """The one check of every reader of an adapter: the folder exists, carries ``krause_config.json``
    and its integrity record, and every file has its recorded size and CRC-32 (one line naming the
    file otherwise: CorruptCheckpointError, or ValueError for a folder that is not an adapter)."""
    from ..training.checkpointer import SEAL, verify_sealed
    from ..training.errors import CorruptCheckpointError

    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ValueError(f"adapter: {adapter_dir} is not a directory")
    read_krause_config(folder)
    if not (folder / SEAL).is_file():
        raise CorruptCheckpointError(
            f"adapter: {adapter_dir} has no {SEAL} (saved before krause.hf sealed adapters, or its save did not "
            f"finish); if you trust its files, seal them with `{seal_command(adapter_dir)}` and load it again")
    verify_sealed(folder)


def write_krause_config(model: nn.Module, out_dir) -> Path:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patch = patch_config_of(base)
    registered = None
    if patch is None and krause_attention_modules(base):
        registered = getattr(base.config.get_text_config(decoder=True), CONFIG_ENTRY)
    data = {"patch": patch.to_dict() if patch else None, "krause": registered, "base": base_fingerprint(base)}
    path = Path(out_dir) / KRAUSE_CONFIG_FILE
    from ..training.run_dir import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def read_krause_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / KRAUSE_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"adapter: {adapter_dir} has no {KRAUSE_CONFIG_FILE} (not saved by krause.hf.save)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"adapter: {path} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"adapter: {path} is not a krause.hf adapter config")
    return data


def check_base(base: nn.Module, saved_fingerprint: dict) -> None:
    found = base_fingerprint(base)
    diffs = [f"{k}: adapter {saved_fingerprint.get(k)!r} vs base {found[k]!r}"
             for k in FINGERPRINT_KEYS if k in saved_fingerprint and saved_fingerprint[k] != found[k]]
    if diffs:
        raise ValueError("base: the adapter was trained on another model (" + "; ".join(diffs) + ")")


def load(base: nn.Module, adapter_dir, is_trainable: bool = False, *, verify: bool = True, impl: str | None = None):
    """Rebuilds the saved model on ``base``: for a patched adapter an unpatched causal LM (patched
    here with the saved settings; ``impl`` runs the Krause op with another implementation); for
    an ``attn_implementation="krause"`` adapter a model built that way. Then loads the adapter
    (with sigma and gate). ``verify=False`` only where the caller ran :func:`verify_adapter`."""
    from peft import PeftModel

    if verify:
        verify_adapter(adapter_dir)
    data = read_krause_config(adapter_dir)
    check_base(base, data.get("base", {}))
    if data.get("patch"):
        if is_patched(base):
            raise ValueError("base: pass the unpatched pretrained model; load() applies the saved patch itself")
        patch_model(base, **{**data["patch"], **({"impl": impl} if impl else {})})
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
