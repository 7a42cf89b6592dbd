"""Decoding caches (krause.cache, one contract on transformers' cache layers): incremental
outputs equal the full causal forward; the Krause window keeps O(W) memory and constant
work per step; crop, beam reorder and batch selection equal recomputation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import krause
from krause.cache import GatedCacheLayer, KrauseWindowLayer, KVCacheLayer, WindowCacheLayer
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
    assert start == x.shape[1] and cache.seen == x.shape[1]
    return torch.cat(outs, dim=1), cache


def _knobs(cls, window, top_k):
    """The constructor knobs of a causal module: Krause takes both, the baselines their own."""
    return {CausalKrauseAttention: dict(window=window, top_k=top_k), SlidingWindowAttention: dict(window=window),
            TopKAttention: dict(top_k=top_k)}[cls]


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
    cache = KrauseWindowLayer(w, top_k)
    got = torch.cat([cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], log_sigma)
                     for i in range(t)], dim=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_krause_cache_keeps_the_last_window_in_order():
    w = 5
    cache = KrauseWindowLayer(w, top_k=2)
    k = torch.arange(26.0).view(1, 1, 13, 2)
    with torch.no_grad():
        cache.attend(k[:, :, :4], k[:, :, :4], k[:, :, :4], 0.0)
        torch.testing.assert_close(cache.keys, k[:, :, :4])
        for i in range(4, 11):
            cache.attend(k[:, :, i:i + 1], k[:, :, i:i + 1], k[:, :, i:i + 1], 0.0)
        cache.attend(k[:, :, 11:], k[:, :, 11:], k[:, :, 11:], 0.0)
    torch.testing.assert_close(cache.keys, k[:, :, -w:])
    torch.testing.assert_close(cache.values, k[:, :, -w:])


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
def test_window_cache_memory_is_o_window_and_step_work_constant(cls):
    w = 8
    mod = cls(16, 4, 2, **_knobs(cls, window=w, top_k=3))
    cache = mod.new_cache(2)

    def step_work():
        counter = _WorkCounter()
        with torch.no_grad(), counter:
            mod(_randn(2, 1, 16, seed=cache.seen), cache)
        return counter.elements, counter.largest

    with torch.no_grad():
        mod(_randn(2, 20, 16, seed=99), cache)  # a prefill longer than the window, then many single steps
    assert cache.keys.shape == cache.values.shape == (2, 2, w, 4)
    assert cache.nbytes == 2 * 2 * 2 * w * 4 * 4  # a copy of the prefill's last W: keys + values, (B, Hkv, W, D) fp32
    early = step_work()
    longest = 0
    with torch.no_grad():
        for i in range(300):
            mod(_randn(2, 1, 16, seed=i), cache)
            longest = max(longest, cache.keys.shape[2], cache.values.shape[2], cache.valid.shape[1])
    late = step_work()
    assert cache.seen == 20 + 1 + 300 + 1
    assert longest == w  # the cache's key length never exceeds the window
    assert early == late
    assert cache.nbytes == 2 * 2 * 2 * (w + 1) * 4 * 4  # a view of the last step's W + 1 keys (and values)


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
    cache = KrauseWindowLayer(window=4, top_k=2)
    cache.attend(_randn(2, 4, 1, 4), _randn(2, 2, 1, 4), _randn(2, 2, 1, 4), 0.0)
    q = _randn(1, 4, 1, 4)
    kv = _randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match="^key_states batch size 1 does not match the cache's 2"):
        cache.attend(q, kv, kv, 0.0)
    with pytest.raises(ValueError, match="heads"):
        cache.attend(_randn(2, 4, 1, 4), _randn(2, 1, 1, 4), _randn(2, 1, 1, 4), 0.0)
    with pytest.raises(ValueError, match="^window must be"):
        KrauseWindowLayer(window=0, top_k=2)
    with pytest.raises(ValueError, match="^top_k must be"):
        KrauseWindowLayer(window=2, top_k=0)


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
    assert cache.keys.shape[2] == 23 and cache.capacity >= 23


def test_standard_cache_grows_from_a_small_capacity():
    q, k, v = _randn(1, 2, 10, 4, seed=7), _randn(1, 2, 10, 4, seed=8), _randn(1, 2, 10, 4, seed=9)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    cache = KVCacheLayer(capacity=2)
    got = torch.cat([cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(10)], 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert cache.capacity == 16 and cache.get_seq_length() == 10
    torch.testing.assert_close(cache.keys, k)


def test_gated_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    mod = GatedKrauseAttention(32, 4, 2, window=4, top_k=2)
    x = _randn(2, 14, 32, seed=10)
    full = mod(x)
    for chunks in ([1] * 14, [6] + [1] * 8, [2, 5, 7]):
        out, cache = _decode(mod, x, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL)
    assert isinstance(cache, GatedCacheLayer)
    assert cache.standard.seen == cache.krause.seen == cache.get_seq_length() == 14
    assert cache.standard.keys.shape[2] == 14 and cache.krause.keys.shape[2] == 4


@pytest.mark.parametrize("cls", [SlidingWindowAttention, TopKAttention])
@pytest.mark.parametrize("name", ["window_lt_T", "topk_ge_window_gqa", "gqa_batch"])
def test_baseline_caches_decoding_equals_full_forward(cls, name):
    b, h, hkv, w, top_k, t = CONFIGS[name]
    torch.manual_seed(0)
    mod = cls(8 * h, h, hkv, **_knobs(cls, window=w, top_k=top_k))
    x = _randn(b, t, 8 * h, seed=11)
    full = mod(x)
    for schedule, chunks in _schedules(t, w).items():
        out, _ = _decode(mod, x, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL, msg=f"{name}/{schedule}")


# ----------------------------------------------------------------------------- padding, beams
PADDED_MODULES = {
    "krause_gqa": lambda: CausalKrauseAttention(32, 4, 2, window=4, top_k=2, sigma=1.0),
    "krause_topk_ge_window": lambda: CausalKrauseAttention(32, 4, 1, window=3, top_k=8, sigma=1.0),
    "sliding_window": lambda: SlidingWindowAttention(32, 4, 2, window=4),
    "standard": lambda: CausalSelfAttention(32, 4, 2),
    "topk": lambda: TopKAttention(32, 4, 2, top_k=3),
    "gated": lambda: GatedKrauseAttention(32, 4, 2, window=4, top_k=2),
}


def _decode_masked(mod, x, mask, chunks):
    """Feeds x (B, T, C) with its (B, T) padding mask through a fresh cache in chunks."""
    cache = mod.new_cache(x.shape[0])
    outs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            outs.append(mod(x[:, start:start + size], cache, key_padding_mask=mask[:, start:start + size]))
            start += size
    return torch.cat(outs, dim=1), cache


def _left_padded(lengths, t, seed):
    """Rows of the given real lengths, left-padded with junk to t tokens; returns (x, mask)."""
    x = _randn(len(lengths), t, 32, seed=seed)
    mask = torch.arange(t)[None, :] >= (t - torch.tensor(lengths))[:, None]
    return x, mask


@pytest.mark.parametrize("name", sorted(PADDED_MODULES))
def test_left_padded_batch_decodes_like_each_row_alone(name):
    torch.manual_seed(0)
    mod = PADDED_MODULES[name]()
    lengths, t = [11, 7, 3], 11
    x, mask = _left_padded(lengths, t, seed=20)
    with torch.no_grad():
        full_masked = mod(x, key_padding_mask=mask)
    for schedule, chunks in _schedules(t, 4).items():
        out, cache = _decode_masked(mod, x, mask, chunks)
        assert cache.seen == t
        for row, n in enumerate(lengths):
            alone, _ = _decode(mod, x[row:row + 1, t - n:], [1] * n)
            torch.testing.assert_close(out[row:row + 1, t - n:], alone, rtol=0, atol=ATOL, msg=f"{schedule}/{row}")
            torch.testing.assert_close(full_masked[row:row + 1, t - n:], alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", sorted(PADDED_MODULES))
def test_any_padding_pattern_decodes_like_the_masked_full_forward(name):
    # Finished rows fed padding mid-sequence, a row that starts with padding, a fully real row.
    torch.manual_seed(0)
    mod = PADDED_MODULES[name]()
    t = 13
    x = _randn(3, t, 32, seed=21)
    mask = torch.rand(3, t, generator=torch.Generator().manual_seed(22)) > 0.35
    mask[2] = True
    mask[1, :3] = False
    with torch.no_grad():
        full = mod(x, key_padding_mask=mask)
    assert torch.isfinite(full).all()
    for schedule, chunks in _schedules(t, 4).items():
        out, _ = _decode_masked(mod, x, mask, chunks)
        torch.testing.assert_close(out, full, rtol=0, atol=ATOL, msg=schedule)


@pytest.mark.parametrize("name", sorted(PADDED_MODULES))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_beam_reorder_and_select_equal_recomputation(name, padded):
    torch.manual_seed(0)
    mod = PADDED_MODULES[name]()
    prefix, more = 7, 5
    x, mask = _left_padded([7, 4, 2], prefix, seed=23) if padded else (_randn(3, prefix, 32, seed=23), None)
    mask = torch.ones(3, prefix, dtype=torch.bool) if mask is None else mask
    for op, index in (("reorder_cache", torch.tensor([2, 0, 0, 1])), ("reorder_cache", torch.tensor([1])),
                      ("batch_select_indices", torch.tensor([True, False, True])),
                      ("batch_select_indices", torch.tensor([2, 1]))):
        rows = index.nonzero().flatten() if index.dtype == torch.bool else index
        y = _randn(len(rows), more, 32, seed=24)
        _, cache = _decode_masked(mod, x, mask, [3, 1, 1, 2])
        getattr(cache, op)(index)
        with torch.no_grad():
            got = torch.cat([mod(y[:, i:i + 1], cache) for i in range(more)], dim=1)
            whole_mask = torch.cat([mask[rows], torch.ones(len(rows), more, dtype=torch.bool)], dim=1)
            expected = mod(torch.cat([x[rows], y], dim=1), key_padding_mask=whole_mask)[:, prefix:]
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL, msg=f"{op} {index.tolist()}")
        assert cache.get_seq_length() == prefix + more


def test_reorder_and_select_reject_bad_indices():
    cache = KrauseWindowLayer(window=4, top_k=2)
    cache.append(_randn(3, 2, 5, 4), _randn(3, 2, 5, 4))
    with pytest.raises(ValueError, match="^beam_idx holds rows 0..3"):
        cache.reorder_cache(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="^beam_idx holds rows -1"):
        cache.reorder_cache(torch.tensor([-1]))
    with pytest.raises(ValueError, match="^beam_idx must be a 1-D integer"):
        cache.reorder_cache(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="^indices must not repeat"):
        cache.batch_select_indices(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"^indices as a bool mask must have shape \(3,\)"):
        cache.batch_select_indices(torch.tensor([True, False]))
    full = KVCacheLayer()
    full.append(_randn(2, 2, 3, 4), _randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match="^indices must select at least one row"):
        full.batch_select_indices(torch.tensor([False, False]))
    assert cache.batch_size == 3 and cache.keys.shape[0] == 3


def test_caches_reject_bad_padding_masks_and_sizes():
    cache = KrauseWindowLayer(window=4, top_k=2)
    q, kv = _randn(2, 4, 3, 4), _randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match=r"^key_padding_mask must have shape \(2, 3\)"):
        cache.attend(q, kv, kv, 0.0, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^key_padding_mask must be a bool tensor"):
        cache.attend(q, kv, kv, 0.0, key_padding_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="^capacity"):
        KVCacheLayer(capacity=0)
    with pytest.raises(ValueError, match="^tokens_to_remove must be an int <= 0"):
        cache.crop(2)
    with pytest.raises(ValueError, match="^tokens_to_remove: cannot drop 1 tokens from a cache holding 0"):
        KVCacheLayer().crop(-1)


def test_padded_chunks_match_the_reference_op():
    b, h, hkv, w, top_k, t = 2, 4, 2, 5, 3, 24
    q, k, v = _randn(b, h, t, 4, seed=30), _randn(b, hkv, t, 4, seed=31), _randn(b, hkv, t, 4, seed=32)
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(33)) > 0.3
    log_sigma = torch.linspace(-0.2, 0.6, h)
    expected = krause.causal_krause_attention_reference(q, k, v, log_sigma, w, top_k, key_padding_mask=mask)
    cache = KrauseWindowLayer(w, top_k)
    got, start = [], 0
    for size in [4, 1, 1, 6, 1, 1, 1, 7, 1, 1]:
        sl = slice(start, start + size)
        got.append(cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], log_sigma, key_padding_mask=mask[:, sl]))
        start += size
        assert cache.keys.shape[2] <= w
    torch.testing.assert_close(torch.cat(got, 2), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(cache.valid, mask[:, -w:])


def test_padding_first_given_after_unpadded_steps():
    """Unpadded steps keep an all-True validity without rebuilding it; the first padded call
    (after a batch reorder too) still sees every earlier token as real."""
    b, h, hkv, w, top_k, t = 2, 4, 2, 5, 3, 20
    q, k, v = _randn(b, h, t, 4, seed=40), _randn(b, hkv, t, 4, seed=41), _randn(b, hkv, t, 4, seed=42)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 14:17] = False
    mask[0, 16] = False
    log_sigma = torch.linspace(-0.2, 0.6, h)
    expected = krause.causal_krause_attention_reference(q, k, v, log_sigma, w, top_k, key_padding_mask=mask)
    cache = KrauseWindowLayer(w, top_k)
    got, start = [], 0
    for size in [3, 1, 1, 6, 1, 1, 1, 3, 1, 1, 1]:
        sl = slice(start, start + size)
        padding = mask[:, sl] if start >= 14 else None
        got.append(cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], log_sigma, key_padding_mask=padding))
        start += size
        assert cache.valid.shape == (b, min(start, w))
        assert cache.has_padding == (start > 14)
        if start < 14:
            assert cache.valid.all()
    torch.testing.assert_close(torch.cat(got, 2), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(cache.valid, mask[:, -w:])

    fresh = KrauseWindowLayer(w, top_k)
    fresh.append(k[:, :, :7], v[:, :, :7])
    fresh.reorder_cache(torch.tensor([1, 0, 0]))  # three rows now: the all-True validity follows
    fresh.append(k[[1, 0, 0], :, 7:8], v[[1, 0, 0], :, 7:8])
    assert fresh.valid.shape == (3, w) and fresh.valid.all()
    _, _, padding = fresh.append(k[[1, 0, 0], :, 8:9], v[[1, 0, 0], :, 8:9], torch.tensor([[True], [False], [True]]))
    assert padding.tolist() == [[True] * w + [True], [True] * w + [False], [True] * w + [True]]


@pytest.mark.parametrize("cls", [CausalKrauseAttention, SlidingWindowAttention])
def test_padded_steps_keep_memory_and_work_constant(cls):
    mod = cls(16, 4, 2, **_knobs(cls, window=8, top_k=3))
    cache = mod.new_cache(2)
    step_mask = torch.tensor([[True], [False]])

    def step_work():
        counter = _WorkCounter()
        with torch.no_grad(), counter:
            mod(_randn(2, 1, 16, seed=cache.seen), cache, key_padding_mask=step_mask)
        return counter.elements, counter.largest

    with torch.no_grad():
        mod(_randn(2, 12, 16, seed=98), cache, key_padding_mask=torch.arange(12)[None].expand(2, 12) >= 3)
    early = step_work()
    with torch.no_grad():
        for i in range(100):
            mod(_randn(2, 1, 16, seed=i), cache, key_padding_mask=step_mask)
    assert step_work() == early
    assert cache.keys.shape[2] == 8 and cache.valid.tolist() == [[True] * 8, [False] * 8]


# ----------------------------------------------------------------------------- crop, transformers' Cache
@pytest.mark.parametrize("name", sorted(PADDED_MODULES))
def test_crop_then_decode_equals_recomputation(name):
    """Assisted decoding's rollback: drop the last tokens, feed others, get the full forward's outputs."""
    torch.manual_seed(0)
    mod = PADDED_MODULES[name]()
    x, y = _randn(2, 9, 32, seed=40), _randn(2, 4, 32, seed=41)
    cache = mod.new_cache(2)
    if hasattr(cache, "activate_past_recording"):  # window layers keep everything until the crop
        cache.activate_past_recording()
    window = getattr(cache, "krause", cache)
    with torch.no_grad():
        mod(x, cache)
        cache.crop(-3)  # forget x[:, 6:]
        assert cache.get_seq_length() == 6
        if isinstance(window, WindowCacheLayer):
            assert window.keys.shape[2] == window.window  # crop trims a recording window back
        got = torch.cat([mod(y[:, i:i + 1], cache) for i in range(4)], dim=1)
        expected = mod(torch.cat([x[:, :6], y], dim=1))[:, 6:]
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_window_crop_without_recording_refuses_past_the_window():
    cache = WindowCacheLayer(4)
    k = _randn(1, 2, 6, 4)
    cache.append(k, k)
    cache.crop(0)  # nothing to drop: fine
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-1)
    short = WindowCacheLayer(8)
    short.append(k, k)  # fewer tokens than the window: everything is still there
    short.crop(-2)
    assert short.seen == 4
    torch.testing.assert_close(short.keys, k[:, :, :4])


def test_layers_serve_a_transformers_cache():
    from transformers.cache_utils import DynamicCache

    from krause.cache import install_layers

    torch.manual_seed(0)
    mods = [GatedKrauseAttention(32, 4, 2, window=3, top_k=2), CausalKrauseAttention(32, 4, 2, window=3, top_k=2)]
    cache = DynamicCache()
    layers = install_layers(cache, lambda: [m.new_cache() for m in mods])
    assert install_layers(cache, lambda: []) is layers  # a filled cache keeps its layers
    x = _randn(2, 7, 32, seed=42)
    with torch.no_grad():
        for m, layer in zip(mods, layers):
            m(x, layer)
    assert cache.get_seq_length() == 7 and cache.batch_size == 2
    before = [layers[0].standard.keys.clone(), layers[0].krause.keys.clone(), layers[1].keys.clone()]
    cache.batch_repeat_interleave(2)  # rows 0 0 1 1
    cache.reorder_cache(torch.tensor([3, 0, 1, 2]))  # rows 1 0 0 1
    cache.batch_select_indices(torch.tensor([0, 2]))  # rows 1 0
    after = [layers[0].standard.keys, layers[0].krause.keys, layers[1].keys]
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old[[1, 0]], rtol=0, atol=0)
    cache.crop(0)
    cache.reset()
    assert cache.get_seq_length() == 0 and layers[0].krause.keys is None
    used = DynamicCache()
    used.update(_randn(1, 2, 3, 4), _randn(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="already holds tokens"):
        install_layers(used, lambda: [m.new_cache() for m in mods])
    with pytest.raises(ValueError, match="must be a transformers Cache"):
        install_layers([], lambda: [])


@pytest.mark.parametrize("impl", ["reference", "fast", "engine"])
def test_a_nan_key_poisons_decoding_while_in_the_window_only(impl):
    """The NaN policy through the decoding cache: a NaN key of token 4 makes every step NaN
    while token 4 is in the window and no step after it slides out; a NaN in a padded
    token's value never shows; a NaN query makes its own head's row NaN for that step."""
    from krause import cpu

    b, h, hkv, d, window, top_k, steps = 2, 2, 1, 8, 3, 2, 10
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, steps, d, generator=g) for n in (h, hkv, hkv))
    k[0, 0, 4, 1] = float("nan")
    v[1, 0, 0, 2] = float("inf")  # row 1's token 0 is padding
    q[1, 1, 7, 0] = float("nan")
    valid = torch.ones(b, steps, dtype=torch.bool)
    valid[1, 0] = False
    cache = KrauseWindowLayer(window, top_k, impl="fast" if impl == "engine" else impl)
    with cpu.use_engine(impl == "engine"):
        outs = [cache.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.3,
                             key_padding_mask=valid[:, t:t + 1]) for t in range(steps)]
    out = torch.cat(outs, dim=2)  # (B, H, steps, D)
    nan_rows = out.isnan().any(-1)
    assert (out.isnan() == nan_rows[..., None]).all()  # whole rows or nothing
    want = torch.zeros(b, h, steps, dtype=torch.bool)
    want[0, :, 4:4 + window] = True  # token 4 is a candidate of steps 4, 5, 6
    want[1, 1, 7] = True
    assert torch.equal(nan_rows, want)
