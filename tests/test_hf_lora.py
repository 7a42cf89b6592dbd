"""LoRA with peft on a patched model: the right modules train (gate and sigma included, and
they move), save/load rebuilds the exact model, merges keep it a Krause model."""

from __future__ import annotations

import json

import pytest
import torch

import krause.hf
from krause.hf.patch import patched_attention_modules
from lora_llms.testing import tiny_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A patched Qwen2 (biases) trained a few LoRA steps, its adapter saved; the losses seen."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen2", VOCAB)).save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    krause.hf.patch_model(model, window=4, top_k=2)
    peft_model = krause.hf.lora_model(model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    attn0 = peft_model.get_base_model().model.layers[0].self_attn
    sigma, gate = attn0.krause_sigma.modules_to_save["default"], attn0.krause_gate.modules_to_save["default"]
    before = {"sigma": sigma.log_sigma.detach().clone(), "gate": gate.proj.weight.detach().clone()}
    losses, grads = [], {}
    peft_model.train()
    for step in range(6):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {"sigma": sigma.log_sigma.grad.clone(), "gate": gate.proj.weight.grad.clone()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    krause.hf.save(peft_model, root / "adapter")
    return dict(root=root, peft_model=peft_model, ids=ids, losses=losses, grads=grads, before=before,
                sigma=sigma, gate=gate)


def test_lora_targets_both_branches_and_mlp():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB))
    krause.hf.patch_model(model)
    cfg = krause.hf.lora_config(model)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "krause_q_proj", "krause_k_proj",
                                       "krause_v_proj", "krause_o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(cfg.modules_to_save) == {"krause_gate", "krause_sigma"}
    peft_model = krause.hf.lora_model(model)
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    for part in ("self_attn.q_proj.lora_A", "self_attn.krause_q_proj.lora_A", "self_attn.krause_o_proj.lora_B",
                 "mlp.gate_proj.lora_A", "mlp.down_proj.lora_B", "krause_sigma.modules_to_save.default.log_sigma",
                 "krause_gate.modules_to_save.default.proj.weight"):
        assert any(part in n for n in names), part
    assert not any(n.endswith("q_proj.base_layer.weight") for n in names)  # the base stays frozen
    plain = krause.hf.lora_config(AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB)))
    assert plain.modules_to_save is None and "krause_q_proj" not in plain.target_modules


def test_training_lowers_loss_and_moves_gate_and_sigma(trained):
    losses = trained["losses"]
    assert losses[-1] < losses[0] - 0.05, losses
    assert trained["grads"]["sigma"].abs().sum() > 0
    assert trained["grads"]["gate"].abs().sum() > 0
    assert not torch.equal(trained["sigma"].log_sigma.detach(), trained["before"]["sigma"])
    assert not torch.equal(trained["gate"].proj.weight.detach(), trained["before"]["gate"])


def test_save_load_round_trip_is_exact(trained):
    root, ids = trained["root"], trained["ids"]
    saved = json.loads((root / "adapter" / "krause_config.json").read_text())
    assert saved["patch"]["window"] == 4 and saved["base"]["model_type"] == "qwen2"
    with torch.no_grad():
        ref = trained["peft_model"](input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        loaded = krause.hf.load(base, root / "adapter").eval()
        assert krause.hf.is_patched(loaded.get_base_model())
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["krause.hf", "peft"])
def test_merge_keeps_the_krause_model_and_its_outputs(trained, how):
    root, ids = trained["root"], trained["ids"]
    with torch.no_grad():
        ref = trained["peft_model"](input_ids=ids).logits
        loaded = krause.hf.load(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32),
                                root / "adapter").eval()
        merged = krause.hf.merge_and_unload(loaded) if how == "krause.hf" else loaded.merge_and_unload()
        assert krause.hf.is_patched(merged)
        attn = patched_attention_modules(merged)[0]
        assert isinstance(attn.q_proj, torch.nn.Linear) and isinstance(attn.krause_q_proj, torch.nn.Linear)
        assert attn.krause_q_proj.weight.data_ptr() != attn.q_proj.weight.data_ptr()  # untied, merged apart
        assert not torch.equal(attn.krause_q_proj.weight, attn.q_proj.weight)
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_adapter_on_the_wrong_base_is_refused(trained):
    root = trained["root"]
    other_arch = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB))
    with pytest.raises(ValueError, match="another model"):
        krause.hf.load(other_arch, root / "adapter")
    other_size = AutoModelForCausalLM.from_config(tiny_config("qwen2", VOCAB, hidden_size=48))
    with pytest.raises(ValueError, match="hidden_size"):
        krause.hf.load(other_size, root / "adapter")
    with pytest.raises(ValueError, match="krause_config.json"):
        krause.hf.load(other_size, root)


def _fresh_base(root):
    return AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)


def test_save_seals_and_load_refuses_a_damaged_or_unsealed_adapter(trained, tmp_path, capsys):
    """Every adapter krause.hf.save writes is sealed; load checks sizes and CRC-32s before reading it."""
    import shutil

    from krause.hf.__main__ import main as hf_main
    from krause.training.checkpointer import SEAL, verify_sealed
    from krause.training.errors import CorruptCheckpointError

    root = trained["root"]
    assert verify_sealed(root / "adapter")  # written by save() itself
    for name, damage, match in (
        ("flipped", lambda p: p.write_bytes(p.read_bytes()[:-8] + bytes(b ^ 0xFF for b in p.read_bytes()[-8:])), "adapter_model.safetensors is corrupted"),
        ("truncated", lambda p: p.write_bytes(p.read_bytes()[:50]), "adapter_model.safetensors has 50 bytes"),
        ("removed", lambda p: p.unlink(), "is missing adapter_model.safetensors"),
    ):
        copy = tmp_path / name
        shutil.copytree(root / "adapter", copy)
        damage(copy / "adapter_model.safetensors")
        with pytest.raises(CorruptCheckpointError, match=match):
            krause.hf.load(_fresh_base(root), copy)
    other_version = tmp_path / "other_version"
    shutil.copytree(root / "adapter", other_version)
    record = json.loads((other_version / SEAL).read_text())
    (other_version / SEAL).write_text(json.dumps({**record, "format": "krause-integrity-v0"}))
    with pytest.raises(CorruptCheckpointError, match="is not a .* record"):
        krause.hf.load(_fresh_base(root), other_version)
    # an adapter from before adapters were sealed: refused with the command that seals it; sealed, it loads
    old = tmp_path / "unsealed"
    shutil.copytree(root / "adapter", old)
    (old / SEAL).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"python -m krause.hf seal {old}"):
        krause.hf.load(_fresh_base(root), old)
    assert hf_main(["seal", str(old)]) == 0 and f"sealed {old / SEAL}" in capsys.readouterr().out
    with torch.no_grad():
        loaded = krause.hf.load(_fresh_base(root), old).eval()
        torch.testing.assert_close(loaded(input_ids=trained["ids"]).logits,
                                   trained["peft_model"](input_ids=trained["ids"]).logits, rtol=0, atol=0)
