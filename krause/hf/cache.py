"""Krause attention inside the cache that ``generate()`` and lm-eval create themselves.

The layers are those of the one decoding-cache contract, ``krause.cache``: a patched
attention module swaps its entry of transformers' cache for a
:class:`~krause.cache.GatedCacheLayer` on first use. transformers builds one cache layer
per decoder layer (``DynamicLayer``, ``StaticLayer``, ...) before the first forward, so
the composite keeps that layer as its *standard* part (the softmax branch keeps its full
cache, mask sizes and compile/offload behaviour) and adds a *Krause* part, a
:class:`~krause.cache.WindowCacheLayer` of the last W keys/values with their validity.
``reset``, ``reorder_cache`` (beam search), ``crop``, ``batch_repeat_interleave`` and
``batch_select_indices`` go to both parts.

How another model uses it (one call per attention forward)::

    from krause.hf.cache import krause_cache_layer

    layer = krause_cache_layer(past_key_values, self.layer_idx, window)  # None without a cache
    past = layer.krause_seen if layer is not None else 0               # tokens seen before this call
    ... # standard branch: past_key_values.update(k_std, v_std, layer_idx) as usual
    if layer is not None:
        k_kr, v_kr, valid = layer.update_krause(k_kr, v_kr, new_valid)  # window + new tokens
    out = krause.causal_krause_attention(q_kr, k_kr, v_kr, log_sigma, window, top_k,
                                         key_padding_mask=valid)        # queries end-aligned

``new_valid`` is the (B, Tq) validity of the new tokens (see
:func:`krause.hf.masks.new_token_validity`, which reads it from whatever mask the layer
received); ``None`` means no padding. A model whose layers have no standard branch
(Krause only) passes ``standalone=True``: the layer then also answers ``get_seq_length``
and ``get_mask_sizes`` itself, as a dynamic full-attention layer would, and its ``update`` (the
call a model makes through ``attn_implementation="krause"``) feeds the window.
"""

from __future__ import annotations

from transformers.cache_utils import Cache

from ..cache import GatedCacheLayer

__all__ = ["KrauseCacheLayer", "krause_cache_layer"]

KrauseCacheLayer = GatedCacheLayer  # the public name krause.hf exports


def krause_cache_layer(
    past_key_values: Cache | None, layer_idx: int, window: int, *, standalone: bool = False
) -> GatedCacheLayer | None:
    """The :class:`~krause.cache.GatedCacheLayer` at ``layer_idx`` of ``past_key_values``, installed on first use.

    Wraps the layer transformers created there (or one its ``layer_class_to_replicate``
    would create). Returns None when there is no cache. Raises if the existing layer already
    holds tokens (its Krause history would be missing) or belongs to another window size.
    """
    if past_key_values is None:
        return None
    if not isinstance(past_key_values, Cache):
        raise ValueError(
            f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__} "
            "(legacy tuple caches cannot hold the Krause branch's window)"
        )
    layers = past_key_values.layers
    if past_key_values.layer_class_to_replicate is not None:
        while len(layers) <= layer_idx:
            layers.append(past_key_values.layer_class_to_replicate())
    if layer_idx >= len(layers):
        raise ValueError(f"layer_idx {layer_idx} is out of range for a cache of {len(layers)} layers")
    layer = layers[layer_idx]
    if isinstance(layer, GatedCacheLayer):
        if layer.krause.window != window or layer.standalone != standalone:
            raise ValueError(
                f"cache layer {layer_idx} was made for window {layer.krause.window} (standalone={layer.standalone}), "
                f"not window {window} (standalone={standalone})"
            )
        return layer
    if layer.get_seq_length() > 0:
        raise ValueError(
            f"cache layer {layer_idx} already holds {layer.get_seq_length()} tokens without the Krause branch's "
            "keys; pass a fresh cache (or none) to a patched model"
        )
    layer = GatedCacheLayer(krause=window, standalone=True) if standalone else GatedCacheLayer(layer, window)
    layers[layer_idx] = layer
    return layer
