"""Krause attention inside the cache that ``generate()`` and lm-eval create themselves.

A causal-window Krause layer needs only the last W keys/values of its own projections.
transformers builds one cache layer per decoder layer (``DynamicLayer``, ``StaticLayer``,
``DynamicSlidingWindowLayer``, ...) before the first forward, so a Krause model cannot
pick the layer class itself. Instead each Krause attention module swaps its entry for a
:class:`KrauseCacheLayer` on first use: a composite that keeps whatever layer transformers
made as the *standard* part (so the softmax branch keeps its full cache, its mask sizes
and its compile/offload behaviour) and adds a *Krause* part — a window of the last W
keys/values with a per-slot validity flag (False = padding). ``reset``, ``reorder_cache``
(beam search), ``crop``, ``batch_repeat_interleave`` and ``batch_select_indices`` go to
both parts, so every generation mode keeps the two consistent.

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

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

__all__ = ["KrauseCacheLayer", "KrauseWindow", "krause_cache_layer"]


class KrauseWindow:
    """The last ``window`` keys/values (B, Hkv, <=W, D) of one Krause layer and their validity (B, <=W).

    Plain tensors trimmed after each update rather than a ring buffer: beam-search reorders
    and batch selections then stay one ``index_select``; the copy per step is O(W), not O(T).
    """

    def __init__(self, window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.has_padding = False  # True once any validity mask was given (else the op gets no mask)
        self.seen = 0  # tokens appended so far (absolute position of the next token)
        self.record_past = False  # assisted decoding: keep everything until the next crop

    @property
    def num_cached(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, key_states, value_states, valid=None):
        """Appends (B, Hkv, T, D) keys/values and their (B, T) validity; returns window + new tokens."""
        b, _, t, _ = key_states.shape
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=key_states.device)
        else:
            if valid.shape != (b, t):
                raise ValueError(f"valid must have shape {(b, t)}, got {tuple(valid.shape)}")
            valid = valid.to(device=key_states.device, dtype=torch.bool)
            self.has_padding = True
        if self.keys is None:
            keys, values, flags = key_states, value_states, valid
        else:
            if self.keys.shape[0] != b:
                raise ValueError(f"key_states batch size {b} does not match the cached {self.keys.shape[0]}")
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            flags = torch.cat([self.valid, valid], dim=-1)
        self.seen += t
        if self.record_past:
            self.keys, self.values, self.valid = keys, values, flags
        else:
            self._store_last(keys, values, flags)
        return keys, values, flags

    def _store_last(self, keys, values, flags) -> None:
        # A copy, so the trimmed window does not keep the whole prefill tensor alive.
        self.keys = keys[:, :, -self.window:].clone()
        self.values = values[:, :, -self.window:].clone()
        self.valid = flags[:, -self.window:].clone()

    def padding_mask(self, flags):
        """The key padding mask to hand the op: None while no padding was ever given."""
        return flags if self.has_padding else None

    def reset(self) -> None:
        self.keys = self.values = self.valid = None
        self.has_padding = False
        self.seen = 0

    def _index(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values, self.valid = fn(self.keys), fn(self.values), fn(self.valid)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self._index(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def select(self, indices: torch.Tensor) -> None:
        self._index(lambda x: x[indices])

    def repeat_interleave(self, repeats: int) -> None:
        self._index(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove must be <= 0 (a negative count of tokens), got {tokens_to_remove}")
        n = -tokens_to_remove
        if n and self.keys is not None:
            kept = self.num_cached - n
            # After removing n tokens the window must still hold the W keys (or all keys) before them.
            if kept < min(self.window, self.seen - n):
                raise RuntimeError(
                    f"crop: the Krause window holds only {self.num_cached} of the last tokens and cannot drop {n}; "
                    "call Cache.activate_past_recording() before generating to make rollbacks possible"
                )
            self.keys, self.values, self.valid = self.keys[:, :, :kept], self.values[:, :, :kept], self.valid[:, :kept]
            self.seen -= n
        if self.keys is not None:
            self._store_last(self.keys, self.values, self.valid)

    def to(self, device, non_blocking: bool = False) -> None:
        self._index(lambda x: x.to(device, non_blocking=non_blocking))


class KrauseCacheLayer(CacheLayerMixin):
    """One decoder layer's cache entry: the standard branch's layer plus a :class:`KrauseWindow`.

    Every ``CacheLayerMixin`` call (``update``, ``get_seq_length``, ``get_mask_sizes``, ...)
    answers for the standard part, so the softmax branch cannot tell it from the layer
    transformers made; ``update_krause`` feeds the Krause part. With ``standalone=True``
    there is no standard part and the Krause part answers for the layer.
    """

    is_compileable = False

    def __init__(self, standard: CacheLayerMixin | None = None, window: int = 32, *, standalone: bool = False):
        # CacheLayerMixin.__init__ is skipped on purpose: keys/values live in the parts.
        if standalone and standard is not None:
            raise ValueError("standard must be None for a standalone (Krause-only) cache layer")
        if not standalone and standard is None:
            standard = DynamicLayer()
        self.standard = standard
        self.krause = KrauseWindow(window)
        self.standalone = standalone

    def __repr__(self):
        inner = "standalone" if self.standalone else repr(self.standard)
        return f"KrauseCacheLayer({inner}, window={self.krause.window})"

    def __getattr__(self, name):
        # Attributes a specific layer class carries (max_cache_len, cumulative_length, ...).
        standard = self.__dict__.get("standard")
        if standard is None:
            raise AttributeError(f"'KrauseCacheLayer' object has no attribute '{name}'")
        return getattr(standard, name)

    # ------------------------------------------------------------------ the Krause part
    @property
    def krause_seen(self) -> int:
        """Tokens this layer's Krause part has seen: the absolute position of the next token."""
        return self.krause.seen

    def update_krause(self, key_states, value_states, valid=None):
        """Appends the Krause branch's new keys/values; returns (keys, values, key_padding_mask or None)
        covering the cached window followed by the new tokens."""
        keys, values, flags = self.krause.update(key_states, value_states, valid)
        return keys, values, self.krause.padding_mask(flags)

    # ------------------------------------------------------------------ CacheLayerMixin
    @property
    def keys(self):
        return self.krause.keys if self.standalone else self.standard.keys

    @property
    def values(self):
        return self.krause.values if self.standalone else self.standard.values

    @property
    def is_initialized(self) -> bool:
        return self.krause.keys is not None if self.standalone else self.standard.is_initialized

    @property
    def is_sliding(self) -> bool:
        return False if self.standalone else getattr(self.standard, "is_sliding", False)

    @property
    def is_croppable(self) -> bool:
        return True if self.standalone else getattr(self.standard, "is_croppable", False)

    @property
    def supports_early_init(self) -> bool:
        return False if self.standalone else getattr(self.standard, "supports_early_init", True)

    def lazy_initialization(self, key_states, value_states) -> None:
        if not self.standalone:
            self.standard.lazy_initialization(key_states, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.standalone:
            # attn_implementation="krause": the model's own update call feeds the window (padding comes from the mask)
            keys, values, _ = self.krause.update(key_states, value_states)
            return keys, values
        return self.standard.update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.standalone:
            return self.krause.seen + query_length, 0
        return self.standard.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.krause.seen if self.standalone else self.standard.get_seq_length()

    def get_max_length(self) -> int:
        return -1 if self.standalone else self.standard.get_max_length()

    def offload(self):
        if not self.standalone:
            self.standard.offload()
        self.krause.to("cpu", non_blocking=True)

    def prefetch(self):
        if not self.standalone:
            self.standard.prefetch()
            if self.standard.is_initialized:
                self.krause.to(self.standard.device, non_blocking=True)

    def reset(self) -> None:
        if not self.standalone:
            self.standard.reset()
        self.krause.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.standalone:
            self.standard.reorder_cache(beam_idx)
        self.krause.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if not self.standalone:
            self.standard.crop(tokens_to_remove)
        self.krause.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.standalone:
            self.standard.batch_repeat_interleave(repeats)
        self.krause.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.standalone:
            self.standard.batch_select_indices(indices)
        self.krause.select(indices)

    def activate_past_recording(self):
        if not self.standalone and hasattr(self.standard, "activate_past_recording"):
            self.standard.activate_past_recording()
        self.krause.record_past = True


def krause_cache_layer(
    past_key_values: Cache | None, layer_idx: int, window: int, *, standalone: bool = False
) -> KrauseCacheLayer | None:
    """The :class:`KrauseCacheLayer` at ``layer_idx`` of ``past_key_values``, installed on first use.

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
    if isinstance(layer, KrauseCacheLayer):
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
    layer = KrauseCacheLayer(window=window, standalone=True) if standalone else KrauseCacheLayer(layer, window)
    layers[layer_idx] = layer
    return layer
