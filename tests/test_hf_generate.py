"""generate() on patched models: the Krause cache layer inside generate's own cache gives
exactly the tokens of uncached decoding (greedy past the window, left-padded batches, beam
search, sampling with several sequences) and holds only the last W keys per layer."""

from __future__ import annotations

import pytest
import torch

import krause.hf
from krause.cache import WindowCacheLayer
from krause.hf.cache import KrauseCacheLayer, krause_cache_layer
from krause.hf.patch import patched_attention_modules
from lora_llms.testing import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

VOCAB = 96
WINDOW = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_models")
    out = {}
    for kind, mix in (("llama", "gated"), ("qwen2", "gated"), ("llama", "krause")):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config(kind, VOCAB)).save_pretrained(root / kind)
        model = AutoModelForCausalLM.from_pretrained(root / kind, dtype=torch.float32).eval()
        krause.hf.patch_model(model, mix=mix, window=WINDOW, top_k=2)
        if mix == "gated":
            with torch.no_grad():  # an even gate, so both branches steer the tokens
                for attn in patched_attention_modules(model):
                    attn.krause_gate.proj.bias.zero_()
        out[(kind, mix)] = model
    return out


def prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 3, 0  # row 1 is left-padded
    return ids, mask


COMMON = dict(pad_token_id=3, eos_token_id=None)


@pytest.mark.parametrize("key", [("llama", "gated"), ("qwen2", "gated"), ("llama", "krause")])
def test_greedy_cached_equals_uncached_past_the_window(models, key):
    model = models[key]
    ids, mask = prompts()
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, **COMMON)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False,
                                  use_cache=False, **COMMON)
        # the left-padded row decodes exactly as the same prompt without padding
        alone = model.generate(ids[1:, 3:], max_new_tokens=3 * WINDOW, do_sample=False, **COMMON)
        # and a hand-written uncached loop over full forwards agrees too
        seq = ids[:1]
        for _ in range(3 * WINDOW):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1, 9:], alone[0, 6:])
    assert torch.equal(cached[0], seq[0])


@pytest.mark.parametrize("key", [("llama", "gated"), ("qwen2", "gated"), ("llama", "krause")])
def test_chunked_prefill_with_left_padding_equals_the_uncached_forward(models, key):
    """Steps of 1-4 tokens after a past (chunked prefill, speculative verification), rows
    left-padded by different amounts: every real position's logits equal one uncached forward."""
    model = models[key]
    g = torch.Generator().manual_seed(7)
    for trial in range(4):
        batch, length = 3, 11 + trial
        ids = torch.randint(4, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row, pad in enumerate((0, 2 + trial, length - 3)):  # the last row: 3 real tokens
            ids[row, :pad], mask[row, :pad] = 3, 0
        chunks = torch.randint(1, 5, (length,), generator=g).tolist()
        with torch.no_grad():
            full = model(ids, attention_mask=mask, use_cache=False).logits
            cache, pos, steps = DynamicCache(config=model.config), 0, []
            for n in chunks:
                if pos >= length:
                    break
                steps.append(model(ids[:, pos:pos + n], attention_mask=mask[:, :pos + n], past_key_values=cache).logits)
                pos += n
        assert len(steps) > 2 and max(s.shape[1] for s in steps) > 1, chunks  # several multi-token steps
        real = mask.bool()
        torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-4, atol=1e-5)


def test_beam_search_and_sampling_match_uncached(models):
    model = models[("llama", "gated")]
    ids, mask = prompts()
    with torch.no_grad():
        beams = [model.generate(ids, attention_mask=mask, max_new_tokens=2 * WINDOW, num_beams=3,
                                num_return_sequences=2, do_sample=False, use_cache=c, **COMMON) for c in (True, False)]
        samples = []
        for use_cache in (True, False):
            torch.manual_seed(11)
            samples.append(model.generate(ids, attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=True,
                                          top_k=0, num_return_sequences=2, use_cache=use_cache, **COMMON))
    assert beams[0].shape == (4, 9 + 2 * WINDOW)
    assert torch.equal(beams[0], beams[1])
    assert samples[0].shape == (4, 9 + 2 * WINDOW)
    assert torch.equal(samples[0], samples[1])


def test_cache_keeps_only_the_window(models):
    model = models[("qwen2", "gated")]
    ids, mask = prompts()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, past_key_values=cache,
                             return_dict_in_generate=True, **COMMON)
    layers = out.past_key_values.layers
    assert all(isinstance(layer, KrauseCacheLayer) for layer in layers)
    total = ids.shape[1] + 20 - 1  # the last token is never fed back
    for layer in layers:
        assert layer.krause.keys.shape[-2] == WINDOW  # constant memory in T
        assert layer.krause_seen == total
        assert layer.get_seq_length() == total  # the standard branch keeps its full cache
        assert layer.keys.shape[-2] == total


def _window(batch=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    win = WindowCacheLayer(4)
    k = torch.randn(batch, 2, t, 8, generator=g)
    valid = torch.ones(batch, t, dtype=torch.bool)
    valid[0, :2] = False
    keys, values, flags = win.append(k, k + 1, valid)
    assert torch.equal(keys, k) and torch.equal(flags, valid)
    return win, k


def test_window_reorder_select_repeat_crop_reset():
    win, k = _window()
    assert win.keys.shape == (3, 2, 4, 8) and win.seen == 6 and win.has_padding
    torch.testing.assert_close(win.keys, k[:, :, -4:])
    win.reorder_cache(torch.tensor([2, 0, 0]))
    torch.testing.assert_close(win.keys[1], k[0, :, -4:])
    win.batch_select_indices(torch.tensor([True, False, True]))
    assert win.keys.shape[0] == 2
    win.batch_repeat_interleave(2)
    assert win.keys.shape[0] == 4
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        win.crop(-1)  # the window already dropped the key needed after the rollback
    win.reset()
    assert win.keys is None and win.seen == 0 and not win.has_padding
    win.activate_past_recording()  # assisted decoding: rollback possible
    win.append(k, k, None)
    win.crop(-2)
    assert win.seen == 4 and win.keys.shape[-2] == 4
    torch.testing.assert_close(win.keys, k[:, :, :4])
    with pytest.raises(ValueError, match="tokens_to_remove"):
        win.crop(3)


def test_cache_layer_forwards_to_both_parts():
    cache = DynamicCache()
    layer = krause_cache_layer(cache, 1, window=3)
    assert isinstance(cache.layers[1], KrauseCacheLayer) and krause_cache_layer(cache, 1, window=3) is layer
    k = torch.randn(2, 2, 5, 4)
    cache.update(k, k, 1)  # the standard branch's usual call
    layer.update_krause(k, k)
    assert cache.get_seq_length(1) == 5 and layer.krause.keys.shape[-2] == 3
    cache.reorder_cache(torch.tensor([1, 1]))
    torch.testing.assert_close(layer.keys[0], k[1])
    torch.testing.assert_close(layer.krause.keys[0], k[1, :, -3:])
    cache.batch_select_indices(torch.tensor([0]))
    assert layer.keys.shape[0] == 1 and layer.krause.keys.shape[0] == 1
    cache.reset()
    assert cache.get_seq_length(1) == 0 and layer.krause_seen == 0
    with pytest.raises(ValueError, match="window"):
        krause_cache_layer(cache, 1, window=5)
    full = DynamicCache()
    full.update(k, k, 0)
    with pytest.raises(ValueError, match="already holds"):
        krause_cache_layer(full, 0, window=3)
    with pytest.raises(ValueError, match="Cache"):
        krause_cache_layer(((k, k),), 0, window=3)


def test_static_cache_wraps_too(models):
    model = models[("llama", "gated")]
    ids, mask = prompts()
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=False, **COMMON)
        static = model.generate(ids, attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=False,
                                cache_implementation="static", **COMMON)
    assert torch.equal(dynamic, static)
