"""attn_implementation="krause" (krause.hf.register) on tiny random configs of every tested
architecture: the attention equals the dense Krause reference on the q/k/v the model's own
eager attention receives (forward and gradient), cached decoding equals the full forward
and keeps only the window, left-padded batches equal per-row runs, sigma and the settings
survive save/load and peft, the model's own sliding windows stay, bad input fails clearly."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import krause.hf
from krause.hf.attention import TESTED_ARCHITECTURES
from krause.hf.cache import KrauseCacheLayer
from krause.reference import causal_krause_attention_reference

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

VOCAB = 96
WINDOW, TOP_K, OWN_WINDOW = 5, 3, 3
PAD = 3


def tiny_config(model_type: str, **krause_entry):
    """A 2-layer random config; Gemma 2/3 and Mistral get a sliding window of OWN_WINDOW < WINDOW."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                  pad_token_id=PAD, tie_word_embeddings=False)
    if model_type in ("gemma2", "gemma3_text"):
        kwargs.update(sliding_window=OWN_WINDOW, query_pre_attn_scalar=8,
                      layer_types=["sliding_attention", "full_attention"])
    elif model_type == "mistral":
        kwargs.update(sliding_window=OWN_WINDOW)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.krause = {"window": WINDOW, "top_k": TOP_K, **krause_entry}
    return config


def build(model_type: str, seed: int = 0, **krause_entry):
    krause.hf.register()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **krause_entry), attn_implementation="krause")
    with torch.no_grad():  # distinct sigmas per layer and head, as after training
        for i, attn in enumerate(krause.hf.krause_attention_modules(model)):
            attn.krause_sigma.log_sigma.copy_(torch.linspace(0.3, 1.2, 4) + 0.2 * i)
    return model.eval()


def batch(seed: int = 1, length: int = 12, pad: int = 4):
    ids = torch.randint(4, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad], mask[1, :pad] = PAD, 0  # row 1 is left-padded
    return ids, mask


def expected_window(model_type, attn) -> int:
    sliding = model_type == "mistral" or (model_type in ("gemma2", "gemma3_text") and attn.layer_idx == 0)
    return min(WINDOW, OWN_WINDOW) if sliding else WINDOW


def dense_reference_eager(model, monkeypatch):
    """``model`` switched to eager attention, with the eager function replaced by the dense Krause
    reference on the q/k/v (after the model's norms and RoPE) and the mask that function receives."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    modeling = sys.modules[type(krause.hf.krause_attention_modules(ref)[0]).__module__]

    def dense_krause(module, query, key, value, attention_mask, *args, sliding_window=None, **kwargs):
        # the eager mask is (B, 1, T, T) additive: key j is real iff the query at j may see it
        valid = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1) == 0
        window = WINDOW if sliding_window is None else min(WINDOW, sliding_window)
        out = causal_krause_attention_reference(query, key, value, module.krause_sigma(), window, TOP_K,
                                                key_padding_mask=valid)
        return out.transpose(1, 2), None

    monkeypatch.setattr(modeling, "eager_attention_forward", dense_krause)
    return ref


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_attention_is_the_dense_reference_on_the_models_own_qkv(model_type, monkeypatch):
    model = build(model_type)
    attns = krause.hf.krause_attention_modules(model)
    assert len(attns) == 2 and model.config.krause["window"] == WINDOW
    assert [a.krause_window for a in attns] == [expected_window(model_type, a) for a in attns]
    ref = dense_reference_eager(model, monkeypatch)
    ids, mask = batch()
    real = mask.bool()
    out = model(ids, attention_mask=mask, use_cache=False).logits
    expected = ref(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out[real], expected[real], rtol=1e-4, atol=1e-5)
    out[real].square().mean().backward()
    expected[real].square().mean().backward()
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        if "krause_sigma" in name or "q_proj" in name or "k_proj" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_incremental_decode_equals_full_forward_and_keeps_the_window(model_type):
    model = build(model_type)
    ids, mask = batch(length=14)
    prompt = 6
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache).logits]
        t = prompt
        for n in (1, 3, 1, 2, 1):  # single tokens and chunks after a past (chunked prefill)
            steps.append(model(ids[:, t:t + n], attention_mask=mask[:, :t + n], past_key_values=cache).logits)
            t += n
        assert t == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-5)
    for attn, layer in zip(krause.hf.krause_attention_modules(model), cache.layers):
        assert isinstance(layer, KrauseCacheLayer) and layer.standalone
        assert layer.krause.keys.shape[-2] == attn.krause_window  # constant in the sequence length
        assert layer.get_seq_length() == ids.shape[1]


COMMON = dict(pad_token_id=PAD, eos_token_id=None)


@pytest.mark.slow  # (the fast suite's tests/test_hf_generate.py runs mix="krause", the same path, on Llama)
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_left_padded_generate_equals_per_row_runs(model_type):
    model = build(model_type)
    ids, mask = batch(length=9, pad=3)
    new = 2 * WINDOW + 1
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **COMMON)
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=3, do_sample=False, **COMMON)
        for row, start in ((0, 0), (1, 3)):
            alone = ids[row:row + 1, start:]
            assert torch.equal(greedy[row, 9:], model.generate(alone, max_new_tokens=new, do_sample=False,
                                                                **COMMON)[0, alone.shape[1]:])
            assert torch.equal(beams[row, 9:], model.generate(alone, max_new_tokens=new, num_beams=3, do_sample=False,
                                                               **COMMON)[0, alone.shape[1]:])
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=False,
                                  **COMMON)
        samples = []
        for use_cache in (True, False):
            torch.manual_seed(11)
            samples.append(model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=0,
                                          num_return_sequences=2, use_cache=use_cache, **COMMON))
    assert torch.equal(greedy, uncached)
    assert samples[0].shape == (4, 9 + new) and torch.equal(samples[0], samples[1])


def test_save_load_keeps_sigma_and_settings_and_a_plain_checkpoint_starts_sigma_at_its_init(tmp_path):
    model = build("qwen3", sigma=3.0, layers=[1])
    assert model.config.krause == {"window": WINDOW, "top_k": TOP_K, "sigma": 3.0, "impl": "auto", "layers": [1]}
    layer0, layer1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert layer0.krause_window is None and not hasattr(layer0, "krause_sigma")  # the model's own attention
    model.save_pretrained(tmp_path / "krause")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "krause", attn_implementation="krause").eval()
    assert loaded.config.krause == model.config.krause
    torch.testing.assert_close(loaded.model.layers[1].self_attn.krause_sigma.log_sigma, layer1.krause_sigma.log_sigma,
                               rtol=0, atol=0)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
    # layer 0 (left out of `layers`) is the model's own attention: same output as under sdpa
    seen = {}
    for name, m in (("krause", model), ("sdpa", copy.deepcopy(model))):
        if name == "sdpa":
            m.set_attn_implementation("sdpa")
        m.model.layers[0].self_attn.register_forward_hook(lambda mod, a, out, name=name: seen.update({name: out[0]}))
        with torch.no_grad():
            m(ids, attention_mask=mask)
    torch.testing.assert_close(seen["krause"][mask.bool()], seen["sdpa"][mask.bool()], rtol=1e-5, atol=1e-6)
    # a checkpoint without sigma (saved from a plain model): sigma starts at the configured value
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "plain")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="krause")
    assert fresh.config.krause["sigma"] == 2.5  # KrauseConfig's default
    for attn in krause.hf.krause_attention_modules(fresh):
        torch.testing.assert_close(attn.krause_sigma().exp(), torch.full((4,), 2.5))


@pytest.mark.slow
def test_peft_lora_trains_sigma_and_merges_without_patching_peft(tmp_path):
    pytest.importorskip("peft")
    model = build("olmo2")
    model.save_pretrained(tmp_path / "base")
    peft_model = krause.hf.lora_model(model)
    assert "merge_and_unload" not in peft_model.base_model.__dict__  # nothing shared: peft's merge as it is
    sigma = model.model.layers[0].self_attn.krause_sigma.modules_to_save["default"].log_sigma
    before = sigma.detach().clone()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch()
    losses = []
    peft_model.train()
    for _ in range(5):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert sigma.grad is not None and sigma.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    assert losses[-1] < losses[0] and not torch.equal(sigma.detach(), before)
    krause.hf.save(peft_model, tmp_path / "adapter")
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="krause")
        loaded = krause.hf.load(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.model.layers[0].self_attn.krause_sigma.log_sigma, sigma.detach())
    sdpa_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='krause'"):
        krause.hf.load(sdpa_base, tmp_path / "adapter")


def test_bad_input_fails_clearly():
    krause.hf.register()
    for entry, match in (({"top_k": 9}, "top_k 9 exceeds window 5"), ({"windows": 4}, "'windows' is not a setting"),
                         ({"layers": [2]}, "layers"), ({"sigma": 0}, "sigma")):
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_config(tiny_config("llama", **entry), attn_implementation="krause")
    config = tiny_config("llama")
    config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads"):
        krause.hf.krause_settings(config)
    # built before register() took effect on it: a clear error naming register()
    sdpa = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    sdpa.set_attn_implementation("krause")
    with pytest.raises(ValueError, match=r"krause.hf.register\(\)"):
        sdpa(torch.ones(1, 4, dtype=torch.long))
    # an architecture without attention through the interface: named, with the tested list
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="MambaForCausalLM.*tested: llama, mistral"):
        krause.hf.patch_model(mamba, mix="krause")


@pytest.mark.slow
def test_without_register_the_implementation_is_refused():
    code = ("import krause.hf, torch; from transformers import AutoModelForCausalLM, LlamaConfig\n"
            "cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2)\n"
            "try:\n    AutoModelForCausalLM.from_config(cfg, attn_implementation='krause')\n"
            "except ValueError as e:\n    print('refused', 'krause' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused True" in out.stdout, out.stderr[-2000:]


def test_a_prepared_4d_mask_gives_the_same_padding_as_the_2d_mask():
    model = build("qwen2")
    ids, mask = batch()
    t = ids.shape[1]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for prepared in (allowed, additive):
            out = model(ids, attention_mask=prepared).logits
            torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=0)
        unpadded = model(ids, attention_mask=torch.ones_like(mask)).logits
    assert (unpadded[1, -1] - ref[1, -1]).abs().max() > 1e-4  # the padding does reach the op
