"""Decoding caches for one attention layer.

``KrauseWindowCache``: causal-window Krause attention lets token i see only the keys
i - W < j <= i, so a decoder needs the last W keys/values and nothing older. They live in
a ring buffer of fixed shape (B, Hkv, W, D), token p in slot p % W: memory and the cost
of a decoding step do not grow with the number of tokens generated.

``SlidingWindowCache``: the same ring buffer for sliding-window softmax attention.

``StandardKVCache``: the growing key/value cache of softmax attention, same interface.

All are built empty for a batch, fed with ``attend(q, k, v, ...)`` — new queries,
keys and values of one or more tokens, returning their attention outputs exactly as
the full causal forward would — and emptied with ``reset()``. They are inference
state: run them under ``torch.no_grad()`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validation as V
from .ops import causal_krause_attention


class _LayerCache:
    """Fixed (batch, kv heads, head dim) layout and shape checks shared by the caches."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, device, dtype):
        self.batch_size = V.check_positive_int("batch_size", batch_size)
        self.num_kv_heads = V.check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = V.check_positive_int("head_dim", head_dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.get_default_dtype()
        self.pos = 0  # tokens seen so far

    def reset(self) -> None:
        """Forgets every token; the buffers are kept and overwritten."""
        self.pos = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the key/value storage."""
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def check_inputs(self, q, k, v) -> tuple[int, int]:
        """Checks the next tokens' q (B, H, T, D), k/v (B, Hkv, T, D) against the cache; returns (H, T)."""
        b, h, _, t, d = V.check_qkv(q, k, v)
        if b != self.batch_size:
            raise ValueError(f"q batch size {b} does not match the cache's {self.batch_size}")
        if k.shape[1] != self.num_kv_heads:
            raise ValueError(f"k has {k.shape[1]} heads but the cache holds {self.num_kv_heads}")
        if d != self.head_dim:
            raise ValueError(f"q head_dim {d} does not match the cache's {self.head_dim}")
        return h, t


class RingKVCache(_LayerCache):
    """Ring buffer of the last ``window`` keys/values of one sliding-window layer.

    Fixed shape (B, Hkv, W, D); token p lives in slot p % W. Subclasses decide how the new
    queries attend to what ``window_update`` returns.
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, window, device=None, dtype=None):
        super().__init__(batch_size, num_kv_heads, head_dim, device, dtype)
        self.window = V.check_positive_int("window", window)
        shape = (batch_size, num_kv_heads, window, head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)

    @property
    def num_cached(self) -> int:
        return min(self.pos, self.window)

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys and values, oldest first: (B, Hkv, min(pos, W), D) each."""
        n = self.num_cached
        if self.pos <= self.window:  # slots fill from 0 in order until the ring wraps
            return self.keys[:, :, :n], self.values[:, :, :n]
        oldest = self.pos % self.window
        return self.keys.roll(-oldest, dims=2), self.values.roll(-oldest, dims=2)

    def window_update(self, k, v) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Stores the keys/values (B, Hkv, T, D) of T new tokens and returns
        (keys, values, context): what the new queries may look at.

        One token: the valid buffer slots, in slot order (a single query does not care
        about order). Several: the ``context`` = min(cached, W-1) most recent past tokens,
        oldest first, followed by the new ones — all the oldest new query can see.
        """
        t = k.shape[2]
        if t == 1:
            slot = self.pos % self.window
            self.keys[:, :, slot] = k[:, :, 0]
            self.values[:, :, slot] = v[:, :, 0]
            self.pos += 1
            # Until the ring wraps the valid slots are a prefix; after, all W are valid.
            n = self.num_cached
            return self.keys[:, :, :n], self.values[:, :, :n], n - 1
        past_k, past_v = self.past()
        context = min(past_k.shape[2], self.window - 1)
        past_k, past_v = past_k[:, :, past_k.shape[2] - context:], past_v[:, :, past_v.shape[2] - context:]
        keys = torch.cat([past_k.to(k.dtype), k], dim=2)
        values = torch.cat([past_v.to(v.dtype), v], dim=2)
        total = self.pos + t
        kept = min(self.window, keys.shape[2])
        slots = torch.arange(total - kept, total, device=self.device) % self.window
        self.keys.index_copy_(2, slots, keys[:, :, -kept:].to(self.dtype))
        self.values.index_copy_(2, slots, values[:, :, -kept:].to(self.dtype))
        self.pos = total
        return keys, values, context


class KrauseWindowCache(RingKVCache):
    """Decoding cache of one causal-window Krause layer (constant memory and step cost).

    ``attend`` with one token scores its query against the buffer directly (O(W D));
    with several tokens (prefill, or extending a prompt) it runs the linear-time causal
    op over [up to W-1 kept past keys, new keys].
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, window, top_k, device=None, dtype=None):
        super().__init__(batch_size, num_kv_heads, head_dim, window, device, dtype)
        self.top_k = V.check_positive_int("top_k", top_k)

    def attend(self, q, k, v, log_sigma) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        h, t = self.check_inputs(q, k, v)
        log_sigma = V.check_log_sigma(log_sigma, h, q)
        keys, values, context = self.window_update(k, v)
        if t == 1:
            return _krause_decode(q, keys, values, log_sigma, self.top_k)
        # The op needs one query per key: the context positions get dummy queries whose
        # outputs are dropped.
        queries = torch.cat([q.new_zeros(*q.shape[:2], context, q.shape[3]), q], dim=2)
        out = causal_krause_attention(queries, keys, values, log_sigma, self.window, self.top_k)
        return out[:, :, context:]


class SlidingWindowCache(RingKVCache):
    """Decoding cache of causal sliding-window softmax attention (constant memory)."""

    def attend(self, q, k, v, scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        _, t = self.check_inputs(q, k, v)
        keys, values, context = self.window_update(k, v)
        mask = None
        if t > 1:  # new query i sits at context + i and sees keys in (context + i - W, context + i]
            query_pos = torch.arange(context, context + t, device=q.device)[:, None]
            key_pos = torch.arange(keys.shape[2], device=q.device)[None, :]
            mask = (key_pos <= query_pos) & (key_pos > query_pos - self.window)
        return F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=True
        )


def _krause_decode(q, keys, values, log_sigma, top_k: int) -> torch.Tensor:
    """Krause attention of single queries q (B, H, 1, D) over all of keys/values (B, Hkv, n, D).

    GQA without copying keys: the query heads of one kv group are batched against it.
    Distances in fp32, clamped at 0; the min(top_k, n) nearest keys are softmaxed.
    """
    b, h, _, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    group = h // hkv
    qf = q.float().reshape(b, hkv, group, d)
    kf, vf = keys.float(), values.float()
    dots = qf @ kf.transpose(-1, -2)  # (B, Hkv, G, n)
    dist = (qf.pow(2).sum(-1, keepdim=True) + kf.pow(2).sum(-1)[:, :, None, :] - 2.0 * dots).clamp_min(0.0)
    coef = 0.5 * torch.exp(-2.0 * log_sigma.float())
    coef = coef.reshape(1, hkv, group, 1) if coef.dim() == 1 else coef
    logits = dist * -coef
    if top_k < n:
        nearest = dist.topk(top_k, dim=-1, largest=False, sorted=False).indices
        keep = torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, nearest, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs @ vf).reshape(b, h, 1, d).to(q.dtype)


class StandardKVCache(_LayerCache):
    """Growing key/value cache for causal softmax attention (the twin of KrauseWindowCache).

    Storage doubles when full, so appending is amortised O(1) copies per token; a step
    still costs O(pos) like any softmax decoder.
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, device=None, dtype=None, capacity: int = 256):
        super().__init__(batch_size, num_kv_heads, head_dim, device, dtype)
        V.check_positive_int("capacity", capacity)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)

    @property
    def num_cached(self) -> int:
        return self.pos

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.pos], self.values[:, :, : self.pos]

    def _reserve(self, length: int) -> None:
        capacity = self.keys.shape[2]
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        grow = (0, 0, 0, capacity - self.keys.shape[2])
        self.keys, self.values = F.pad(self.keys, grow), F.pad(self.values, grow)

    def update(self, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the keys/values (B, Hkv, T, D) of T new tokens; returns every cached one."""
        start, end = self.pos, self.pos + k.shape[2]
        self._reserve(end)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.pos = end
        return self.past()

    def attend(self, q, k, v, scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) of the next T tokens -> their outputs (B, H, T, D)."""
        _, t = self.check_inputs(q, k, v)
        start = self.pos
        keys, values = self.update(k, v)
        end = self.pos
        mask, causal = None, False
        if t > 1 and start == 0:
            causal = True
        elif t > 1:  # new query i sits at start + i and sees keys 0..start + i
            positions = torch.arange(end, device=q.device)
            mask = positions[None, :] <= positions[start:, None]
        return F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
            scale=scale, enable_gqa=True,
        )
