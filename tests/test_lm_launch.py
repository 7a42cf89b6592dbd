"""language_models_100m/launch: the templates parse, build the right torchrun command, resume, no hard-coding."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "language_models_100m" / "launch"
TEMPLATES = sorted(LAUNCH.glob("*.sh"))


def dry_run(script, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base.update(DRY_RUN="1", NPROC="2", **env)
    out = subprocess.run(["bash", str(LAUNCH / script)], env=base, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("script", [p.name for p in TEMPLATES])
def test_templates_parse_and_hard_code_nothing(script):
    text = (LAUNCH / script).read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    assert not re.search(r"CUDA_VISIBLE_DEVICES=|MASTER_PORT=\d|/work/|/home/", text)


def test_train_single_node_then_resume(tmp_path):
    cmd = dry_run("train.sh", tmp_path, DATA_DIR="data", CONFIG="200m", ATTENTION="topk", OUT_DIR="run")
    assert "-m krause.training.launch --nproc_per_node 2" in cmd and "--standalone" in cmd
    assert "--config 200m --attention topk --data_dir data --out_dir run" in cmd and "--resume" not in cmd
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000010\n")
    assert dry_run("train.sh", tmp_path, DATA_DIR="data", OUT_DIR="run").endswith("--resume")


def test_train_multi_node_rendezvous_from_slurm(tmp_path):
    cmd = dry_run("train.sh", tmp_path, DATA_DIR="data", SLURM_JOB_NUM_NODES="4", SLURM_JOB_ID="123",
                  MASTER_ADDR="node7")
    assert cmd.startswith("srun --ntasks-per-node=1") and "--nnodes 4" in cmd
    assert "--rdzv-backend c10d --rdzv-endpoint node7:20123 --rdzv-id 123" in cmd


def test_build_and_evaluate_commands(tmp_path):
    cmd = dry_run("build_fwe10bt.sh", tmp_path, INPUT="in", OUT_DIR="out", WORKERS="3")
    assert "-m language_models_100m.build_fwe10bt --input in --out_dir out" in cmd and "--workers 3" in cmd
    cmd = dry_run("evaluate.sh", tmp_path, MODELS="runs/a runs/b", DATA_DIR="d")
    assert "--model runs/a runs/b" in cmd and "--data_dir d" in cmd and "cbt" in cmd
    missing = subprocess.run(["bash", str(LAUNCH / "train.sh")], env={"PATH": os.environ["PATH"], "DRY_RUN": "1"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "DATA_DIR" in missing.stderr
