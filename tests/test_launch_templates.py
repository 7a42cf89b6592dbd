"""Every family's launch templates go through the one helper per scheduler (scripts/launch/job.sh for the
job, scripts/launch/torchrun.sh for torchrun): the command each template builds (DRY_RUN=1), one rendezvous
port rule and one shutdown timeout for all, resume/requeue after a stop signal, and job-array elements."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "scripts" / "launch"
TEMPLATES = sorted(p for pattern in ("vision_transformers/*/*.sh", "autoregressive_transformers/launch/*.sh",
                                     "lora_llms/scripts/*.sh", "language_models_100m/launch/*.sh")
                   for p in REPO.glob(pattern))
PY = sys.executable
TORCHRUN = [PY, "-m", "krause.training.launch", "--nproc_per_node", "2", "--signals-to-handle",
            "SIGTERM,SIGINT,SIGUSR1", "--shutdown-timeout", "180"]


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NPROC", "NNODES"))}
    env.update(PYTHON=PY, DRY_RUN="1", NPROC="2", PRECISION="fp32", **extra)
    return env


def dry_run(template: str, *args: str, cwd=None, **env) -> list[str]:
    out = subprocess.run(["bash", str(REPO / template), *args], env=clean_env(**env), capture_output=True, text=True,
                         timeout=60, cwd=cwd or REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 1, out.stdout
    return shlex.split(lines[0]) if len(lines) == 1 else [shlex.split(line) for line in lines]


def test_templates_are_thin_and_hard_code_nothing():
    assert len(TEMPLATES) >= 20
    for path in TEMPLATES:
        text = path.read_text()
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
        assert not re.search(r"CUDA_VISIBLE_DEVICES=|MASTER_PORT=\d|/work/|/home/", text), path
        # ports, timeouts, signal forwarding and requeue live in scripts/launch/ only
        for helper_only in ("rdzv", "--shutdown-timeout", "scontrol requeue", "trap ", "torch.distributed.run",
                            "--standalone"):
            assert helper_only not in text, (path, helper_only)
        if "#SBATCH --signal" in text:
            assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text, path
            assert "#SBATCH --open-mode=append" in text, path


# (template, env, extra args) -> the command after the torchrun prefix, or the whole command (no torchrun)
R = str(REPO)
TORCHRUN_CASES = {
    "vision_transformers/cifar10/run_kvit.sh": (
        {"POST_NORM": "1", "EPOCHS": "3"}, ["--lr", "1e-3"],
        ["-m", "vision_transformers.train", "--model", "kvit-s", "--dataset", "cifar10", "--data_path",
         f"{R}/data/cifar10", "--out_dir", f"{R}/runs/cifar10_kvit-s", "--resume", "--epochs", "3",
         "--norm_placement", "post", "--lr", "1e-3"]),
    "vision_transformers/cifar10/run_vit.sh": ({}, [], ["-m", "vision_transformers.train", "--model", "vit-s"]),
    "vision_transformers/cifar10/run_swin.sh": ({}, [], ["-m", "vision_transformers.train", "--model", "swin-t"]),
    "vision_transformers/cifar10/run_kswin.sh": ({}, [], ["-m", "vision_transformers.train", "--model", "kswin-t"]),
    "vision_transformers/imagenet1k/run_kvit.sh": (
        {"SIZE": "B", "SIGMA": "9.0", "DATA_PATH": "/d/in"}, [],
        ["-m", "vision_transformers.train", "--model", "kvit-b-16", "--dataset", "imagenet", "--data_path", "/d/in",
         "--out_dir", f"{R}/runs/imagenet_kvit-b-16", "--resume", "--sigma", "9.0", "--compile"]),
    "vision_transformers/imagenet1k/run_vit.sh": (
        {"NO_COMPILE": "1"}, [], ["-m", "vision_transformers.train", "--model", "vit-s-16", "--dataset", "imagenet",
                                  "--data_path", f"{R}/data/imagenet", "--out_dir", f"{R}/runs/imagenet_vit-s-16",
                                  "--resume"]),
    "autoregressive_transformers/launch/train.sh": (
        {"ATTN": "vanilla", "EXTRA_ARGS": "--max_steps 5"}, [],
        ["-m", "autoregressive_transformers.train", "--dataset", "mnist", "--attn", "vanilla", "--out_dir",
         f"{R}/runs/vanilla_mnist", "--resume", "--epochs", "30", "--lr", "1e-3", "--seed", "0", "--precision", "fp32",
         "--max_steps", "5"]),
    "autoregressive_transformers/launch/evaluate.sh": (
        {"RUN_DIR": "runs/x"}, [],
        ["-m", "autoregressive_transformers.evaluate", "--run_dir", "runs/x", "--checkpoint", "best", "--split", "test",
         "--batch_size", "32", "--precision", "fp32"]),
    "language_models_100m/launch/train.sh": (
        {"DATA_DIR": "d", "CONFIG": "200m", "ATTENTION": "topk", "OUT_DIR": "run"}, [],
        ["-m", "language_models_100m.train", "--config", "200m", "--attention", "topk", "--data_dir", "d", "--out_dir",
         "run", "--global_batch", "512", "--micro_batch", "16", "--max_tokens", "10e9", "--dist", "ddp",
         "--eval_every", "500", "--compile"]),
    "lora_llms/scripts/train_qwen.sh": (
        {"MODEL_PATH": "m", "DATA_DIR": "f", "MODE": "lora"}, ["--max_steps", "2"],
        ["-m", "lora_llms.train", "--mode", "lora", "--model", "m", "--data_dir", "f", "--out_dir",
         f"{R}/runs/lora_qwen15_7b", "--resume", "--max_steps", "2"]),
    "lora_llms/scripts/train_llama.sh": (
        {"MODEL_PATH": "m", "DATA_DIR": "f"}, [],
        ["-m", "lora_llms.train", "--mode", "krause", "--model", "m", "--data_dir", "f", "--out_dir",
         f"{R}/runs/krause_llama3_8b", "--resume"]),
}


@pytest.mark.parametrize("template", sorted(TORCHRUN_CASES))
def test_torchrun_templates_build_the_helpers_command(template):
    env, args, tail = TORCHRUN_CASES[template]
    cmd = dry_run(template, *args, **env)
    assert cmd[:len(TORCHRUN) + 1] == TORCHRUN + ["--standalone"]
    rest = cmd[len(TORCHRUN) + 1:]
    if len(tail) < 6:  # the model only
        assert rest[:len(tail)] == tail
    else:
        assert rest == tail


@pytest.mark.parametrize("template", sorted(TORCHRUN_CASES))
def test_several_nodes_meet_at_one_port_rule(template):
    env = dict(TORCHRUN_CASES[template][0], SLURM_JOB_ID="123", SLURM_JOB_NUM_NODES="4", MASTER_ADDR="node7")
    cmd = dry_run(template, **env)
    assert cmd[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", PY]
    joined = " ".join(cmd)
    assert "--nnodes 4 --rdzv-backend c10d --rdzv-endpoint node7:20123 --rdzv-id 123" in joined
    assert "--standalone" not in cmd


def test_processes_per_node_follow_slurm_tasks_on_a_cpu_node():
    env = clean_env(SLURM_NTASKS_PER_NODE="3(x2)", CUDA_VISIBLE_DEVICES="")
    del env["NPROC"]
    out = subprocess.run(["bash", str(REPO / "autoregressive_transformers/launch/train.sh")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--nproc_per_node 3 " in out.stdout and "1 node(s) x 3 process(es)" in out.stderr


ONCE_CASES = {
    "autoregressive_transformers/launch/generate.sh": (
        {"RUN_DIR": "r", "NUM_SAMPLES": "4"},
        [PY, "-m", "autoregressive_transformers.generate", "--run_dir", "r", "--checkpoint", "best", "--num_samples",
         "4", "--batch_size", "64", "--temperature", "1.0", "--seed", "0", "--precision", "fp32"]),
    "autoregressive_transformers/launch/complete.sh": (
        {"RUN_DIR": "r", "DATA_PATH": "d"},
        [PY, "-m", "autoregressive_transformers.complete", "--run_dir", "r", "--checkpoint", "best", "--fraction",
         "0.5", "--num_images", "8", "--num_samples", "4", "--batch_size", "64", "--temperature", "1.0", "--seed", "0",
         "--precision", "fp32", "--data_path", "d"]),
    "language_models_100m/launch/build_fwe10bt.sh": (
        {"INPUT": "in", "OUT_DIR": "out", "WORKERS": "3"},
        [PY, "-m", "language_models_100m.build_fwe10bt", "--input", "in", "--out_dir", "out", "--tokenizer", "gpt2",
         "--max_tokens", "10e9", "--workers", "3"]),
    "language_models_100m/launch/evaluate.sh": (
        {"MODELS": "runs/a runs/b", "DATA_DIR": "d"},
        [PY, "-m", "language_models_100m.evaluate", "--model", "runs/a", "runs/b", "--out_dir", "results/lm_eval",
         "--tasks", "hellaswag", "piqa", "arc_easy", "blimp", "lambada_openai", "cbt", "--batch_size", "32",
         "--data_dir", "d"]),
}


@pytest.mark.parametrize("template", sorted(ONCE_CASES))
def test_single_process_templates(template):
    env, want = ONCE_CASES[template]
    assert dry_run(template, **env) == want


def test_lora_evaluate_runs_lm_eval_then_sinks():
    evaluate, sinks = dry_run("lora_llms/scripts/evaluate.sh", "--tasks", "boolq", MODEL_PATH="m", ADAPTER="runs/k/adapter",
                              DATA_DIR="f", OUT_DIR="o")
    assert evaluate == [PY, "-m", "lora_llms.evaluate", "--model", "m", "--adapter", "runs/k/adapter", "--label", "k",
                        "--out_dir", "o", "--tasks", "boolq"]
    assert sinks == [PY, "-m", "lora_llms.sinks", "analyze", "--model", "m", "--adapter", "runs/k/adapter",
                     "--data_dir", "f", "--label", "k", "--out_dir", "o/sinks"]


# --------------------------------------------------------------------------- sweeps (job arrays)
@pytest.mark.parametrize("index,want", [(0, "sigma=1.5,window=64,dropout=0.0"), (1, "sigma=1.5,window=64,dropout=0.1"),
                                        (17, "sigma=3.5,window=256,dropout=0.1")])
def test_ar_sweep_element_picks_its_setting_and_run_dir(index, want):
    cmd = dry_run("autoregressive_transformers/launch/sweep.sh", SLURM_ARRAY_TASK_ID=str(index), SLURM_JOB_ID="5",
                  SWEEP_DIR="/s", TEMPLATE="x")
    sigma, window, dropout = (part.split("=")[1] for part in want.split(","))
    assert cmd[cmd.index("--out_dir") + 1] == f"/s/{want}"
    assert cmd[-6:] == ["--sigma", sigma, "--window", window, "--dropout", dropout]


def test_vision_sweep_element_and_bad_indices(tmp_path):
    cmd = dry_run("vision_transformers/cifar10/sweep_kvit.sh", "--epochs", "2", SWEEP_INDEX="5", SWEEP_DIR="/s",
                  SIGMAS="1 2", DROP_PATHS="0.0 0.1 0.2")
    assert cmd[cmd.index("--out_dir") + 1] == "/s/sigma=2,drop_path=0.2"
    assert cmd[-6:] == ["--sigma", "2", "--drop_path", "0.2", "--epochs", "2"]
    for env, message in [({"SWEEP_INDEX": "6"}, "launch: array index 6 is beyond the sweep's 6 runs (0-5); nothing was written"),
                         ({"SWEEP_INDEX": "x"}, "launch: array index must be a whole number, got x"),
                         ({}, "launch: vision_transformers/cifar10/sweep_kvit.sh is a job array of 6 runs: submit it "
                              "with sbatch --array=0-5 vision_transformers/cifar10/sweep_kvit.sh (or set SWEEP_INDEX)"),
                         ({"SWEEP_INDEX": "0", "SIGMAS": " "}, "launch: the sweep over SIGMA has no values")]:
        full = clean_env(**{"SWEEP_DIR": str(tmp_path / "s"), "SIGMAS": "1 2", "DROP_PATHS": "0.0 0.1 0.2", **env})
        out = subprocess.run(["bash", str(REPO / "vision_transformers/cifar10/sweep_kvit.sh")], env=full,
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert (out.returncode, out.stderr.strip().splitlines()) == (2, [message])
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- stop signal -> save -> requeue
WORKER = """
import os, signal, sys, time
def stop(*_):
    os.makedirs(sys.argv[1], exist_ok=True)
    open(os.path.join(sys.argv[1], "latest"), "w").write("step-3")
    sys.exit(int(sys.argv[2]))
signal.signal(signal.SIGTERM, stop)
open(sys.argv[3], "w").write("ready")
time.sleep(60)
sys.exit(5)
"""


def _job_script(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(f'source "{HELPERS}/job.sh"\nCHECKPOINT_DIR="$1"\nrun_job "$PYTHON" -c "$WORKER" "$@"\n')
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (fake / "scontrol").chmod(0o755)
    return script, f"{fake}:{os.environ['PATH']}"


@pytest.mark.parametrize("slurm", [True, False])
def test_stop_signal_saves_then_requeues_under_slurm(tmp_path, slurm):
    import signal
    import time

    script, path = _job_script(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=PY, WORKER=WORKER, PATH=path, **({"SLURM_JOB_ID": "77"} if slurm else {}))
    ready = tmp_path / "ready"
    proc = subprocess.Popen(["bash", str(script), str(tmp_path / "ck"), "0", str(ready)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "asking the workers to save and exit" in err
    if slurm:
        assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
        assert "requeueing job 77" in out
    else:
        assert not (tmp_path / "scontrol.log").exists() and "run this script again to resume" in out


def test_a_failed_run_without_a_save_is_not_requeued(tmp_path):
    script, path = _job_script(tmp_path)
    env = dict(os.environ, PYTHON=PY, WORKER="import sys; sys.exit(3)", PATH=path, SLURM_JOB_ID="77")
    done = subprocess.run(["bash", str(script), str(tmp_path / "ck")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3 and not (tmp_path / "scontrol.log").exists()


def test_run_once_runs_each_command_and_stops_at_a_failure(tmp_path):
    script = tmp_path / "steps.sh"
    script.write_text(f'source "{HELPERS}/job.sh"\nrun_once echo first\nrun_once echo second\nrun_once false\n'
                      'run_once echo never\n')
    done = subprocess.run(["bash", str(script)], env=dict(os.environ, PYTHON=PY), capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout.split()) == (1, ["first", "second"])


# --------------------------------------------------------------------------- collecting a sweep
def _element(root: Path, name: str, records: list[dict]) -> None:
    import json

    (root / name).mkdir(parents=True)
    (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sweep_collect_tabulates_the_last_values_and_plots(tmp_path):
    from krause.training import sweep

    _element(tmp_path, "sigma=2.5,window=64", [{"step": 1, "train_loss": 3.0}, {"step": 4, "test_bpd": 2.0},
                                              {"step": 8, "test_bpd": 1.5, "sigma": [1.0, 2.0]}])
    _element(tmp_path, "sigma=10,window=64", [{"step": 8, "test_bpd": 1.25, "val_acc": 0.5}])
    _element(tmp_path, "sigma=1.5,window=64", [])  # pending: listed with empty cells
    (tmp_path / "figures").mkdir()  # not an element: ignored
    assert sweep.parse_element("sigma=2.5,window=64") == {"sigma": "2.5", "window": "64"}
    assert sweep.parse_element("figures") is None and sweep.parse_element("a=1,b") is None
    names, metrics, rows = sweep.collect(tmp_path)
    assert names == ["sigma", "window"] and metrics == ["test_bpd", "val_acc"]
    assert [r["sigma"] for r in rows] == ["1.5", "2.5", "10"]  # numeric order, not string order
    assert rows[1] == {"sigma": "2.5", "window": "64", "step": 8, "test_bpd": 1.5}
    assert sweep.main([str(tmp_path), "--metric", "test_bpd"]) == 0
    assert (tmp_path / "sweep.md").read_text().splitlines() == [
        "| sigma | window | step | test_bpd |", "|---|---|---|---|", "| 1.5 | 64 |  |  |", "| 2.5 | 64 | 8 | 1.5 |",
        "| 10 | 64 | 8 | 1.25 |"]
    assert (tmp_path / "sweep.csv").read_text().splitlines()[0] == "sigma,window,step,test_bpd"
    assert (tmp_path / "sweep.png").stat().st_size > 5000


def test_sweep_collect_bad_input_is_one_line(tmp_path, capsys):
    from krause.training import sweep

    assert sweep.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: sweep_dir: no such folder {tmp_path / 'missing'}"]
    assert sweep.main([str(tmp_path)]) == 2
    assert "holds no run dirs named like" in capsys.readouterr().err
    _element(tmp_path, "sigma=1", [])
    _element(tmp_path, "window=2", [])
    assert sweep.main([str(tmp_path)]) == 2
    assert "sets window, the others sigma" in capsys.readouterr().err
    assert not (tmp_path / "sweep.md").exists()


# --------------------------------------------------------------------------- krause.training.launch's one line
@pytest.mark.parametrize("codes,line", [
    ({0: -15, 1: -9}, "launch: rank 1 failed (killed by signal 9); its traceback is above"),  # rank 0: torchrun's SIGTERM
    ({0: 1, 1: -9}, "launch: rank 1 failed (killed by signal 9); its traceback is above"),  # rank 0: broken connection
    ({0: -15, 1: 3}, "launch: rank 1 failed (exit code 3); its traceback is above"),
])
def test_launch_names_the_rank_that_caused_the_failure(monkeypatch, capsys, tmp_path, codes, line):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from krause.training import launch

    def fail(args):
        failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                         error_file=str(tmp_path / "none.json")) for rank, code in codes.items()}
        for failure in failures.values():
            failure.timestamp, failure.message = 1000, ""
        raise ChildFailedError("worker", failures)

    monkeypatch.setattr(torchrun, "run", fail)
    code = launch.main(["--nproc_per_node", "2", "--standalone", "-m", "nothing"])
    assert code == (3 if 3 in codes.values() else 1)
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
