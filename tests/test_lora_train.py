"""lora_llms.train on a tiny Krause-patched Llama: the loss falls, sigma trains without weight
decay, a stop signal saves a Trainer checkpoint, --resume finishes the run, the adapter loads."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

import krause.hf  # noqa: E402
from lora_llms import train  # noqa: E402
from lora_llms.testing import write_flan_dir, write_tiny_model  # noqa: E402


class StopAndInspect(TrainerCallback):
    """Sends this process SIGTERM after ``stop_at`` optimizer steps; records the optimizer's decay groups."""

    def __init__(self, stop_at=None):
        self.stop_at = stop_at
        self.decay_of = {}
        self.checkpointing = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:
            self.checkpointing = model.get_base_model().model.gradient_checkpointing
        if not self.decay_of and optimizer is not None and model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self.decay_of[names.get(id(p), "?")] = group["weight_decay"]
        if self.stop_at is not None and state.global_step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the PreemptionCallback's handler catches it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir = write_tiny_model(root / "llama", "llama")
    flan = write_flan_dir(root / "flan", n=60)
    return root, model_dir, flan


def args_for(model_dir, flan, out_dir, *extra):
    return ["--mode", "krause", "--model", str(model_dir), "--data_dir", str(flan), "--out_dir", str(out_dir),
            "--num_train", "40", "--num_eval", "4", "--max_length", "256", "--batch_size", "4", "--grad_accum", "1",
            "--max_steps", "4", "--lr", "5e-3", "--warmup_ratio", "0", "--precision", "fp32", "--logging_steps", "1",
            "--eval_steps", "100", "--save_steps", "100", "--num_workers", "0", "--window", "8", "--top_k", "4",
            *extra]


def test_train_stop_resume_and_adapter(setup, capsys):
    root, model_dir, flan = setup
    out = root / "run"
    inspect = StopAndInspect(stop_at=1)
    assert train.main(args_for(model_dir, flan, out), extra_callbacks=[inspect]) == 0
    # the signal arrives after step 1's callbacks ran: the save happens at the next step boundary
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "krause_config.json").is_file()
    assert not (out / "adapter").exists()
    assert inspect.checkpointing is True  # the recipe's gradient checkpointing is on
    sigma_decay = {n: wd for n, wd in inspect.decay_of.items() if "log_sigma" in n}
    assert sigma_decay and all(wd == 0.0 for wd in sigma_decay.values())
    assert any(wd == 0.01 for n, wd in inspect.decay_of.items() if "lora_A" in n)

    # without --resume an existing run is not overwritten
    assert train.main(args_for(model_dir, flan, out)) == 2
    assert train.main(args_for(model_dir, flan, out, "--resume")) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and min(losses[-2:]) < losses[0], losses
    assert all(len(r["sigma"]) == 2 for r in records)
    assert (out / "figures" / "curves.png").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["patch"]["window"] == 8 and config["mode"] == "krause"

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = krause.hf.load(base, out / "adapter")
    sigmas = [p for n, p in loaded.named_parameters() if n.endswith("modules_to_save.default.log_sigma")]
    assert len(sigmas) == 2
    assert any((s - math.log(5.5)).abs().max() > 1e-4 for s in sigmas)  # sigma trained


def test_bad_arguments_exit_with_a_clear_error(setup, capsys):
    root, model_dir, flan = setup
    with pytest.raises(SystemExit) as err:
        train.parse_args(["--mode", "krause", "--model", "m", "--data_dir", "d", "--out_dir", "o", "--lr", "-1"])
    assert err.value.code == 2 and "--lr" in capsys.readouterr().err
    assert train.main(args_for(model_dir, flan, root / "long", "--max_length", "100000")) == 2
    assert "max_length" in capsys.readouterr().err
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable data files"):
        train.main(args_for(model_dir, root / "empty", root / "nodata"))
    with pytest.raises(ValueError, match="cannot read the json files"):  # a model folder is not FLAN data
        train.main(args_for(model_dir, model_dir, root / "nodata"))
