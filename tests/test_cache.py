"""Decoding caches: incremental outputs equal the full causal forward; the Krause ring
buffer keeps constant memory and constant work per step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import krause
from krause.cache import KrauseWindowCache, StandardKVCache
from krause.nn import (
    CausalKrauseAttention,
    CausalSelfAttention,
    GatedKrauseAttention,
    SlidingWindowAttention,
    TopKAttention,
)

ATOL = 1e-5


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _decode(mod, x, chunks):
    """Feeds x (B, T, C) through a fresh cache in chunks of the given sizes."""
    cache = mod.new_cache(x.shape[0])
    outs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            outs.append(mod(x[:, start:start + size], cache))
            start += size
    assert start == x.shape[1] and cache.pos == x.shape[1]
    return torch.cat(outs, dim=1), cache


# (batch, heads, kv heads, window, top_k, tokens)
CONFIGS = {
    "window_lt_T": (2, 4, 4, 4, 2, 13),
    "T_lt_window": (1, 2, 2, 16, 5, 9),
    "topk_ge_window_gqa": (2, 4, 1, 3, 8, 10),
    "gqa_batch": (3, 6, 2, 5, 3, 17),
    "window_1": (1, 2, 2, 1, 1, 5),
}


def _schedules(t, w):
    """Token-by-token, prefill then steps, and ragged chunks crossing ring wrap-arounds."""
    prefill = min(t - 1, w + 2) if t > 1 else 1
    ragged, left, size = [], t, 1
    while left:
        ragged.append(min(size, left))
        left -= ragged[-1]
        size = size % 4 + 2
    return {"steps": [1] * t, "prefill_then_steps": [prefill] + [1] * (t - prefill), "ragged": ragged}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_krause_cache_decoding_equals_full_forward(name):
    b, h, hkv, w, top_k, t = CONFIGS[name]
    torch.manual_seed(0)
    mod = CausalKrauseAttention(8 * h, h, hkv, window=w, top_k=top_k, sigma=1.0)
    with torch.no_grad():
        mod.log_sigma.copy_(torch.linspace(-0.4, 0.4, h))
    x = _randn(b, t, 8 * h, seed=1)
    full = mod(x)
    for schedule, chunks in _schedules(t, w).items():
        out, _ = _decode(mod, x, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL, msg=f"{name}/{schedule}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_krause_cache_functional_matches_reference_op(name):
    b, h, hkv, w, top_k, t = CONFIGS[name]
    q, k, v = _randn(b, h, t, 4, seed=2), _randn(b, hkv, t, 4, seed=3), _randn(b, hkv, t, 4, seed=4)
    log_sigma = torch.linspace(-0.2, 0.6, h)
    expected = krause.causal_krause_attention_reference(q, k, v, log_sigma, w, top_k)
    cache = KrauseWindowCache(b, hkv, 4, w, top_k)
    got = torch.cat([cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], log_sigma)
                     for i in range(t)], dim=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_krause_cache_keeps_the_last_window_in_order():
    w = 5
    cache = KrauseWindowCache(1, 1, 2, w, top_k=2)
    k = torch.arange(26.0).view(1, 1, 13, 2)
    with torch.no_grad():
        cache.attend(k[:, :, :4], k[:, :, :4], k[:, :, :4], 0.0)
        keys, _ = cache.past()
        torch.testing.assert_close(keys, k[:, :, :4])
        for i in range(4, 11):
            cache.attend(k[:, :, i:i + 1], k[:, :, i:i + 1], k[:, :, i:i + 1], 0.0)
        cache.attend(k[:, :, 11:], k[:, :, 11:], k[:, :, 11:], 0.0)
    keys, values = cache.past()
    torch.testing.assert_close(keys, k[:, :, -w:])
    torch.testing.assert_close(values, k[:, :, -w:])


class _WorkCounter(TorchDispatchMode):
    """Sums the elements of every tensor the dispatched ops produce: a proxy for work done."""

    def __init__(self):
        super().__init__()
        self.elements = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("cls", [CausalKrauseAttention, SlidingWindowAttention])
def test_ring_cache_memory_and_step_work_are_constant(cls):
    mod = cls(16, 4, 2, window=8, top_k=3)
    cache = mod.new_cache(2)
    shapes = (cache.keys.shape, cache.values.shape)
    pointers = (cache.keys.data_ptr(), cache.values.data_ptr())
    nbytes = cache.nbytes
    assert nbytes == 2 * 2 * 2 * 8 * 4 * 4  # keys + values, (B, Hkv, W, D) fp32

    def step_work():
        counter = _WorkCounter()
        with torch.no_grad(), counter:
            mod(_randn(2, 1, 16, seed=cache.pos), cache)
        return counter.elements, counter.largest

    with torch.no_grad():
        mod(_randn(2, 20, 16, seed=99), cache)  # a prefill, then many single steps
    early = step_work()
    with torch.no_grad():
        for i in range(300):
            mod(_randn(2, 1, 16, seed=i), cache)
    late = step_work()
    assert cache.pos == 20 + 1 + 300 + 1
    assert early == late
    assert (cache.keys.shape, cache.values.shape) == shapes
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == pointers
    assert cache.nbytes == nbytes


def test_krause_cache_reset_and_inference_mode():
    torch.manual_seed(0)
    mod = CausalKrauseAttention(16, 2, window=4, top_k=2)
    x = _randn(1, 9, 16, seed=5)
    full = mod(x)
    cache = mod.new_cache(1)
    with torch.inference_mode():
        for _ in range(2):  # second round after reset must not see the first
            cache.reset()
            out = torch.cat([mod(x[:, i:i + 1], cache) for i in range(9)], 1)
            torch.testing.assert_close(out, full.detach(), rtol=0, atol=ATOL)


def test_krause_cache_rejects_mismatched_inputs():
    cache = KrauseWindowCache(2, 2, 4, window=4, top_k=2)
    q = _randn(1, 4, 1, 4)
    kv = _randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match="batch"):
        cache.attend(q, kv, kv, 0.0)
    with pytest.raises(ValueError, match="heads"):
        cache.attend(_randn(2, 4, 1, 4), _randn(2, 1, 1, 4), _randn(2, 1, 1, 4), 0.0)
    with pytest.raises(ValueError, match="window"):
        KrauseWindowCache(1, 1, 4, window=0, top_k=2)


def test_krause_cache_stores_in_its_own_dtype():
    mod = CausalKrauseAttention(16, 2, window=4, top_k=2)
    cache = mod.new_cache(1, dtype=torch.bfloat16)
    with torch.no_grad():
        out = mod(_randn(1, 6, 16), cache)
        out = mod(_randn(1, 1, 16), cache)
    assert cache.keys.dtype == torch.bfloat16 and out.dtype == torch.float32


@pytest.mark.parametrize("hkv", [4, 2])
def test_standard_cache_decoding_equals_full_forward(hkv):
    torch.manual_seed(0)
    mod = CausalSelfAttention(32, 4, hkv)
    x = _randn(2, 23, 32, seed=6)
    full = mod(x)
    for chunks in ([1] * 23, [7] + [1] * 16, [3, 5, 1, 9, 5]):
        out, cache = _decode(mod, x, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL)
    assert cache.keys.shape[2] >= 23


def test_standard_cache_grows_from_a_small_capacity():
    q, k, v = _randn(1, 2, 10, 4, seed=7), _randn(1, 2, 10, 4, seed=8), _randn(1, 2, 10, 4, seed=9)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    cache = StandardKVCache(1, 2, 4, capacity=2)
    got = torch.cat([cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(10)], 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert cache.keys.shape[2] == 16 and cache.num_cached == 10
    torch.testing.assert_close(cache.past()[0], k)


def test_gated_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    mod = GatedKrauseAttention(32, 4, 2, window=4, top_k=2)
    x = _randn(2, 14, 32, seed=10)
    full = mod(x)
    for chunks in ([1] * 14, [6] + [1] * 8, [2, 5, 7]):
        out, cache = _decode(mod, x, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL)
    assert cache.standard.pos == cache.krause.pos == 14


@pytest.mark.parametrize("cls", [SlidingWindowAttention, TopKAttention])
@pytest.mark.parametrize("name", ["window_lt_T", "topk_ge_window_gqa", "gqa_batch"])
def test_baseline_caches_decoding_equals_full_forward(cls, name):
    b, h, hkv, w, top_k, t = CONFIGS[name]
    torch.manual_seed(0)
    mod = cls(8 * h, h, hkv, window=w, top_k=top_k)
    x = _randn(b, t, 8 * h, seed=11)
    full = mod(x)
    for schedule, chunks in _schedules(t, w).items():
        out, _ = _decode(mod, x, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL, msg=f"{name}/{schedule}")
