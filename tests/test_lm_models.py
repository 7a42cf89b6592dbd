"""language_models_100m models: five attention kinds as transformers PreTrainedModels."""

from __future__ import annotations

import pytest
import torch

from language_models_100m import ATTENTIONS, build_model, model_config
from language_models_100m.params import count_parameters

VOCAB = 97


def tiny(attention, **kw):
    torch.manual_seed(0)
    return build_model("tiny", attention, vocab_size=VOCAB, dropout=0.0, **kw)


def expected_parameters(d, layers, ffn, positions, vocab, attention, heads):
    proj = 4 * (d * d + d)
    attn = {"gated": 2 * proj + (2 * d * 2 + 2) + heads, "krause": proj + heads}.get(attention, proj)
    block = attn + (d * ffn + ffn + ffn * d + d) + 4 * d
    return vocab * d + positions * d + layers * block + 2 * d


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_parameter_counts_follow_the_architecture(attention):
    assert count_parameters("100m", attention)["total"] == expected_parameters(768, 8, 2048, 1024, 50257, attention, 12)
    assert count_parameters("200m", attention)["total"] == expected_parameters(1024, 10, 3072, 1024, 50257,
                                                                                 attention, 16)


def test_presets_are_near_their_names():
    assert 95e6 < count_parameters("100m", "gated")["total"] < 110e6
    assert 190e6 < count_parameters("200m", "gated")["total"] < 210e6


def test_models_differ_in_attention_only():
    names = {a: {n for n, _ in tiny(a).named_parameters() if ".attn." not in n} for a in ATTENTIONS}
    assert all(v == names["standard"] for v in names.values())
    gated = tiny("gated").transformer.h[0].attn
    assert torch.allclose(torch.softmax(gated.gate.bias, 0), torch.tensor([0.8, 0.2]))
    assert torch.allclose(gated.krause.log_sigma.exp(), torch.full((2,), 2.5))


def test_weight_decay_skips_norms_biases_embeddings_and_sigma():
    from krause.training.optim import param_groups

    decay, no_decay = param_groups(tiny("gated"), 0.1)
    assert "transformer.wte.weight" in no_decay["param_names"] and "transformer.wpe.weight" in no_decay["param_names"]
    assert any(n.endswith("log_sigma") for n in no_decay["param_names"])
    assert all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "fc.weight",
                           "proj.weight", "gate.weight")) for n in decay["param_names"])
    # the paper preset (--preset paper, the first release) decays every parameter
    model = tiny("gated")
    decay, no_decay = param_groups(model, 0.1, decay_all=True)
    assert not no_decay["params"] and len(decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_trains_saves_loads_and_generates(attention, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(attention)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "KrauseLMForCausalLM" and loaded.config.attention == attention
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        assert torch.equal(loaded(x, use_cache=False).logits, full)
        # Cached decoding (prompt past the window, so the rings wrap) equals the full forward.
        out = loaded(x[:, :11], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(11, x.shape[1]):
            out = loaded(x[:, i:i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    greedy = loaded.generate(x[:1, :6], max_new_tokens=14, do_sample=False)  # 20 tokens: past the window of 8
    uncached = loaded.generate(x[:1, :6], max_new_tokens=14, do_sample=False, use_cache=False)
    assert greedy.shape == (1, 20) and torch.equal(greedy, uncached)


def test_krause_decoding_keeps_only_the_window():
    model = tiny("krause").eval()
    x = torch.randint(0, VOCAB, (1, 50))
    with torch.no_grad():
        out = model(x, use_cache=True)
    window = out.past_key_values.layers[0]
    assert window.keys.shape[2] == model.config.attn_window and window.seen == 50


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_build_model_of_a_config_keeps_its_attention(attention):
    """train.py builds ``build_model(cfg)``: the model is cfg's attention, not the default "gated"."""
    cfg = model_config("tiny", attention, vocab_size=VOCAB)
    assert build_model(cfg).config.attention == attention
    assert build_model(cfg.to_dict()).config.attention == attention
    assert build_model("tiny", vocab_size=VOCAB).config.attention == "gated"
    assert build_model(cfg, "krause").config.attention == "krause"


def test_bad_arguments_are_one_line_value_errors():
    with pytest.raises(ValueError, match="^attention 'flash' is not registered; registered names: gated, krause, "):
        build_model("tiny", "flash")
    with pytest.raises(ValueError, match="^attn_window must be >= 1, got 0$"):
        model_config("tiny", "krause", attn_window=0)
    with pytest.raises(ValueError, match="^widnow is not a Krause setting"):
        model_config("tiny", "krause", krause=dict(widnow=4))
    with pytest.raises(ValueError, match="^krause.radius: the language models do not read it"):
        model_config("tiny", "krause", krause=dict(radius=3))
    with pytest.raises(ValueError, match="config must be one of"):
        build_model("1b")
    with pytest.raises(ValueError, match="^n_head: n_embd 30 is not divisible by n_head 4$"):
        model_config("tiny", "gated", n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="^sigma must be"):
        model_config("tiny", "krause", sigma=-1.0)
    model = tiny("standard")
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 65, dtype=torch.long), use_cache=False)
    with pytest.raises(ValueError, match=r"^attention_mask must have shape \(2, 5\)"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]] * 2), use_cache=False)
    with pytest.raises(ValueError, match="^past_key_values must be a transformers Cache"):
        model(torch.zeros(1, 5, dtype=torch.long), past_key_values=[])
    padded = model.eval()(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
                   use_cache=True).past_key_values
    with pytest.raises(ValueError, match="^attention_mask is required: the cache holds padded rows"):
        model(torch.ones(2, 1, dtype=torch.long), past_key_values=padded)


@pytest.mark.parametrize("attention", ["gated", "krause"])
def test_beam_search_reorders_the_cache(attention):
    model = tiny(attention).eval()
    x = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(x, max_new_tokens=12, num_beams=3, do_sample=False)
    uncached = model.generate(x, max_new_tokens=12, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------- the krause.cache contract
PAD = 0


def _left_padded(rows):
    """A left-padded batch (ids, attention_mask) of the given prompts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (9, 4, 1)]


COMMON = dict(pad_token_id=PAD, eos_token_id=None)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_left_padded_batch_generates_like_each_row_alone(attention, mode):
    """Greedy and beam search over a left-padded batch give each row its own unpadded run
    (prompts of 9, 4 and 1 tokens, 10 new ones: the windows of 8 are passed)."""
    model = tiny(attention).eval()
    rows = _prompts()
    ids, mask = _left_padded(rows)
    kwargs = dict(do_sample=False, max_new_tokens=10, num_beams=1 if mode == "greedy" else 2, **COMMON)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], **kwargs)
            assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(r):]), i


@pytest.mark.slow
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_left_padded_batch_cached_equals_uncached(attention):
    model = tiny(attention).eval()
    ids, mask = _left_padded(_prompts())
    with torch.no_grad():
        for beams in (1, 3):
            kwargs = dict(do_sample=False, max_new_tokens=20, num_beams=beams, **COMMON)
            cached = model.generate(ids, attention_mask=mask, **kwargs)
            uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
            assert torch.equal(cached, uncached), beams


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padded_forward_equals_each_row_alone(attention):
    """The logits of a left-padded batch, cached or not, are each row's own logits."""
    model = tiny(attention).eval()
    rows = _prompts()
    ids, mask = _left_padded(rows)
    with torch.no_grad():
        uncached = model(ids, attention_mask=mask, use_cache=False).logits
        cached = model(ids, attention_mask=mask, use_cache=True).logits
        for i, r in enumerate(rows):
            alone = model(r[None], use_cache=False).logits[0]
            torch.testing.assert_close(uncached[i, -len(r):], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached[i, -len(r):], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cache_crop_and_reorder_equal_recomputation(attention):
    from transformers import Cache

    model = tiny(attention).eval()
    x = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = Cache(layers=model.transformer.new_cache_layers())
        cache.activate_past_recording()  # window layers keep every token until the next crop
        model(x[:, :12], past_key_values=cache)
        model(x[:, 12:14], past_key_values=cache)
        cache.crop(-4)  # back to 10 tokens
        assert cache.get_seq_length() == 10
        cropped = model(x[:, 10:], past_key_values=cache).logits
        torch.testing.assert_close(cropped, full[:, 10:], atol=1e-5, rtol=1e-5)
        cache.crop(-2)  # back to 14 tokens
        cache.reorder_cache(torch.tensor([2, 0, 0]))
        reordered = model(x[[2, 0, 0], 14:], past_key_values=cache).logits
        torch.testing.assert_close(reordered, full[[2, 0, 0], 14:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["krause", "sliding_window", "gated"])
def test_window_layers_never_exceed_the_window_while_generating(attention):
    from transformers import DynamicCache

    model = tiny(attention).eval()
    window = model.config.attn_window
    cache = DynamicCache()
    seen = []

    def spy(module, args, output):
        layer = cache.layers[0]
        part = getattr(layer, "krause", layer)
        seen.append((part.keys.shape[2], part.values.shape[2], part.valid.shape[1]))

    ids, mask = _left_padded(_prompts())
    handle = model.transformer.h[0].register_forward_hook(spy)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=20, past_key_values=cache, do_sample=False, **COMMON)
    handle.remove()
    assert len(seen) == 20 and max(max(s) for s in seen) == window
