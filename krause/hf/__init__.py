"""transformers / peft integration: Krause attention in pretrained causal LMs.

    krause.hf.register()   # then AutoModelForCausalLM.from_pretrained(path, attn_implementation="krause")
    krause.hf.patch_model(model, mix="gated", window=32, top_k=16, sigma=5.5)   # in place, on a built model
    krause.hf.lora_model(model) / save(peft_model, dir) / load(base, dir) / merge_and_unload(peft_model)
    krause.hf.cache.KrauseCacheLayer  -- the Krause window inside generate()'s cache

transformers and peft are imported on first use, so ``import krause`` stays torch-only.
"""

from importlib import import_module

_EXPORTS = {
    "register": "attention",
    "krause_attention_modules": "attention",
    "krause_settings": "attention",
    "TESTED_ARCHITECTURES": "attention",
    "KrauseSigma": "attention",
    "patch_model": "patch",
    "is_patched": "patch",
    "KrausePatchConfig": "patch",
    "untie_krause_projections": "patch",
    "KrauseCacheLayer": "cache",
    "krause_cache_layer": "cache",
    "lora_config": "lora",
    "lora_model": "lora",
    "save": "lora",
    "load": "lora",
    "merge_and_unload": "lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
