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
    """Sends this process ``sig`` after ``stop_at`` optimizer steps; records the optimizer's decay groups."""

    def __init__(self, stop_at=None, sig=signal.SIGTERM):
        self.stop_at, self.sig = stop_at, sig
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
            os.kill(os.getpid(), self.sig)  # the PreemptionCallback's handler catches it


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
    for extra in (["--lr", "-1"], ["--epochs", "0"], ["--lora_alpha", "-8"], ["--weight_decay", "-1"],
                  ["--seed", "-3"], ["--grad_clip", "nan"]):
        assert train.main(args_for(model_dir, flan, root / "refused", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: argument {extra[0]}: must be "), err
    assert not (root / "refused").exists()
    cases = [(args_for(model_dir, flan, root / "long", "--max_length", "100000"), "max_length"),
             (args_for(model_dir, root / "empty", root / "nodata"), "no usable data files"),
             (args_for(model_dir, model_dir, root / "nodata"), "cannot read the json files")]  # a model folder
    (root / "empty").mkdir()
    for argv, words in cases:
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip()  # progress bars of the data set building come first
        assert err.splitlines()[-1].startswith("error:") and words in err.splitlines()[-1], err
        assert "Traceback" not in err
    assert not (root / "long").exists() and not (root / "nodata").exists()  # a refused start writes nothing


# ----------------------------------------------------------------------------- one seed, one run; the run dir


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _assert_same_adapter(a, b):
    wa, wb = _adapter(a), _adapter(b)
    assert sorted(wa) == sorted(wb) and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, model_dir, flan = setup
    out = root / "uninterrupted"
    assert train.main(args_for(model_dir, flan, out, "--save_steps", "2")) == 0
    return out


def test_same_seed_twice_gives_identical_adapters_and_losses(setup, uninterrupted):
    root, model_dir, flan = setup
    again, other = root / "again", root / "other_seed"
    assert train.main(args_for(model_dir, flan, again, "--save_steps", "2")) == 0
    _assert_same_adapter(uninterrupted, again)
    assert _losses(again) == _losses(uninterrupted)
    assert train.main(args_for(model_dir, flan, other, "--save_steps", "2", "--seed", "7")) == 0
    assert any(not torch.equal(v, _adapter(other)[k]) for k, v in _adapter(uninterrupted).items())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_then_resume_equals_the_uninterrupted_run(setup, uninterrupted, capsys, sig):
    root, model_dir, flan = setup
    out = root / f"stopped_{sig.name}"
    assert train.main(args_for(model_dir, flan, out, "--save_steps", "2"),
                      extra_callbacks=[StopAndInspect(1, sig)]) == 0
    assert f"stopped by {sig.name} at step 2" in capsys.readouterr().out
    assert train.main(args_for(model_dir, flan, out, "--save_steps", "2", "--resume")) == 0
    _assert_same_adapter(uninterrupted, out)
    assert _losses(out) == _losses(uninterrupted)


def test_run_dir_has_lock_config_metrics_and_sealed_checkpoints(setup, uninterrupted):
    from krause.training.checkpointer import SEAL, verify_sealed

    assert not (uninterrupted / ".lock").exists()  # released at the end
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["seed"] == 42 and config["patch"]["window"] == 8 and config["out_dir"] == str(uninterrupted)
    assert len((uninterrupted / "launches.jsonl").read_text().splitlines()) == 1
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and all("time" in r for r in records)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert (uninterrupted / "checkpoints" / ckpt / SEAL).is_file()
        assert verify_sealed(uninterrupted / "checkpoints" / ckpt)
    assert verify_sealed(uninterrupted / "adapter")


def test_a_held_run_dir_refuses_in_one_line(setup, tmp_path, capsys):
    import subprocess
    import sys

    root, model_dir, flan = setup
    out = tmp_path / "held"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from krause.training.lock import process_start_time

        import socket

        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                               "start_time": process_start_time(holder.pid), "locked_at": 0}))
        assert train.main(args_for(model_dir, flan, out)) == 2
    finally:
        holder.kill()
        holder.wait()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and "in use by another trainer" in last and str(holder.pid) in last, last
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_resume_verifies_the_checkpoint_and_passes_over_an_unfinished_save(setup, uninterrupted, tmp_path, capsys):
    import shutil

    from krause.training.checkpointer import SEAL

    root, model_dir, flan = setup
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "adapter")
    weights = run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    weights.write_bytes(bytes(data))
    assert train.main(args_for(model_dir, flan, run, "--save_steps", "2", "--resume")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "CRC-32 mismatch" in last and "checkpoint-4" in last and "checkpoint-2" in last, last
    # a save cut short (no integrity record yet) is not resumed from: the older complete one is
    (run / "checkpoints" / "checkpoint-4" / SEAL).unlink()
    assert train.main(args_for(model_dir, flan, run, "--save_steps", "2", "--resume")) == 0
    _assert_same_adapter(uninterrupted, run)


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(setup, tmp_path):
    """Both runs in fresh processes (same thread count): killed at step 3, resumed from checkpoint-2."""
    import subprocess
    import sys
    from pathlib import Path

    root, model_dir, flan = setup
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")

    def launch(out, *extra):
        return subprocess.run([sys.executable, "-m", "lora_llms.train",
                               *args_for(model_dir, flan, out, "--save_steps", "2", *extra)],
                              env=env, capture_output=True, text=True, timeout=600)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert launch(whole).returncode == 0
    proc = launch(killed, "--kill_at_step", "3")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / ".lock").is_file()  # left behind by the dead process: stale, taken over below
    done = launch(killed, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_adapter(whole, killed)
    assert _losses(killed) == _losses(whole)


def test_paper_preset_trains_with_sigma_frozen_and_eos_masked(setup):
    from safetensors.torch import load_file

    from lora_llms.data import IGNORE_INDEX, tokenize_example

    root, model_dir, flan = setup
    out = root / "paper"
    assert train.main(args_for(model_dir, flan, out, "--preset", "paper", "--max_steps", "2")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "paper" and config["freeze_sigma"] is True and config["label_eos"] is False
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    sigmas = [v for k, v in weights.items() if "log_sigma" in k]
    assert len(sigmas) == 2 and all(torch.allclose(s, torch.full_like(s, math.log(5.5))) for s in sigmas)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)  # the adapter itself did train
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    labelled, _ = tokenize_example(tok, "Say yes.", "yes", 64)
    masked, _ = tokenize_example(tok, "Say yes.", "yes", 64, label_eos=False)
    assert labelled["labels"][-1] == tok.eos_token_id and masked["labels"][-1] == IGNORE_INDEX
    assert masked["labels"][:-1] == labelled["labels"][:-1]
