"""Attention-sink analysis: one value per layer per branch, each a real token-0 share, for
unpatched, gated and Krause-only models; the plot and the gallery maker write their figure."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import krause.hf  # noqa: E402
from krause.hf.patch import patched_attention_modules  # noqa: E402
from lora_llms import sinks  # noqa: E402
from lora_llms.testing import flan_examples, write_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("sinks") / "llama", "llama", num_hidden_layers=3)


def texts(n=3):
    return [r["inputs"] + "\n\n### Response:\n" + r["targets"] for r in flan_examples(n, seed=4)]


def load(model_dir, attn="eager"):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def test_one_value_per_layer_per_branch(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = sinks.sink_values(load(model_dir), tok, texts(), max_length=48)
    assert base["num_texts"] == 3 and base["num_layers"] == 3
    assert len(base["standard"]) == 3 and base["krause"] is None and base["effective"] is None

    # reference for layer 0 of the unpatched model: eager weights from output_attentions
    ids = tok(texts(1)[0], return_tensors="pt", truncation=True, max_length=48)["input_ids"]
    with torch.no_grad():
        attn0 = load(model_dir)(ids, output_attentions=True).attentions[0]
    one = sinks.sink_values(load(model_dir), tok, texts(1), max_length=48)
    assert one["standard"][0] == pytest.approx(float(attn0[:, :, 1:, 0].mean()), rel=1e-5)

    gated = krause.hf.patch_model(load(model_dir), window=4, top_k=2)
    result = sinks.sink_values(gated, tok, texts(), max_length=48)
    for branch in ("standard", "krause", "effective"):
        assert len(result[branch]) == 3 and all(0.0 < v < 1.0 for v in result[branch]), result[branch]
    # the patched model's standard branch is the pretrained attention (layer 0 sees the same input;
    # deeper layers see the mixed outputs of the layers below)
    assert result["standard"][0] == pytest.approx(base["standard"][0], rel=1e-5)
    # the effective weights are the per-token gated mix of the two: between them, near the 0.8/0.2 start
    for s, k, e in zip(result["standard"], result["krause"], result["effective"]):
        assert min(s, k) <= e <= max(s, k)
        assert e == pytest.approx(0.8 * s + 0.2 * k, rel=0.05)
    with torch.no_grad():  # forcing the gate onto the Krause branch makes the mix the Krause weights
        for attn in patched_attention_modules(gated):
            attn.krause_gate.proj.weight.zero_()
            attn.krause_gate.proj.bias.copy_(torch.tensor([-60.0, 60.0]))
    forced = sinks.sink_values(gated, tok, texts(), max_length=48)
    assert forced["effective"] == pytest.approx(forced["krause"], rel=1e-5)

    only = sinks.sink_values(krause.hf.patch_model(load(model_dir), mix="krause", window=4, top_k=2), tok, texts(),
                             max_length=48)
    assert only["standard"] is None and only["effective"] == only["krause"] and len(only["krause"]) == 3


def test_sdpa_model_is_refused_with_advice(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="eager"):
        sinks.sink_values(load(model_dir, "sdpa"), tok, texts(1), max_length=32)


def test_plot_and_gallery_maker(model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    paths = []
    for label, patch in (("base", False), ("krause", True)):
        model = load(model_dir)
        if patch:
            krause.hf.patch_model(model, window=4, top_k=2)
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"label": label, **sinks.sink_values(model, tok, texts(2), max_length=32)}))
        paths.append(path)
    out = tmp_path / "sinks.png"
    assert sinks.main(["plot", *map(str, paths), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    from lora_llms.gallery import attention_sinks

    note = attention_sinks(tmp_path / "gallery", tmp_path, quick=True) if (tmp_path / "gallery").mkdir() is None else ""
    assert (tmp_path / "gallery" / "attention_sinks.png").is_file() and "stand-in" in note
