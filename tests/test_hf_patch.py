"""krause.hf.patch_model on tiny random Llama / Qwen2 models loaded by path: the standard
branch is the untouched pretrained attention, the Krause branch is the core op on the same
projections, padding is read from every mask form, bad input fails clearly."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import krause
import krause.hf
from krause.hf.masks import new_token_validity
from krause.hf.patch import KRAUSE_PROJECTIONS, PROJECTIONS, patched_attention_modules
from lora_llms.testing import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for kind in ("llama", "qwen2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, VOCAB))
        model.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def load(model_dirs, kind, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(model_dirs[kind], attn_implementation=attn, dtype=torch.float32).eval()


def force_gate(model, standard_logit: float):
    with torch.no_grad():
        for attn in patched_attention_modules(model):
            attn.krause_gate.proj.weight.zero_()
            attn.krause_gate.proj.bias.copy_(torch.tensor([standard_logit, -standard_logit]))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gate_on_standard_branch_reproduces_unpatched_logits(model_dirs, kind, attn):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the mask reaches the layers in 4-D form
    model = load(model_dirs, kind, attn)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    krause.hf.patch_model(model, window=4, top_k=2)
    force_gate(model, 60.0)  # softmax weight on the Krause branch ~ e^-120
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    force_gate(model, 0.0)  # and the Krause branch does change the output once it has weight
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - ref).abs().max() > 1e-3


def test_initial_gate_sigma_and_shared_weights(model_dirs):
    for kind in ("llama", "qwen2"):
        model = load(model_dirs, kind)
        params_before = sum(p.numel() for p in model.parameters())
        bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
        krause.hf.patch_model(model)
        attns = patched_attention_modules(model)
        assert len(attns) == model.config.num_hidden_layers
        for attn in attns:
            for std_name, kr_name in zip(PROJECTIONS, KRAUSE_PROJECTIONS):
                std, kr = getattr(attn, std_name), getattr(attn, kr_name)
                assert kr.weight is std.weight  # shared storage, not a copy
                if std.bias is None:
                    assert kr.bias is None  # no invented biases (Llama)
                else:
                    assert kr.bias is std.bias  # Qwen2's pretrained q/k/v biases
            torch.testing.assert_close(attn.krause_gate.proj.bias, torch.tensor([math.log(4.0), 0.0]))
            assert attn.krause_gate.proj.weight.std() < 0.03
            assert attn.krause_sigma.log_sigma.shape == (model.config.num_attention_heads,)
            torch.testing.assert_close(attn.krause_sigma().exp(), torch.full((4,), 5.5))
        bytes_after = sum(p.numel() * p.element_size() for p in model.parameters())
        params_after = sum(p.numel() for p in model.parameters())
        # tiny models make the gate's 2*(2d)+2 parameters per layer look big; check the exact count
        cfg = model.config
        assert params_after - params_before == cfg.num_hidden_layers * (2 * 2 * cfg.hidden_size + 2 + cfg.num_attention_heads)
        assert bytes_after - bytes_before == 4 * (params_after - params_before)
        names = [n for n, _ in model.named_modules()]
        assert any(n.endswith("self_attn.krause_gate") for n in names)
        assert any(n.endswith("self_attn.krause_sigma") for n in names)
        assert not any("krause" in n for n in names if n.endswith("mlp.gate_proj"))


def manual_krause(attn, hidden, position_embeddings, projections):
    """The Krause branch recomputed from its projections and the core op (no cache, no padding)."""
    q_proj, k_proj, v_proj, o_proj = (getattr(attn, n) for n in projections)
    b, t, _ = hidden.shape
    shape = (b, t, -1, attn.head_dim)
    q = q_proj(hidden).view(shape).transpose(1, 2)
    k = k_proj(hidden).view(shape).transpose(1, 2)
    v = v_proj(hidden).view(shape).transpose(1, 2)
    q, k = attn._krause_rope(q, k, *position_embeddings)
    cfg = attn.krause_config
    out = krause.causal_krause_attention(q, k, v, attn.krause_sigma(), cfg.window, cfg.top_k)
    return o_proj(out.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_krause_branch_is_the_core_op_on_the_same_projections(model_dirs, kind):
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    model = krause.hf.patch_model(load(model_dirs, kind), mix="gated", window=5, top_k=3)
    with torch.no_grad():
        for attn in patched_attention_modules(model):
            attn.krause_sigma.log_sigma.copy_(torch.linspace(0.5, 1.5, 4))
    attn = patched_attention_modules(model)[1]
    seen = {}
    attn.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out), with_kwargs=True)
    with torch.no_grad():
        model(ids)
        hidden, pe = seen["kw"]["hidden_states"], seen["kw"]["position_embeddings"]
        expected = manual_krause(attn, hidden, pe, KRAUSE_PROJECTIONS)
        torch.testing.assert_close(attn.krause_branch(hidden, pe, None, None), expected)


def _forward_flops(model, ids):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits = model(ids).logits
    return logits, counter.get_total_flops()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_krause_branch_reuses_the_shared_base_products(model_dirs, kind, monkeypatch):
    """While the Krause q/k/v projections share the standard ones' weights, the Krause branch
    takes the standard branch's products of the same hidden states: the same logits as with
    untied copies of the weights, with exactly those three matmuls fewer per layer; a product
    changed in place after it was computed is computed again; inference mode reuses nothing."""
    from krause.hf.patch import untie_krause_projections

    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    model = krause.hf.patch_model(load(model_dirs, kind), mix="gated", window=5, top_k=3)
    force_gate(model, 0.0)  # both branches count in the output
    shared, shared_flops = _forward_flops(model, ids)
    computed = []  # SharedLinear layers that ran their own matmul
    linear_forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward",
                        lambda self, x: computed.append(type(self).__name__) or linear_forward(self, x))
    with torch.inference_mode():  # (FlopCounterMode does not run in inference mode)
        infer = model(ids).logits
    monkeypatch.undo()
    assert computed.count("SharedLinear") == 4 * model.config.num_hidden_layers  # q, k, v and o
    attn = patched_attention_modules(model)[0]
    bumped = attn.q_proj.register_forward_hook(lambda m, a, out: out.add_(0.0))  # same values, a new version
    again, again_flops = _forward_flops(model, ids)
    bumped.remove()
    untie_krause_projections(model)
    untied, untied_flops = _forward_flops(model, ids)
    cfg = model.config
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_token = {"q": 2 * d * d, "k": 2 * d * kv, "v": 2 * d * kv}  # multiply-adds of one product a token
    tokens = ids.numel()
    assert untied_flops - shared_flops == cfg.num_hidden_layers * tokens * sum(per_token.values())
    assert untied_flops - again_flops == (cfg.num_hidden_layers - 1) * tokens * sum(per_token.values()) \
        + tokens * (per_token["k"] + per_token["v"])  # layer 0 computed its q again
    for other in (infer, again, untied):
        torch.testing.assert_close(shared, other, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_whole_gated_model_pickles_in_a_fresh_process(model_dirs, kind, tmp_path):
    """torch.save(model) of a gated model loads where the gated class was never made: same
    logits, the Krause projections still share the standard ones' Parameters and their products."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    model = krause.hf.patch_model(load(model_dirs, kind), mix="gated", window=4, top_k=2)
    force_gate(model, 0.0)
    with torch.no_grad():
        torch.save({"model": model, "ids": ids, "logits": model(ids).logits}, tmp_path / "whole.pt")
    script = f"""
import sys, torch
from torch.utils.flop_counter import FlopCounterMode
import krause.hf.patch as patch
assert not patch._PATCHED_CLASSES  # nothing made yet in this process
saved = torch.load({str(tmp_path / "whole.pt")!r}, weights_only=False)
model = saved["model"]
attn = patch.patched_attention_modules(model)[0]
assert type(attn).__name__.startswith("Krause") and attn.krause_q_proj.weight is attn.q_proj.weight
assert attn._krause_memo is attn.q_proj._krause_memo is attn.krause_q_proj._krause_memo
assert attn._krause_memo.outputs is None
with torch.no_grad(), FlopCounterMode(display=False) as shared:
    logits = model(saved["ids"]).logits
patch.untie_krause_projections(model)
with torch.no_grad(), FlopCounterMode(display=False) as untied:
    model(saved["ids"])
assert torch.equal(logits, saved["logits"]), (logits - saved["logits"]).abs().max()
assert untied.get_total_flops() > shared.get_total_flops()  # the loaded copy reused the products
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_krause_only_mix_is_the_registered_attention(model_dirs, kind):
    """patch_model(mix="krause") is a thin wrapper: the layers run attn_implementation="krause"
    on their own projections (no extra module but sigma), and the output is the core op's."""
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    model = load(model_dirs, kind)
    params_before = sum(p.numel() for p in model.parameters())
    krause.hf.patch_model(model, mix="krause", window=5, top_k=3)
    assert model.config._attn_implementation == "krause" and krause.hf.is_patched(model)
    assert model.config.krause == {"window": 5, "top_k": 3, "sigma": 5.5, "impl": "auto", "layers": None}
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) - params_before == cfg.num_hidden_layers * cfg.num_attention_heads
    attn = krause.hf.krause_attention_modules(model)[1]
    assert not patched_attention_modules(model) and not hasattr(attn, "krause_gate")
    with torch.no_grad():
        attn.krause_sigma.log_sigma.copy_(torch.linspace(0.5, 1.5, 4))
    seen = {}
    attn.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out), with_kwargs=True)
    with torch.no_grad():
        model(ids)
        hidden, pe = seen["kw"]["hidden_states"], seen["kw"]["position_embeddings"]
        b, t, _ = hidden.shape
        shape = (b, t, -1, attn.head_dim)
        q, k, v = (getattr(attn, n)(hidden).view(shape).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, *pe)
        out = krause.causal_krause_attention(q, k, v, attn.krause_sigma(), 5, 3, impl="reference")
        torch.testing.assert_close(seen["out"][0], attn.o_proj(out.transpose(1, 2).reshape(b, t, -1)))
        assert seen["out"][1] is None


def test_left_padding_leaves_the_real_tokens_unchanged(model_dirs):
    ids = torch.randint(4, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    for attn_impl in ("sdpa", "eager"):
        for mix in ("gated", "krause"):
            model = krause.hf.patch_model(load(model_dirs, "llama", attn_impl), mix=mix, window=4, top_k=2)
            force_gate(model, 0.0) if mix == "gated" else None
            padded = torch.cat([torch.full((1, 6), 3), ids], dim=1)
            mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 14, dtype=torch.long)], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.no_grad():
                ref = model(ids).logits
                out = model(padded, attention_mask=mask, position_ids=positions).logits[:, 6:]
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_new_token_validity_from_every_mask_form():
    real = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    bool4d = causal[None, None] & real[:, None, None, :]
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    for mask in (bool4d, additive, real.long(), real):
        torch.testing.assert_close(new_token_validity(mask, 2, 5, past=0), real)
    assert new_token_validity(None, 2, 5, past=0) is None
    # a decode step: one new token at position 5 of a (B, 1, 1, 6) mask
    step = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    step[0, ..., :2] = False
    torch.testing.assert_close(new_token_validity(step, 2, 1, past=5), torch.ones(2, 1, dtype=torch.bool))
    # a static cache's mask covers max_cache_len columns; the new tokens sit at `past`
    static = torch.zeros(1, 1, 2, 10, dtype=torch.bool)
    static[..., :5] = True
    static[..., 3] = False
    torch.testing.assert_close(new_token_validity(static, 1, 2, past=3), torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="attention_mask"):
        new_token_validity(torch.ones(2, 5, 5), 2, 5, past=0)
    with pytest.raises(ValueError, match="BlockMask"):
        new_token_validity(object(), 2, 5, past=0)


def test_bad_input_fails_clearly(model_dirs):
    model = load(model_dirs, "qwen2")
    for kwargs, match in (({"mix": "both"}, "mix"), ({"window": 0}, "window"), ({"top_k": 1.5}, "top_k"),
                          ({"sigma": -1.0}, "sigma"), ({"impl": "cuda"}, "impl")):
        with pytest.raises(ValueError, match=match):
            krause.hf.patch_model(model, **kwargs)
    krause.hf.patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        krause.hf.patch_model(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        krause.hf.patch_model(gpt2)
    flex = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB))
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        krause.hf.patch_model(flex)


def test_import_krause_does_not_import_transformers():
    code = "import sys, krause, krause.hf; assert 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "5.5"])
def test_patch_sigma_goes_through_the_one_sigma_check(bad):
    """KrausePatchConfig refuses sigma with krause.nn.check_sigma's own text (one check in the project)."""
    import krause.nn
    from krause.hf.patch import KrausePatchConfig

    with pytest.raises(ValueError) as ours:
        KrausePatchConfig(sigma=bad)
    with pytest.raises(ValueError) as shared:
        krause.nn.check_sigma(bad)
    assert str(ours.value) == str(shared.value) and str(ours.value).startswith("sigma must be a finite number > 0")
    assert KrausePatchConfig(sigma=5).sigma == 5.0
