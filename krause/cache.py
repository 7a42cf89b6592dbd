"""Decoding caches: one contract for every family, on transformers' cache-layer classes.

A decoder feeds one cache layer per attention layer the keys/values of its next tokens (a
prompt, a chunk or one token) and attends from those tokens to what the layer returns.
Every layer here is a transformers ``CacheLayerMixin``, so a ``transformers.Cache`` holding
them serves ``generate()`` as it is: ``reorder_cache`` (beam search),
``batch_select_indices``, ``batch_repeat_interleave``, ``crop`` (assisted decoding, with
``activate_past_recording`` to roll a window back) and ``reset``.

- ``KVCacheLayer``: the whole history of a softmax layer (standard, top-k), in storage that
  doubles when full (amortised O(1) copies per token; ``capacity`` sizes it up front).
- ``WindowCacheLayer``: only the last ``window`` tokens of a causal-window layer (Krause,
  sliding-window softmax): memory O(W) whatever the length, a step copies O(W).
  ``KrauseWindowLayer`` and ``SlidingWindowLayer`` add the attention they decode.
- ``GatedCacheLayer``: a full softmax KV (``standard``, any cache layer: ``krause.hf`` keeps
  the one transformers made) plus a Krause window (``krause``) for the gated mix; every
  cache operation goes to both parts.

``append(k, v, valid=None)`` stores the (B, Hkv, T, D) keys/values of T new tokens and
their (B, T) validity (True = real token; False = padding: the left padding of a batch
of prompts, a finished row) and returns (keys, values, key_padding_mask): the cached keys
followed by the new ones, the new tokens' queries end-aligned to them (query i sits at
key Tk - T + i, as ``krause.causal_krause_attention`` takes them). The mask is None while
no padding was ever given, so unpadded decoding keeps the unmasked fast paths. Padding is
stored but never attended; each row decodes as it would alone.

``attend(q, k, v, ...)`` is append followed by the layer's attention. Inference state: run
under ``torch.no_grad()`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, LinearAttentionLayer

from . import _validation as V
from .masks import end_aligned_mask, masked_sdpa
from .nn.linear import LINEAR_EPS, causal_linear_attention, elu_feature_map
from .dense import repeat_kv
from .ops import causal_krause_attention

__all__ = [
    "LinearAttentionState",
    "DEFAULT_CAPACITY",
    "GatedCacheLayer",
    "KVCacheLayer",
    "KrauseWindowLayer",
    "SlidingWindowLayer",
    "WindowCacheLayer",
    "end_aligned_mask",
    "install_layers",
    "masked_sdpa",
]

DEFAULT_CAPACITY = 256  # initial slots of a growing cache whose sequence length is not known


def _check_rows(name: str, index, batch_size: int) -> torch.Tensor:
    """A non-empty 1-D integer tensor of rows in [0, batch_size), or a (batch_size,) bool mask -> row indices."""
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
        if tuple(index.shape) != (batch_size,):
            raise ValueError(f"{name} as a bool mask must have shape ({batch_size},), got {tuple(index.shape)}")
        index = index.nonzero().flatten()
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() or index.is_complex():
        what = f"{index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"{name} must be a 1-D integer (Long) tensor of batch rows, got a {what}")
    if index.numel() == 0:
        raise ValueError(f"{name} must select at least one row")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= batch_size:
        raise ValueError(f"{name} holds rows {low}..{high}, outside the cache's batch of {batch_size} rows")
    return index.long()


class _TokenLayer(DynamicLayer):
    """Keys/values of the cached tokens plus their validity, and the batch-row operations.

    ``seen`` counts every token appended (padding included): the absolute position of the
    next one on the rows' shared timeline. ``dtype`` (default: the first keys') is the
    storage dtype.
    """

    is_compileable = False
    supports_early_init = False  # storage is allocated by the first append

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.storage_dtype = dtype
        self.valid: torch.Tensor | None = None  # (B, cached tokens) bool
        self.has_padding = False  # any validity mask ever given: then the mask is returned
        self.seen = 0

    # ------------------------------------------------------------------ shared helpers
    def _flags(self, key_states, value_states, valid) -> torch.Tensor:
        self._check_states(key_states, value_states)
        b, _, t, _ = key_states.shape
        if valid is None:
            return torch.ones(b, t, dtype=torch.bool, device=key_states.device)
        valid = V.check_key_padding_mask(valid, b, t, key_states)
        self.has_padding = True
        return valid

    def _check_states(self, key_states, value_states) -> None:
        if not isinstance(key_states, torch.Tensor) or key_states.dim() != 4:
            raise ValueError(f"key_states must be a (batch, kv_heads, tokens, head_dim) tensor, got "
                             f"{tuple(key_states.shape) if isinstance(key_states, torch.Tensor) else type(key_states).__name__}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"value_states shape {tuple(value_states.shape)} does not match key_states "
                             f"{tuple(key_states.shape)}")
        b = key_states.shape[0]
        if self.keys is not None and self.keys.shape[0] != b:
            raise ValueError(f"key_states batch size {b} does not match the cache's {self.keys.shape[0]}")
        if self.keys is not None and self.keys.shape[1:2] + self.keys.shape[3:] != key_states.shape[1:2] + key_states.shape[3:]:
            raise ValueError(f"key_states heads/head_dim {tuple(key_states.shape[1::2])} do not match the cache's "
                             f"{tuple(self.keys.shape[1::2])}")

    def _padding(self, flags: torch.Tensor) -> torch.Tensor | None:
        return flags if self.has_padding else None

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        if self.storage_dtype is None:
            self.storage_dtype = x.dtype
        return x if x.dtype == self.storage_dtype else x.to(self.storage_dtype)

    def _tensors(self) -> list[str]:
        """Names of the attributes holding (batch, ...) tensors."""
        return ["keys", "values", "valid"]

    def _map_rows(self, fn) -> None:
        if self.keys is None:
            return
        for name in self._tensors():
            setattr(self, name, fn(getattr(self, name)))

    @property
    def batch_size(self) -> int:
        return -1 if self.keys is None else self.keys.shape[0]

    @property
    def num_cached(self) -> int:
        """Tokens held (padding included)."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage held."""
        if self.keys is None:
            return 0
        return sum(getattr(self, n).untyped_storage().nbytes() for n in self._tensors()[:2])

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.seen

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' entry point: append without padding flags; returns (keys, values)."""
        keys, values, _ = self.append(key_states, value_states)
        return keys, values

    def append(self, key_states, value_states, valid=None):
        raise NotImplementedError

    # ------------------------------------------------------------------ batch rows
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keeps the rows ``beam_idx`` (repeats allowed, any number), in that order: beam search."""
        if self.keys is None:
            return
        index = _check_rows("beam_idx", beam_idx, self.batch_size).to(self.keys.device)
        self._map_rows(lambda x: x.index_select(0, index))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the rows ``indices`` (a bool mask or distinct row indices): batch pruning."""
        if self.keys is None:
            return
        index = _check_rows("indices", indices, self.batch_size)
        if index.unique().numel() != index.numel():
            raise ValueError("indices must not repeat rows (use reorder_cache to duplicate rows)")
        index = index.to(self.keys.device)
        self._map_rows(lambda x: x.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        V.check_positive_int("repeats", repeats)
        self._map_rows(lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forgets every token (storage is dropped)."""
        for name in self._tensors():
            setattr(self, name, None)
        self.has_padding = False
        self.is_initialized = False
        self.seen = 0

    def offload(self):
        self._map_rows(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self):
        device = getattr(self, "device", None)
        if self.keys is not None and device is not None:
            self._map_rows(lambda x: x.to(device, non_blocking=True))

    def _check_crop(self, tokens_to_remove: int) -> int:
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove must be an int <= 0 (minus the tokens to drop), got {tokens_to_remove!r}")
        n = -tokens_to_remove
        if n > self.seen:
            raise ValueError(f"tokens_to_remove: cannot drop {n} tokens from a cache holding {self.seen}")
        return n


class KVCacheLayer(_TokenLayer):
    """The whole key/value history of one causal softmax layer (standard, top-k).

    ``capacity`` slots (the expected sequence length; default ``DEFAULT_CAPACITY``) are
    allocated by the first append and double when full; ``keys``/``values``/``valid`` are
    views of the filled part.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int | None = None, dtype: torch.dtype | None = None):
        super().__init__(dtype)
        self.capacity_hint = DEFAULT_CAPACITY if capacity is None else V.check_positive_int("capacity", capacity)
        self._buffers: list[torch.Tensor] | None = None  # keys, values, valid at full capacity

    @property
    def capacity(self) -> int:
        return 0 if self._buffers is None else self._buffers[0].shape[2]

    def _views(self) -> None:
        k, v, m = self._buffers
        self.keys, self.values, self.valid = k[:, :, : self.seen], v[:, :, : self.seen], m[:, : self.seen]

    def _map_rows(self, fn) -> None:
        if self._buffers is not None:
            self._buffers = [fn(x) for x in self._buffers]
            self._views()

    @property
    def nbytes(self) -> int:
        return 0 if self._buffers is None else sum(x.untyped_storage().nbytes() for x in self._buffers[:2])

    def append(self, key_states, value_states, valid=None):
        flags = self._flags(key_states, value_states, valid)
        b, h, t, d = key_states.shape
        end = self.seen + t
        if self._buffers is None:
            capacity = max(self.capacity_hint, end)
            dtype = self._stored(key_states).dtype
            self._buffers = [key_states.new_zeros(b, h, capacity, d, dtype=dtype),
                             key_states.new_zeros(b, h, capacity, d, dtype=dtype),
                             torch.zeros(b, capacity, dtype=torch.bool, device=key_states.device)]
            self.device, self.is_initialized = key_states.device, True
        elif end > self.capacity:
            capacity = self.capacity
            while capacity < end:
                capacity *= 2
            grow = capacity - self.capacity
            k, v, m = self._buffers
            self._buffers = [F.pad(k, (0, 0, 0, grow)), F.pad(v, (0, 0, 0, grow)), F.pad(m, (0, grow))]
        k, v, m = self._buffers
        k[:, :, self.seen:end] = key_states
        v[:, :, self.seen:end] = value_states
        m[:, self.seen:end] = flags
        self.seen = end
        self._views()
        return self.keys, self.values, self._padding(self.valid)

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        self.seen -= self._check_crop(tokens_to_remove)
        if self._buffers is not None:
            self._views()

    def reset(self) -> None:
        super().reset()
        self._buffers = None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def attend(self, q, k, v, scale: float | None = None, dropout_p: float = 0.0, *, key_padding_mask=None):
        """Causal softmax over the whole history: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
        start = self.seen
        keys, values, padding = self.append(k, v, key_padding_mask)
        t = q.shape[2]
        if padding is not None or (t > 1 and start > 0):  # new query i sits at start + i
            return masked_sdpa(q, keys, values, end_aligned_mask(t, self.seen, None, padding, q.device), scale,
                               dropout_p)
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), is_causal=t > 1,
                                              dropout_p=dropout_p, scale=scale, enable_gqa=True)


class WindowCacheLayer(_TokenLayer):
    """The last ``window`` keys/values of one causal-window layer and their validity.

    Trimmed tensors rather than a ring buffer: a beam reorder or batch selection stays one
    ``index_select`` and the stored keys are in order; a step copies O(W), never O(T).
    ``activate_past_recording()`` keeps every token until the next ``crop`` (assisted
    decoding rolls back past the window).
    """

    is_sliding = True
    is_croppable = True

    def __init__(self, window: int, dtype: torch.dtype | None = None):
        super().__init__(dtype)
        self.window = V.check_positive_int("window", window)
        self.record_past = False

    def activate_past_recording(self) -> None:
        self.record_past = True

    def append(self, key_states, value_states, valid=None):
        if valid is None and not self.has_padding:  # every token so far is real: no flags to build or copy
            self._check_states(key_states, value_states)
            flags = None
        else:
            flags = self._flags(key_states, value_states, valid)
        key_states, value_states = self._stored(key_states), self._stored(value_states)
        if self.keys is None:
            keys, values = key_states, value_states
            self.device, self.is_initialized = key_states.device, True
        else:
            keys = torch.cat([self.keys, key_states], dim=2)
            values = torch.cat([self.values, value_states], dim=2)
            if flags is not None:
                flags = torch.cat([self.valid, flags], dim=1)
        self.seen += key_states.shape[2]
        if self.record_past:
            self.keys, self.values = keys, values
            self.valid = self._all_real(keys) if flags is None else flags
        else:
            self._keep_last(keys, values, flags)
        return keys, values, self._padding(flags)

    def _keep_last(self, keys, values, flags) -> None:
        # A view while it keeps at most as many dropped tokens alive as it holds (a decoding step
        # drops one), else a copy, so the window never keeps a whole prefill tensor alive.
        start = max(0, keys.shape[2] - self.window)
        kept = keys.shape[2] - start
        trim = torch.Tensor.narrow if start <= kept else torch.Tensor.narrow_copy
        self.keys, self.values = trim(keys, 2, start, kept), trim(values, 2, start, kept)
        self.valid = self._all_real(self.keys) if flags is None else trim(flags, 1, start, kept)

    def _all_real(self, keys) -> torch.Tensor:
        """The all-True validity of ``keys`` (no padding so far): the stored one when it fits."""
        shape = (keys.shape[0], keys.shape[2])
        if self.valid is not None and self.valid.shape == shape and self.valid.device == keys.device:
            return self.valid
        return torch.ones(shape, dtype=torch.bool, device=keys.device)

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens, then trims back to the window."""
        n = self._check_crop(tokens_to_remove)
        if n and self.keys is not None:
            kept = self.num_cached - n
            # After the rollback the window must still hold the W tokens (or all tokens) before the new end.
            if kept < min(self.window, self.seen - n):
                raise RuntimeError(
                    f"crop: the window holds only the last {self.num_cached} tokens and cannot drop {n}; call "
                    "activate_past_recording() on the cache before generating to make rollbacks possible")
            self.keys, self.values, self.valid = self.keys[:, :, :kept], self.values[:, :, :kept], self.valid[:, :kept]
        self.seen -= n
        if self.keys is not None:
            self._keep_last(self.keys, self.values, self.valid)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_cached + query_length, self.seen - self.num_cached

    def get_max_length(self) -> int:
        return self.window


class KrauseWindowLayer(WindowCacheLayer):
    """Decoding cache of one causal-window Krause layer: ``attend`` runs
    ``krause.causal_krause_attention`` with the new queries end-aligned to [window, new keys]."""

    def __init__(self, window: int, top_k: int, impl: str = "auto", dtype: torch.dtype | None = None):
        super().__init__(window, dtype)
        self.top_k = V.check_positive_int("top_k", top_k)
        self.impl = impl

    def attend(self, q, k, v, log_sigma, *, key_padding_mask=None) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        keys, values, padding = self.append(k, v, key_padding_mask)
        return causal_krause_attention(q, keys.to(q.dtype), values.to(q.dtype), log_sigma, self.window, self.top_k,
                                       key_padding_mask=padding, impl=self.impl)


class SlidingWindowLayer(WindowCacheLayer):
    """Decoding cache of causal sliding-window softmax attention (the last ``window`` tokens)."""

    def attend(self, q, k, v, scale: float | None = None, dropout_p: float = 0.0, *, key_padding_mask=None):
        keys, values, padding = self.append(k, v, key_padding_mask)
        allowed = end_aligned_mask(q.shape[2], keys.shape[2], self.window, padding, q.device)
        return masked_sdpa(q, keys, values, allowed, scale, dropout_p)


class GatedCacheLayer(CacheLayerMixin):
    """One gated layer's cache: a full softmax KV (``standard``) plus a Krause window (``krause``).

    Every ``CacheLayerMixin`` query (``update``, ``get_seq_length``, ``get_mask_sizes``, ...)
    answers for the standard part, so a softmax branch cannot tell it from a plain layer;
    ``reset``, ``reorder_cache``, ``crop``, ``batch_repeat_interleave`` and
    ``batch_select_indices`` go to both parts. ``standard`` may be any transformers cache
    layer (default ``KVCacheLayer()``); ``krause`` a ``WindowCacheLayer`` or the window size.
    With ``standalone=True`` there is no standard part (a Krause-only model inside a
    transformers model): the Krause part then answers as a dynamic full-attention layer.
    """

    is_compileable = False

    def __init__(self, standard: CacheLayerMixin | None = None, krause: WindowCacheLayer | int = 32, *,
                 standalone: bool = False):
        # CacheLayerMixin.__init__ is skipped on purpose: keys/values live in the parts.
        if standalone and standard is not None:
            raise ValueError("standard must be None for a standalone (Krause-only) cache layer")
        if not standalone and standard is None:
            standard = KVCacheLayer()
        if not isinstance(krause, WindowCacheLayer):
            krause = WindowCacheLayer(krause)
        self.standard = standard
        self.krause = krause
        self.standalone = standalone

    def __repr__(self):
        inner = "standalone" if self.standalone else repr(self.standard)
        return f"{type(self).__name__}({inner}, window={self.krause.window})"

    def __getattr__(self, name):
        # Attributes a specific standard layer class carries (max_cache_len, cumulative_length, ...).
        standard = self.__dict__.get("standard")
        if standard is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(standard, name)

    # ------------------------------------------------------------------ the Krause part
    @property
    def krause_seen(self) -> int:
        """Tokens the Krause part has seen: the absolute position of the next token."""
        return self.krause.seen

    def update_krause(self, key_states, value_states, valid=None):
        """Appends the Krause branch's new keys/values; returns (keys, values, key_padding_mask or None)."""
        return self.krause.append(key_states, value_states, valid)

    # ------------------------------------------------------------------ the layer, for transformers
    @property
    def keys(self):
        return self.krause.keys if self.standalone else self.standard.keys

    @property
    def values(self):
        return self.krause.values if self.standalone else self.standard.values

    @property
    def seen(self) -> int:
        return self.get_seq_length()

    @property
    def has_padding(self) -> bool:
        return any(getattr(part, "has_padding", False) for part in self._parts())

    @property
    def nbytes(self) -> int:
        return self.krause.nbytes + (0 if self.standalone else getattr(self.standard, "nbytes", 0))

    @property
    def is_initialized(self) -> bool:
        return self.krause.is_initialized if self.standalone else self.standard.is_initialized

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
            keys, values, _ = self.krause.append(key_states, value_states)
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

    def _parts(self):
        return (self.krause,) if self.standalone else (self.standard, self.krause)

    def offload(self):
        for part in self._parts():
            part.offload()

    def prefetch(self):
        for part in self._parts():
            part.prefetch()

    def reset(self) -> None:
        for part in self._parts():
            part.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for part in self._parts():
            part.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        for part in self._parts():
            part.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for part in self._parts():
            part.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for part in self._parts():
            part.batch_select_indices(indices)

    def activate_past_recording(self):
        for part in self._parts():
            if hasattr(part, "activate_past_recording"):
                part.activate_past_recording()


def install_layers(cache: Cache, make_layers) -> list:
    """The contract's layers inside ``cache`` (a transformers ``Cache``, e.g. the one
    ``generate()`` created): ``make_layers()`` fills a cache that holds no token yet; a
    cache already filled must hold the layers made before (the contract's, or linear
    attention's recurrent state, ``krause.nn.LinearAttentionState``). Returns ``cache.layers``."""
    if not isinstance(cache, Cache):
        raise ValueError(f"past_key_values must be a transformers Cache, got {type(cache).__name__}")

    if cache.layers and all(isinstance(layer, (_TokenLayer, GatedCacheLayer, LinearAttentionState))
                            for layer in cache.layers):
        return cache.layers
    if any(layer.get_seq_length() > 0 for layer in cache.layers if isinstance(layer, CacheLayerMixin)):
        raise ValueError("past_key_values already holds tokens in layers this model did not make; pass a fresh cache")
    cache.layers = list(make_layers())
    cache.layer_class_to_replicate = None
    return cache.layers


class LinearAttentionState(LinearAttentionLayer):
    """Recurrent state of causal linear attention for one layer: S = sum phi(k) v^T
    (B, H, D, D) and z = sum phi(k) (B, H, D), fp32. Constant size whatever the position.

    A transformers linear-attention cache layer (its two recurrent states are S and z), so a
    ``transformers.Cache`` holds it beside ``krause.cache``'s layers: ``reorder_cache`` (beam
    search), ``batch_select_indices``, ``batch_repeat_interleave`` and ``reset`` work on it;
    ``crop`` does not (a recurrent sum cannot be rolled back: transformers refuses it too)."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, device=None):
        super().__init__(number_of_states=2)
        self.recurrent_states[0] = torch.zeros(batch_size, num_heads, head_dim, head_dim, device=device)
        self.recurrent_states[1] = torch.zeros(batch_size, num_heads, head_dim, device=device)
        self.is_recurrent_states_initialized.update({0: True, 1: True})
        self.device, self.dtype = self.recurrent_states[0].device, torch.float32
        self.pos = 0

    s = property(lambda self: self.recurrent_states[0], lambda self, x: self.recurrent_states.__setitem__(0, x))
    z = property(lambda self: self.recurrent_states[1], lambda self, x: self.recurrent_states.__setitem__(1, x))

    @property
    def batch_size(self) -> int:
        return self.s.shape[0]

    @property
    def nbytes(self) -> int:
        return self.s.untyped_storage().nbytes() + self.z.untyped_storage().nbytes()

    def get_seq_length(self) -> int:
        return self.pos

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: keeps the rows ``index``, in that order (``reorder_cache`` too)."""
        self.reorder_cache(index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.s, self.z = self.s[indices], self.z[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.s, self.z = self.s.repeat_interleave(repeats, 0), self.z.repeat_interleave(repeats, 0)

    def reset(self) -> None:
        super().reset()
        self.pos = 0

    def attend(self, q, k, v) -> torch.Tensor:
        t = q.shape[2]
        if t == 1:  # one recurrent step, no chunk machinery
            h = q.shape[1]
            qf = elu_feature_map(q.float())[:, :, 0]
            kf = elu_feature_map(repeat_kv(k, h).float())[:, :, 0]
            vf = repeat_kv(v, h).float()[:, :, 0]
            self.s += kf[..., :, None] * vf[..., None, :]
            self.z += kf
            num = (qf[..., None, :] @ self.s)[..., 0, :]
            den = (qf * self.z).sum(-1, keepdim=True)
            out = (num / (den + LINEAR_EPS))[:, :, None].to(q.dtype)
        else:
            out, (self.s, self.z) = causal_linear_attention(q, k, v, (self.s, self.z))
        self.pos += t
        return out
