"""Decoding caches for one attention layer.

``KrauseWindowCache``: causal-window Krause attention lets token i see only the keys
i - W < j <= i, so a decoder needs the last W keys/values and nothing older. They live in
a ring buffer of fixed shape (B, Hkv, capacity, D) (capacity = W by default), token p in
slot p % capacity: memory and the cost of a decoding step do not grow with the number of
tokens generated, and a step writes one slot in place (no roll, no new buffer).

``SlidingWindowCache``: the same ring buffer for sliding-window softmax attention.

``StandardKVCache``: the growing key/value cache of softmax attention, same interface.

All are built empty for a batch and fed with ``attend(q, k, v, ..., key_padding_mask=None)``
— the queries, keys and values of the next T tokens of every row, returning their
attention outputs exactly as the full causal forward over the whole (padded) sequence
would. Rows share one timeline of ``pos`` tokens but may hold different numbers of real
tokens: a (B, T) bool ``key_padding_mask`` (True = real token) marks the padding of the
new tokens (left padding of a batch of prompts, finished rows), which is stored but never
a candidate; ``lengths`` counts each row's real tokens. ``reorder(index)`` (beam search)
and ``select(index)`` (batch pruning) index the rows; ``reset()`` empties the cache.
They are inference state: run them under ``torch.no_grad()`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validation as V
from .dense import krause_attention_grouped
from .ops import causal_krause_attention


def _check_rows(name: str, index, batch_size: int) -> torch.Tensor:
    """A non-empty 1-D integer tensor of rows in [0, batch_size)."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8
    ):
        what = f"{index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"{name} must be a 1-D integer (Long) tensor of batch rows, got a {what}")
    if index.numel() == 0:
        raise ValueError(f"{name} must select at least one row")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= batch_size:
        raise ValueError(f"{name} holds rows {low}..{high}, outside the cache's batch of {batch_size} rows")
    return index.long()


class _LayerCache:
    """(B, Hkv, capacity, D) key/value storage, per-slot validity, shape checks and the
    batch-row operations shared by the caches."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, device, dtype, capacity: int):
        self.batch_size = V.check_positive_int("batch_size", batch_size)
        self.num_kv_heads = V.check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = V.check_positive_int("head_dim", head_dim)
        V.check_positive_int("capacity", capacity)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.get_default_dtype()
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.valid = torch.zeros(batch_size, capacity, device=self.device, dtype=torch.bool)  # slot holds a real token
        self.lengths = torch.zeros(batch_size, device=self.device, dtype=torch.long)  # real tokens per row
        self.pos = 0  # tokens per row so far (padding included): the shared timeline
        # Whether any key_padding_mask was ever given: without one, the unmasked fast paths hold.
        self.padded = False

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        """Forgets every token; the buffers are kept and overwritten."""
        self.pos = 0
        self.valid.zero_()
        self.lengths.zero_()
        self.padded = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the key/value storage."""
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def check_inputs(self, q, k, v, key_padding_mask=None):
        """Checks the next tokens' q (B, H, T, D), k/v (B, Hkv, T, D) and optional (B, T)
        bool key_padding_mask against the cache; returns (H, T, mask)."""
        b, h, _, t, d = V.check_qkv(q, k, v)
        if b != self.batch_size:
            raise ValueError(f"q batch size {b} does not match the cache's {self.batch_size}")
        if k.shape[1] != self.num_kv_heads:
            raise ValueError(f"k has {k.shape[1]} heads but the cache holds {self.num_kv_heads}")
        if d != self.head_dim:
            raise ValueError(f"q head_dim {d} does not match the cache's {self.head_dim}")
        if k.device != self.device:
            raise ValueError(f"k is on {k.device} but the cache is on {self.device}")
        mask = V.check_key_padding_mask(key_padding_mask, b, t, q)
        return h, t, mask

    def _count(self, t: int, mask) -> None:
        self.pos += t
        if mask is None:
            self.lengths += t
        else:
            self.lengths += mask.sum(-1)
            self.padded = True

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the rows ``index`` (a LongTensor over the batch, repeats allowed, any
        length), in that order: beam search's reordering of its hypotheses."""
        index = _check_rows("index", index, self.batch_size).to(self.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.batch_size = index.numel()

    def select(self, index: torch.Tensor) -> None:
        """Keeps only some rows (batch pruning): ``index`` is a (B,) bool tensor of the rows
        to keep, or a LongTensor of distinct rows."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            if tuple(index.shape) != (self.batch_size,):
                raise ValueError(f"index as a bool mask must have shape ({self.batch_size},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        index = _check_rows("index", index, self.batch_size)
        if index.unique().numel() != index.numel():
            raise ValueError("index must not repeat rows in select (use reorder to duplicate rows)")
        self.reorder(index)


class RingKVCache(_LayerCache):
    """Ring buffer of the last keys/values of one sliding-window layer.

    Fixed shape (B, Hkv, capacity, D), capacity >= window (the window by default); token
    p of the shared timeline lives in slot p % capacity. Subclasses decide how the new
    queries attend to it.
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, window, device=None, dtype=None, capacity=None):
        window = V.check_positive_int("window", window)
        capacity = window if capacity is None else V.check_positive_int("capacity", capacity)
        if capacity < window:
            raise ValueError(f"capacity must be >= window ({window}) for a ring buffer, got {capacity}")
        super().__init__(batch_size, num_kv_heads, head_dim, device, dtype, capacity)
        self.window = window

    @property
    def num_cached(self) -> int:
        """Tokens per row held in the ring (padding included)."""
        return min(self.pos, self.capacity)

    def _slots(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device) % self.capacity

    def _recent(self, n: int):
        """Keys, values (B, Hkv, n, D) and validity (B, n) of the last n stored tokens, oldest first."""
        if self.pos <= self.capacity:  # the ring has not wrapped: slots hold positions in order
            lo = self.pos - n
            return self.keys[:, :, lo:self.pos], self.values[:, :, lo:self.pos], self.valid[:, lo:self.pos]
        slots = self._slots(self.pos - n, self.pos)
        return self.keys.index_select(2, slots), self.values.index_select(2, slots), self.valid.index_select(1, slots)

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys and values, oldest first: (B, Hkv, min(pos, capacity), D) each."""
        keys, values, _ = self._recent(self.num_cached)
        return keys, values

    def _store(self, k, v, mask) -> None:
        """Writes the T new tokens (only the last ``capacity`` of them survive) in place."""
        t = k.shape[2]
        if t == 1:
            slot = self.pos % self.capacity
            self.keys[:, :, slot] = k[:, :, 0]
            self.values[:, :, slot] = v[:, :, 0]
            self.valid[:, slot] = True if mask is None else mask[:, 0]
        else:
            n = min(t, self.capacity)
            slots = self._slots(self.pos + t - n, self.pos + t)
            self.keys.index_copy_(2, slots, k[:, :, t - n:].to(self.dtype))
            self.values.index_copy_(2, slots, v[:, :, t - n:].to(self.dtype))
            fresh = torch.ones(self.batch_size, n, dtype=torch.bool, device=self.device) if mask is None else mask[:, t - n:]
            self.valid.index_copy_(1, slots, fresh)
        self._count(t, mask)

    def _step_candidates(self) -> torch.Tensor:
        """(B, 1, 1, capacity) bool: the slots the newest token (position pos - 1) may see."""
        if self.capacity == self.window:  # every written slot is within the window
            return self.valid[:, None, None, :]
        age = (self.pos - 1 - torch.arange(self.capacity, device=self.device)) % self.capacity
        return (self.valid & (age < self.window))[:, None, None, :]

    def _with_context(self, k, v, mask):
        """Keys, values (B, Hkv, c + T, D) and padding mask (B, c + T) or None of the
        c = min(pos, W - 1) most recent past tokens (all the oldest new query can see)
        followed by the T new ones. Call before ``_store``."""
        context = min(self.pos, self.window - 1)
        past_k, past_v, past_valid = self._recent(context)
        keys = torch.cat([past_k.to(k.dtype), k], dim=2)
        values = torch.cat([past_v.to(v.dtype), v], dim=2)
        padding = None
        if self.padded or mask is not None:
            new = mask if mask is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            padding = torch.cat([past_valid, new], dim=1)
        return keys, values, padding


class KrauseWindowCache(RingKVCache):
    """Decoding cache of one causal-window Krause layer (constant memory and step cost).

    ``attend`` with one token scores its query against the ring's slots directly with the
    dense Krause formula (``krause.dense``, O(capacity D), GQA without copying keys), the
    candidates being the valid slots within the window; with several tokens (prefill, or
    extending a prompt) it runs ``krause.causal_krause_attention`` with end-aligned
    queries over [up to W - 1 kept past keys, new keys].
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, window, top_k, device=None, dtype=None, capacity=None,
                 impl: str = "auto"):
        super().__init__(batch_size, num_kv_heads, head_dim, window, device, dtype, capacity)
        self.top_k = V.check_positive_int("top_k", top_k)
        self.impl = impl

    def attend(self, q, k, v, log_sigma, *, key_padding_mask=None) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        h, t, mask = self.check_inputs(q, k, v, key_padding_mask)
        log_sigma = V.check_log_sigma(log_sigma, h, q)
        if t == 1:
            self._store(k, v, mask)
            return krause_attention_grouped(q, self.keys, self.values, log_sigma, self._step_candidates(), self.top_k)
        keys, values, padding = self._with_context(k, v, mask)
        self._store(k, v, mask)
        return causal_krause_attention(q, keys, values, log_sigma, self.window, self.top_k,
                                       key_padding_mask=padding, impl=self.impl)


class SlidingWindowCache(RingKVCache):
    """Decoding cache of causal sliding-window softmax attention (constant memory)."""

    def attend(self, q, k, v, scale: float | None = None, dropout_p: float = 0.0, *,
               key_padding_mask=None) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        _, t, mask = self.check_inputs(q, k, v, key_padding_mask)
        if t == 1:
            self._store(k, v, mask)
            keys, values, allowed = self.keys, self.values, self._step_candidates()
        else:
            keys, values, padding = self._with_context(k, v, mask)
            self._store(k, v, mask)
            allowed = end_aligned_mask(t, keys.shape[2], self.window, padding, q.device)
        return masked_sdpa(q, keys, values, allowed, scale, dropout_p)


def end_aligned_mask(num_queries: int, num_keys: int, window: int | None, padding, device) -> torch.Tensor:
    """(1 or B, 1, Tq, Tk) bool: query i at position Tk - Tq + i sees keys in (pos - window, pos]
    (window None: all of them) that are not padding."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)
    allowed = allowed[None, None]
    return allowed if padding is None else allowed & padding[:, None, None, :]


def masked_sdpa(q, keys, values, allowed, scale, dropout_p) -> torch.Tensor:
    """SDPA under a bool mask; queries that may see no key get zeros (not NaN)."""
    out = F.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=True
    )
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


DEFAULT_CAPACITY = 256  # initial slots of a growing cache whose sequence length is not known


class StandardKVCache(_LayerCache):
    """Growing key/value cache for causal softmax attention (the twin of KrauseWindowCache).

    ``capacity`` slots are allocated up front (size it to the expected sequence length);
    storage doubles when full, so appending is amortised O(1) copies per token; a step
    still costs O(pos) like any softmax decoder.
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, device=None, dtype=None, capacity: int = DEFAULT_CAPACITY):
        super().__init__(batch_size, num_kv_heads, head_dim, device, dtype, capacity)

    @property
    def num_cached(self) -> int:
        return self.pos

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.pos], self.values[:, :, : self.pos]

    def past_mask(self) -> torch.Tensor:
        """(B, pos) bool: which cached tokens are real (not padding)."""
        return self.valid[:, : self.pos]

    def _reserve(self, length: int) -> None:
        capacity = self.capacity
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        grow = capacity - self.capacity
        self.keys = F.pad(self.keys, (0, 0, 0, grow))
        self.values = F.pad(self.values, (0, 0, 0, grow))
        self.valid = F.pad(self.valid, (0, grow))

    def update(self, k, v, key_padding_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the keys/values (B, Hkv, T, D) of T new tokens (and their optional (B, T)
        padding mask); returns every cached key and value."""
        if key_padding_mask is not None:
            key_padding_mask = V.check_key_padding_mask(key_padding_mask, self.batch_size, k.shape[2], k)
        start, end = self.pos, self.pos + k.shape[2]
        self._reserve(end)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.valid[:, start:end] = True if key_padding_mask is None else key_padding_mask
        self._count(end - start, key_padding_mask)
        return self.past()

    def attend(self, q, k, v, scale: float | None = None, dropout_p: float = 0.0, *,
               key_padding_mask=None) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        _, t, mask = self.check_inputs(q, k, v, key_padding_mask)
        start = self.pos
        keys, values = self.update(k, v, mask)
        if self.padded:
            allowed = end_aligned_mask(t, self.pos, None, self.past_mask(), q.device)
            return masked_sdpa(q, keys, values, allowed, scale, dropout_p)
        attn_mask = None
        if t > 1 and start > 0:  # new query i sits at start + i and sees keys 0..start + i
            attn_mask = end_aligned_mask(t, self.pos, None, None, q.device)
        return F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=attn_mask, is_causal=t > 1 and start == 0,
            dropout_p=dropout_p, scale=scale, enable_gqa=True,
        )
