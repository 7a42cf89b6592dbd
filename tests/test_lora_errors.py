"""The error contract of the lora_llms entry points: each bad input ends in exactly one stderr line
``error: ...`` naming the flag or file, exit code 2, no traceback, and nothing written where the
corrected retry would write (the out dir does not exist afterwards; a held run dir keeps only its
holder's lock). One table of cases, run twice: through each entry point's ``main`` in this
process (fast), and as a user runs them, ``python -m ...`` subprocesses (slow: every process
imports torch, transformers and datasets again)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("lm_eval")
from transformers import AutoModelForCausalLM  # noqa: E402

import krause.hf  # noqa: E402
from krause.training.checkpointer import SEAL  # noqa: E402
from lora_llms.testing import write_flan_dir, write_local_tasks, write_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = write_tiny_model(root / "llama", "llama")
    flan = write_flan_dir(root / "flan", n=30)
    tasks = write_local_tasks(root / "tasks")
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, no_tokenizer / name)
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "part.jsonl").write_text('{"inputs": "a", "targets": "b"}\nnot json at all {\n')
    no_fields = root / "no_fields"
    no_fields.mkdir()
    (no_fields / "part.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    adapter = krause.hf.save(krause.hf.lora_model(krause.hf.patch_model(base, window=4, top_k=2)), root / "adapter")
    damaged = root / "damaged_adapter"
    shutil.copytree(adapter, damaged)
    weights = damaged / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    weights.write_bytes(bytes(data))
    unsealed = root / "unsealed_adapter"
    shutil.copytree(adapter, unsealed)
    (unsealed / SEAL).unlink()
    truncated = root / "truncated_adapter"
    shutil.copytree(adapter, truncated)
    (truncated / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:100])
    held = root / "held"
    held.mkdir()
    results = root / "not_json.json"
    results.write_text("{ this is not json")
    return {"root": root, "model": model, "flan": flan, "tasks": tasks, "no_tokenizer": no_tokenizer,
            "bad_json": bad_json, "no_fields": no_fields, "adapter": adapter, "damaged": damaged,
            "unsealed": unsealed, "truncated": truncated, "held": held, "results": results}


def train(f, out, *extra, model=None, data=None, mode="krause"):
    return ["lora_llms.train", "--mode", mode, "--model", str(model or f["model"]), "--data_dir",
            str(data or f["flan"]), "--out_dir", str(out), "--num_train", "8", "--num_eval", "0",
            "--max_length", "128", "--max_steps", "1", "--precision", "fp32", "--window", "4", "--top_k", "2",
            "--num_workers", "0", *extra]


def evaluate(f, out, *extra, model=None):
    return ["lora_llms.evaluate", "--model", str(model or f["model"]), "--include_path", str(f["tasks"]),
            "--tasks", "boolq_local", "--no_default_tasks", "--dtype", "float32", "--out_dir", str(out), *extra]


def sinks(f, out, *extra, data=None):
    return ["lora_llms.sinks", "analyze", "--model", str(f["model"]), "--data_dir", str(data or f["flan"]),
            "--dtype", "float32", "--num_texts", "2", "--out_dir", str(out), *extra]


# id -> (argv builder, words the one line must contain)
CASES = {
    "train: model dir missing": (lambda f, o: train(f, o, model=f["root"] / "nope"), ["--model", "does not exist"]),
    "train: model dir not a model": (lambda f, o: train(f, o, model=f["flan"]), ["--model", "no config.json"]),
    "train: tokenizer missing": (lambda f, o: train(f, o, model=f["no_tokenizer"]), ["--model", "has no tokenizer"]),
    "train: data dir missing": (lambda f, o: train(f, o, data=f["root"] / "nope"), ["data_dir", "not a directory"]),
    "train: data file not JSON": (lambda f, o: train(f, o, data=f["bad_json"]), ["data_dir", "cannot read the json"]),
    "train: data without FLAN fields": (lambda f, o: train(f, o, data=f["no_fields"]), ["data_dir", "inputs"]),
    "train: triton on a CPU": (lambda f, o: train(f, o, "--impl", "triton"), ["--impl triton on cpu"]),
    "train: unknown mode": (lambda f, o: train(f, o, mode="qlora"), ["--mode", "invalid choice: 'qlora'"]),
    "train: grad_clip nan": (lambda f, o: train(f, o, "--grad_clip", "nan"), ["--grad_clip", "got nan"]),
    "train: top_k above window": (lambda f, o: train(f, o, "--top_k", "8"), ["--top_k (8)", "--window (4)"]),
    "train: max_length beyond positions": (lambda f, o: train(f, o, "--max_length", "4096"),
                                           ["max_length", "512 positions"]),
    "train: run dir held": (lambda f, o: train(f, f["held"]), ["in use by another trainer"]),
    "evaluate: unknown task": (lambda f, o: [*evaluate(f, o)[:-2], "--tasks", "boolq_local,no_such_task",
                                             "--out_dir", str(o)], ["no_such_task"]),
    "evaluate: model dir missing": (lambda f, o: evaluate(f, o, model=f["root"] / "nope"), ["--model", "does not exist"]),
    "evaluate: tokenizer missing": (lambda f, o: evaluate(f, o, model=f["no_tokenizer"]), ["has no tokenizer"]),
    "evaluate: cuda without CUDA": (lambda f, o: evaluate(f, o, "--device", "cuda"), ["--device cuda", "CUDA"]),
    "evaluate: label that is a path": (lambda f, o: evaluate(f, o, "--label", "../escaped"),
                                       ["--label must be a plain name", "'../escaped'"]),
    "evaluate: batch size 0": (lambda f, o: evaluate(f, o, "--batch_size", "0"), ["--batch_size", "'0'"]),
    "evaluate: triton on a CPU": (lambda f, o: evaluate(f, o, "--adapter", str(f["adapter"]), "--impl", "triton"),
                                  ["--impl triton on cpu"]),
    "evaluate: adapter missing": (lambda f, o: evaluate(f, o, "--adapter", str(f["root"] / "nope")),
                                  ["adapter", "not a directory"]),
    "evaluate: adapter damaged": (lambda f, o: evaluate(f, o, "--adapter", str(f["damaged"])),
                                  ["adapter_model.safetensors", "CRC-32 mismatch"]),
    "evaluate: adapter truncated": (lambda f, o: evaluate(f, o, "--adapter", str(f["truncated"])),
                                    ["adapter_model.safetensors", "truncated"]),
    "evaluate: adapter unsealed": (lambda f, o: evaluate(f, o, "--adapter", str(f["unsealed"])),
                                   [SEAL, "python -m krause.hf seal"]),
    "evaluate: adapter is a model dir": (lambda f, o: evaluate(f, o, "--adapter", str(f["model"])),
                                         ["krause_config.json"]),
    "sinks: adapter damaged": (lambda f, o: sinks(f, o, "--adapter", str(f["damaged"])),
                               ["adapter_model.safetensors", "CRC-32 mismatch"]),
    "sinks: cuda without CUDA": (lambda f, o: sinks(f, o, "--device", "cuda"), ["--device cuda"]),
    "sinks: data dir missing": (lambda f, o: sinks(f, o, data=f["root"] / "nope"), ["data_dir", "not a directory"]),
    "sinks: missing subcommand": (lambda f, o: ["lora_llms.sinks"], ["required: command"]),
    "report: results not JSON": (lambda f, o: ["lora_llms.report", str(f["results"]), "--out", str(o / "t")],
                                 ["not_json.json", "not JSON"]),
    "report: results missing": (lambda f, o: ["lora_llms.report", str(f["root"] / "nope.json"), "--out",
                                              str(o / "t")], ["no such file"]),
    "seal: not an adapter": (lambda f, o: ["krause.hf", "seal", str(f["flan"])], ["krause_config.json"]),
}


def run(argv, timeout=300):
    """``python -m argv`` as a user on a machine without a GPU runs it (no Triton interpreter either)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0", TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    return subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def in_process(argv, capsys, monkeypatch):
    """``main(argv[1:])`` of the module ``argv[0]`` here, with a CPU-only machine's view."""
    import krause.dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    krause.dispatch.clear_cache()  # decisions are cached per call, not per environment
    capsys.readouterr()
    try:
        module = importlib.import_module(argv[0] + (".__main__" if argv[0] == "krause.hf" else ""))
        rc = module.main(argv[1:])
    finally:
        krause.dispatch.clear_cache()
    return rc, capsys.readouterr().err


def check_case(files, tmp_path, case, call):
    build, words = CASES[case]
    out = tmp_path / "out"
    holder = None
    if "held" in case:  # a live process owns the run dir's lock
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        from krause.training.lock import process_start_time

        (files["held"] / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                         "start_time": process_start_time(holder.pid),
                                                         "locked_at": 0}))
    try:
        rc, stderr = call(build(files, out))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    lines = _error_lines(stderr)
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = lines[-1]
    assert last.startswith("error: ") and all(w in last for w in words), last
    # log lines of the libraries may come first, but the error itself is one line
    assert sum(line.startswith("error") or "usage:" in line for line in lines) == 1, stderr
    assert not out.exists()
    if holder is not None:
        assert sorted(p.name for p in files["held"].iterdir()) == [".lock"]
        (files["held"] / ".lock").unlink()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, case, capsys, monkeypatch):
    check_case(files, tmp_path, case, lambda argv: in_process(argv, capsys, monkeypatch))


# The in-process test above runs every case; a fresh interpreter adds what only a new process
# shows (library log lines at import, the exit status of `python -m`), the same for every case
# failing at the same stage of a tool, so one case per (tool, stage) runs as a subprocess.
SUBPROCESS_CASES = (
    "train: model dir missing", "train: data file not JSON", "train: triton on a CPU", "train: unknown mode",
    "train: max_length beyond positions", "train: run dir held", "evaluate: unknown task",
    "evaluate: cuda without CUDA", "evaluate: batch size 0", "evaluate: adapter damaged", "evaluate: adapter unsealed",
    "sinks: missing subcommand", "sinks: adapter damaged", "report: results not JSON", "seal: not an adapter",
)


def test_subprocess_cases_cover_every_tool():
    assert set(SUBPROCESS_CASES) <= set(CASES)
    assert {n.split(":")[0] for n in SUBPROCESS_CASES} == {n.split(":")[0] for n in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_bad_input_as_a_user_runs_it(files, tmp_path, case):
    check_case(files, tmp_path, case, lambda argv: (lambda p: (p.returncode, p.stderr))(run(argv)))


@pytest.mark.slow
def test_a_refused_start_does_not_block_the_corrected_retry(files, tmp_path):
    out = tmp_path / "retry"
    refused = run(train(files, out, "--impl", "triton"))
    assert refused.returncode == 2 and not out.exists()
    done = run(train(files, out, "--impl", "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / SEAL).is_file()
