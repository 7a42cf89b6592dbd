"""The README demo (KViT vs ViT on the embedded MNIST digits) at a smaller setting, and the
launch templates run directly (no Slurm): a full run and a preempted-then-resumed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from krause.training import read_metrics
from vision_transformers.fake_data import write_cifar10
from vision_transformers import demo

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_learns_clearly_better_than_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--out_dir", str(out), "--no_progress", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
                    "--train_subset", "2000", "--val_subset", "200", "--epochs", "3", "--batch_size", "16",
                    "--lr", "3e-3", "--no_augment"])
    printed = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    kvit, vit = summary["runs"]["KViT"], summary["runs"]["ViT"]
    # 10 classes: chance is 10%
    assert kvit["best_acc1"] >= 0.28, kvit["best_acc1"]
    assert vit["best_acc1"] >= 0.2, vit["best_acc1"]
    assert kvit["params"] - vit["params"] == 2  # one sigma per layer, nothing else
    assert kvit["flops_per_image"]["attention_flops"] < vit["flops_per_image"]["attention_flops"] / 5
    assert kvit["flops_per_image"]["flops"] < vit["flops_per_image"]["flops"]
    for s in (kvit, vit):
        assert s["train_img_per_s"] > 0 and s["train_time_s"] > 0
    # the side-by-side table is printed, with both rows
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    table = [lines[header], lines[header + 2], lines[header + 3]]
    assert "img/s" in table[0] and "FLOPs/img" in table[0] and "train s" in table[0]
    assert table[1].split()[:2] == ["KViT", f"{100 * kvit['final_acc1']:.2f}"]
    assert table[2].split()[:2] == ["ViT", f"{100 * vit['final_acc1']:.2f}"]
    for fig in ("curves.png", "sigma.png", "attention.png"):
        assert (out / "figures" / fig).stat().st_size > 5000
    for name in ("kvit", "vit"):  # krause.training's DCP layout: the best step in checkpoints/best/
        assert (out / name / "checkpoints" / "best" / "checkpoint.json").is_file()


def _template_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"DATA_PATH": str(tmp_path / "cifar"), "OUT_DIR": str(tmp_path / "run"), "NPROC": "1",
                "NUM_WORKERS": "0", "BATCH_SIZE": "8", "OMP_NUM_THREADS": "1", **extra})
    return env


TINY = ["--no_checksum", "--embed_dim", "16", "--depth", "1", "--num_heads", "2", "--no_progress", "--figures", "none",
        "--no_flops", "--threads", "1"]


@pytest.mark.slow
def test_launch_templates_run_directly_and_resume_after_a_stop_signal(tmp_path):
    write_cifar10(tmp_path / "cifar", per_batch=16)
    script = REPO / "vision_transformers" / "cifar10" / "run_kvit.sh"
    # a direct, complete run; settings from the environment, extra flags passed through
    proc = subprocess.run(["bash", str(script), *TINY], env=_template_env(tmp_path, EPOCHS="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["model"], cfg["dataset"], cfg["batch_size"], cfg["epochs"]) == ("kvit_small_patch4_32", "cifar10", 8, 1)
    assert cfg["resume"] is True  # templates always resume, so a requeued job continues

    # USR1 to the job shell (what `#SBATCH --signal=B:USR1@...` delivers): forwarded, saved, clean exit
    env = _template_env(tmp_path, EPOCHS="500", OUT_DIR=str(tmp_path / "long"))  # 5,000 steps: stopped long before
    job = subprocess.Popen(["bash", str(script), *TINY, "--log_every", "1"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "long" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and metrics.stat().st_size > 0):
        time.sleep(0.1)
    assert metrics.is_file(), "training never started"
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, out[-3000:]
    assert "stop requested" in out
    stopped_at = read_metrics(metrics)[-1]["step"]
    assert 0 < stopped_at < 500 * 10
    # the same command again continues from the latest checkpoint (and is stopped again two steps later)
    job = subprocess.Popen(["bash", str(script), *TINY, "--log_every", "1", "--preempt_at_step", str(stopped_at + 2)],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, out[-3000:]
    assert "resumed from" in out
    steps = [r["step"] for r in read_metrics(metrics) if "train_acc" not in r]
    assert steps[-1] == stopped_at + 2 and steps == sorted(set(steps))  # continued, no step logged twice


def test_demo_stops_with_a_resume_hint_when_a_run_was_interrupted(tmp_path, monkeypatch, capsys):
    """train returns 0 after a stop signal (checkpoint saved, summary unfinished): the demo says to resume."""
    def stopped_run(argv):
        out = Path(argv[argv.index("--out_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"model": "kvit_small_patch4_32", "params": 1}))
        return 0

    monkeypatch.setattr(demo.train, "main", stopped_run)
    assert demo.main(["--out_dir", str(tmp_path / "demo"), "--no_progress"]) == 1
    assert "KViT run stopped before it finished; continue with --resume" in capsys.readouterr().err
