"""The attention-sink figure of the README gallery (``images.make_all`` entry "attention_sinks").

Without the 8B checkpoints this runs the real analysis (``lora_llms.sinks``) on stand-ins:
a small random Llama and the same model patched with the gated Krause mix (untrained, gate
at its 0.8 init), on the synthetic FLAN texts of ``lora_llms.testing``. It shows what the
analysis computes, not the paper's result; for that run ``lora_llms/scripts/evaluate.sh``
with DATA_DIR on the base model and on a trained Krause adapter, then
``python -m lora_llms.sinks plot``.
"""

from __future__ import annotations

import json
from pathlib import Path


def attention_sinks(out_dir: Path, work_dir: Path, quick: bool) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import krause.hf
    from lora_llms.sinks import plot, sink_values
    from lora_llms.testing import flan_examples, write_tiny_model

    layers, texts = (2, 4) if quick else (6, 32)
    model_dir = write_tiny_model(Path(work_dir) / "sinks_model", "llama", num_hidden_layers=layers,
                                 hidden_size=64, intermediate_size=128)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = [r["inputs"] + "\n\n### Response:\n" + r["targets"] for r in flan_examples(texts, seed=7)]
    paths = []
    for label, patch in (("standard (random Llama)", False), ("Krause-patched, untrained", True)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        if patch:
            krause.hf.patch_model(model)
        result = {"label": label, **sink_values(model, tokenizer, samples, max_length=256)}
        path = Path(work_dir) / f"sinks_{'krause' if patch else 'base'}.json"
        path.write_text(json.dumps(result, indent=2))
        paths.append(path)
    plot(paths, Path(out_dir) / "attention_sinks.png")
    return (f"stand-in: random {layers}-layer Llama (d 64) vs the same model Krause-patched, {texts} synthetic "
            "texts; not the paper's Llama3-8B result")
