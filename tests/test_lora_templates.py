"""The launch templates run directly with bash on the tiny stand-ins: Krause training through
torchrun, then evaluation (lm-eval on a local task) and the sink analysis of its adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

from lora_llms.testing import write_flan_dir, write_local_tasks, write_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "lora_llms" / "scripts"


def run(script, env, *args, timeout=300):
    full_env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


@pytest.mark.slow
def test_train_then_evaluate_templates(tmp_path):
    model_dir = write_tiny_model(tmp_path / "qwen2", "qwen2")
    flan = write_flan_dir(tmp_path / "flan", n=40)
    out = tmp_path / "run"
    train = run("train_qwen.sh", {"MODEL_PATH": str(model_dir), "DATA_DIR": str(flan), "OUT_DIR": str(out),
                                  "NPROC": "1"},
                "--num_train", "16", "--num_eval", "2", "--max_length", "256", "--max_steps", "2", "--batch_size", "2",
                "--grad_accum", "1", "--precision", "fp32", "--num_workers", "0", "--window", "8", "--top_k", "4")
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert "launch: krause training" in train.stdout
    adapter = out / "adapter"
    assert json.loads((adapter / "krause_config.json").read_text())["patch"]["window"] == 8

    tasks = write_local_tasks(tmp_path / "tasks")
    results = tmp_path / "results"
    evaluate = run("evaluate.sh", {"MODEL_PATH": str(model_dir), "ADAPTER": str(adapter), "LABEL": "krause",
                                   "OUT_DIR": str(results), "DATA_DIR": str(flan),
                                   "SINKS_ARGS": "--num_texts 2 --max_length 64 --dtype float32"},
                   "--tasks", "boolq_local", "--include_path", str(tasks), "--no_default_tasks", "--dtype", "float32")
    assert evaluate.returncode == 0, evaluate.stdout[-2000:] + evaluate.stderr[-3000:]
    record = json.loads((results / "krause.json").read_text())
    assert record["kind"] == "krause" and "acc,none" in record["results"]["boolq_local"]
    assert (results / "krause_table.md").is_file()
    sinks = json.loads((results / "sinks" / "krause.json").read_text())
    assert len(sinks["effective"]) == 2 and len(sinks["krause"]) == 2


def test_templates_refuse_missing_paths(tmp_path):
    missing_model = run("train_llama.sh", {"DATA_DIR": str(tmp_path), "OUT_DIR": str(tmp_path / "o")}, timeout=60)
    assert missing_model.returncode == 2 and "MODEL_PATH" in missing_model.stderr
    missing_data = run("train_llama.sh", {"MODEL_PATH": str(tmp_path), "OUT_DIR": str(tmp_path / "o")}, timeout=60)
    assert missing_data.returncode == 2 and "DATA_DIR" in missing_data.stderr
    no_model = run("evaluate.sh", {"OUT_DIR": str(tmp_path / "o")}, timeout=60)
    assert no_model.returncode == 2 and "MODEL_PATH" in no_model.stderr
