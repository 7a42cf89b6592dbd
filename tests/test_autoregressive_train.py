"""autoregressive_transformers entry points: training (resume after SIGTERM reproduces
the uninterrupted run; 2-process gloo DDP gives the single-process test BPD), a tiny KARM
learning the embedded MNIST digits, generation, completion and bad-input errors."""

from __future__ import annotations

import json
import re
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive_transformers import complete, evaluate, generate, train
from autoregressive_transformers.common import run_main
from autoregressive_transformers.data import load_pixels
from autoregressive_transformers.model import PixelTransformer
from autoregressive_transformers.config import ModelConfig
from krause.training.checkpointer import Checkpointer, load_model_weights
from krause.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--num_layers", "2", "--num_heads", "2", "--window", "32", "--top_k", "16",
        "--batch_size", "4", "--limit_train", "32", "--limit_test", "13", "--device", "cpu", "--no_progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _state(run_dir):
    """The latest checkpoint as {step, model} (through krause.training's export)."""
    ck = Checkpointer(Path(run_dir) / "checkpoints")
    step = ck.latest_step()
    assert step is not None, f"no checkpoint in {run_dir}"
    payload = torch.load(ck.export(Path(run_dir).parent / f"_{Path(run_dir).name}_{step}.pt", step), weights_only=False)
    return {"step": payload["meta"]["step"], "model": payload["app"]["model"]}


def _test_bpds(run_dir):
    return [(r["step"], r["test_bpd"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "test_bpd" in r]


# --------------------------------------------------------------------------- resume (the fault matrix)
FAULT_ARGS = TINY + ["--epochs", "3", "--log_every", "1", "--save_every", "5"]  # 8 steps per epoch, 24 in all
TIMING_KEYS = {"steps_per_s", "tokens_per_s", "tflops_per_device", "mfu", "time", "wall_time", "elapsed_s"}


def _losses(run_dir):
    """Every logged train loss and test BPD by step (timings left out: they are not results)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(Path(run_dir) / "metrics.jsonl")
            if "train_loss" in r or "test_bpd" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(FAULT_ARGS + ["--out_dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_interrupt_then_resume_reproduces_uninterrupted_run(uninterrupted, tmp_path, sig):
    """kill -9 (nothing saved on the way out, the lock stays behind), SIGTERM and Ctrl-C (a clean save and
    exit) at a random step, then --resume: the weights and every logged loss equal the uninterrupted run's."""
    at_step = random.Random().randint(2, 16)  # leaves a few steps for the signal to land before step 24
    parts = tmp_path / "parts"
    proc = subprocess.Popen([sys.executable, "-m", "autoregressive_transformers.train", *FAULT_ARGS,
                             "--out_dir", str(parts)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = parts / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r.get("step", 0) >= at_step for r in read_metrics(metrics)) and \
                (sig != signal.SIGKILL or Checkpointer(parts / "checkpoints").latest_step() is not None):
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    stopped = _state(parts)
    assert stopped["step"] < 24, f"the {sig.name} at step {at_step} should land mid-run: {out[-2000:]}"
    assert not (parts / "results.json").exists()
    if sig == signal.SIGKILL:
        assert (parts / ".lock").is_file()
    else:  # a graceful stop: saved where it stopped, exit 0, the lock released
        assert proc.returncode == 0, out[-3000:]
        assert "rerun with --resume" in out and not (parts / ".lock").exists()
        assert stopped["step"] >= at_step

    assert train.main(FAULT_ARGS + ["--out_dir", str(parts), "--resume"]) == 0
    a, b = _state(uninterrupted), _state(parts)
    assert a["step"] == b["step"] == 24
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert _losses(uninterrupted) == _losses(parts)
    assert json.loads((parts / "results.json").read_text())["test_bpd"] == json.loads(
        (uninterrupted / "results.json").read_text())["test_bpd"]


def test_same_seed_twice_gives_identical_weights_and_metrics(tmp_path):
    """Dropout on, two processes' worth of runs in one: the seed alone decides the run."""
    args = TINY + ["--max_steps", "3", "--log_every", "1", "--dropout", "0.1"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert train.main(args + ["--out_dir", str(run)]) == 0
    a, b = (_state(run) for run in runs)
    assert a["step"] == b["step"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert _losses(runs[0]) == _losses(runs[1]) and len(_losses(runs[0])) == 4
    other = tmp_path / "other_seed"
    assert train.main(args + ["--out_dir", str(other), "--seed", "1"]) == 0
    assert _losses(other) != _losses(runs[0])  # the check can fail: the seed matters


def test_second_writer_on_a_running_run_dir_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "autoregressive_transformers.train", *TINY, "--epochs", "100",
                             "--out_dir", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        before = (out / "config.json").read_bytes()
        for extra in (["--resume"], ["--overwrite"]):
            err = _fails(train.main, TINY + ["--epochs", "100", "--out_dir", str(out), *extra], capsys,
                         "is in use by another trainer")
            assert f"pid {proc.pid}" in err, err
        assert (out / "config.json").read_bytes() == before
    finally:
        proc.kill()
        proc.communicate(timeout=120)


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_gloo_bpd_equals_single_process(tmp_path):
    """Same global batches, no dropout: 2-process DDP training and its whole-test-set BPD
    (13 images: uneven shards) equal the single-process run's."""
    args = TINY + ["--dropout", "0", "--max_steps", "3", "--log_every", "1"]
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main(args + ["--out_dir", str(single)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "autoregressive_transformers.train", *args, "--out_dir", str(double)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((double / "results.json").read_text())["world_size"] == 2

    (s_step, s_bpd), = _test_bpds(single)
    (d_step, d_bpd), = _test_bpds(double)
    assert s_step == d_step == 3
    assert d_bpd == pytest.approx(s_bpd, rel=1e-5)
    for name, tensor in _state(single)["model"].items():
        torch.testing.assert_close(_state(double)["model"][name], tensor, rtol=1e-4, atol=1e-6)
    # The 2-process number is the whole set: re-scoring its checkpoint in one process agrees.
    assert evaluate.main(["--run_dir", str(double), "--checkpoint", "last", "--device", "cpu", "--no_progress",
                          "--batch_size", "5"]) == 0
    one = json.loads((double / "eval_last_test.json").read_text())
    assert one["num_images"] == 13 and one["bpd"] == pytest.approx(d_bpd, rel=1e-9)


# --------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def trained_karm(tmp_path_factory):
    """A tiny KARM trained on the embedded MNIST digits for 150 steps (about 30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("karm") / "run"
    args = ["--attn", "krause", "--dim", "32", "--num_layers", "2", "--num_heads", "2", "--window", "32",
            "--top_k", "16", "--batch_size", "8", "--max_steps", "150", "--lr", "3e-3", "--dropout", "0",
            "--limit_test", "100", "--log_every", "50", "--device", "cpu", "--no_progress", "--out_dir", str(run)]
    assert train.main(args) == 0
    torch.set_num_threads(threads)
    return run


def _stroke_stats(images):
    x = images[..., 0].astype(np.float64)
    horizontal = np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1]
    vertical = np.corrcoef(x[:, :-1, :].ravel(), x[:, 1:, :].ravel())[0, 1]
    return dict(mean=x.mean(), ink_or_paper=((x < 32) | (x > 192)).mean(), horizontal=horizontal, vertical=vertical)


@pytest.mark.slow
def test_tiny_karm_learns_digits_and_samples_strokes(trained_karm):
    results = json.loads((trained_karm / "results.json").read_text())
    assert results["model"] == "KARM" and results["steps"] == 150
    assert results["test_bpd"] < 2.5, results  # uniform over 256 values is 8 bits
    for figure in ("bpd.png", "sigma.png"):
        assert (trained_karm / "figures" / figure).stat().st_size > 1000
    sigmas = [r["sigma"] for r in read_metrics(trained_karm / "metrics.jsonl") if "sigma" in r]
    assert len(sigmas) == 3 and all(len(s) == 2 for s in sigmas) and sigmas[-1] != [2.5, 2.5]  # sigma is learned

    assert generate.main(["--run_dir", str(trained_karm), "--num_samples", "12", "--batch_size", "12",
                          "--device", "cpu", "--no_progress", "--seed", "1"]) == 0
    out = trained_karm / "samples"
    data = np.load(out / "samples_t1_s1.npz")
    assert data["images"].shape == (12, 28, 28, 1) and data["images"].dtype == np.uint8
    assert np.array_equal(data["images"].reshape(12, -1), data["tokens"])
    stats = json.loads((out / "samples_t1_s1.json").read_text())
    assert stats["images_per_s"] > 0 and stats["tokens_per_s"] == pytest.approx(784 * stats["images_per_s"])
    # Krause windows only: layers, K+V, B, H, W + 1 (the W tokens are a view of the last step's W + 1), D, fp32
    assert stats["cache_bytes"] == 2 * 2 * 12 * 2 * (32 + 1) * 16 * 4
    assert (out / "samples_t1_s1.png").stat().st_size > 1000

    learned = _stroke_stats(data["images"])
    # digits: mostly black paper and bright ink, in horizontally and vertically coherent strokes
    assert 5 < learned["mean"] < 100, learned
    assert learned["ink_or_paper"] > 0.85, learned
    assert learned["horizontal"] > 0.5 and learned["vertical"] > 0.15, learned
    # an untrained model's samples are noise: no such structure
    torch.manual_seed(0)
    untrained = PixelTransformer(ModelConfig(attn="krause", dim=32, num_layers=2, num_heads=2, window=32, top_k=16))
    noise = untrained.eval().sample(4, generator=torch.Generator().manual_seed(0)).numpy().astype(np.uint8)
    noisy = _stroke_stats(noise.reshape(4, 28, 28, 1))
    assert abs(noisy["horizontal"]) < 0.2 and noisy["ink_or_paper"] < 0.5, noisy


@pytest.mark.slow
def test_completion_keeps_given_rows_and_scores_the_true_rest(trained_karm):
    assert complete.main(["--run_dir", str(trained_karm), "--num_images", "3", "--num_samples", "2",
                          "--fraction", "0.25", "--device", "cpu", "--no_progress"]) == 0
    out = trained_karm / "completions"
    data = np.load(out / "completion_f0.25_t1_s0.npz")
    rows = int(data["rows_given"])
    assert rows == 7
    truth = load_pixels("mnist", "test", limit=3).numpy().reshape(3, 28, 28, 1)
    assert np.array_equal(data["truth"], truth)
    assert data["samples"].shape == (3, 2, 28, 28, 1)
    assert np.array_equal(data["samples"][:, :, :rows], np.repeat(truth[:, None, :rows], 2, axis=1))
    assert (data["given"][:, rows:] == 128).all()
    # NLL of the true rest = full-image NLL minus the NLL of the given rows
    model = PixelTransformer(ModelConfig.from_dict(json.loads((trained_karm / "config.json").read_text())["model"]))
    load_model_weights(model, trained_karm / "checkpoints" / "best")
    model.eval()
    with torch.no_grad():
        nll = model.nll(torch.from_numpy(truth.reshape(3, 784)), reduction="none").double()
    expected = nll[:, rows * 28:].sum(1)
    np.testing.assert_allclose(data["nll_rest_nats"], expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(data["bpd_rest"], expected.numpy() / ((784 - rows * 28) * np.log(2)), rtol=1e-5)
    summary = json.loads((out / "completion_f0.25_t1_s0.json").read_text())
    assert summary["bpd_rest_mean"] == pytest.approx(float(data["bpd_rest"].mean()))
    assert (out / "completion_f0.25_t1_s0.png").stat().st_size > 1000


# --------------------------------------------------------------------------- bad input
def _fails(main, argv, capsys, match):
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err
    return err


def test_bad_input_one_line_errors_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "run"
    base = TINY + ["--out_dir", str(out)]
    _fails(train.main, base + ["--attn", "flash"], capsys, "attn 'flash' is not registered; registered names: gated,")
    _fails(train.main, base + ["--window", "0"], capsys, "window")
    _fails(train.main, base + ["--top_k", "64"], capsys, "top_k")
    _fails(train.main, base + ["--dataset", "cifar10"], capsys, "needs a data path")
    _fails(train.main, base + ["--data_path", str(tmp_path / "nowhere")], capsys, "no mnist data")
    _fails(train.main, base + ["--batch_size", "64"], capsys, "larger than")
    assert not out.exists()
    _fails(generate.main, ["--run_dir", str(out)], capsys, "no best checkpoint")
    _fails(complete.main, ["--checkpoint", str(tmp_path / "x.pt")], capsys, "does not exist")


def _zeros_inside_the_weights(step_dir: Path, n: int = 4096) -> None:
    """4 KiB of zeros over the middle of the largest shard: the size stays, torch.load reads it happily."""
    shard = max((p for p in step_dir.iterdir() if p.name.endswith(".distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    start = max(0, len(data) // 2 - n // 2)
    data[start:start + n] = b"\0" * min(n, len(data) - start)
    shard.write_bytes(bytes(data))


def test_every_reading_tool_refuses_a_damaged_checkpoint(tmp_path, capsys):
    """evaluate, generate and complete verify what they load (sizes and CRC-32s), as resume does."""
    out = tmp_path / "run"
    assert train.main(TINY + ["--max_steps", "2", "--out_dir", str(out), "--log_every", "1"]) == 0
    best = out / "checkpoints" / "best"
    _zeros_inside_the_weights(best)
    before = sorted(p for p in out.rglob("*"))
    cpu = ["--run_dir", str(out), "--device", "cpu", "--no_progress"]
    for main, extra in ((evaluate.main, []), (generate.main, ["--num_samples", "1", "--batch_size", "1"]),
                        (complete.main, ["--num_images", "1", "--num_samples", "1"])):
        err = _fails(main, cpu + extra, capsys, "CRC-32 mismatch")
        assert str(best) in err, err
    assert sorted(p for p in out.rglob("*")) == before  # nothing written


@pytest.mark.slow
def test_resume_with_another_config_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--max_steps", "2", "--out_dir", str(out), "--peak_tflops", "1", "--log_every", "1"]
    assert train.main(args) == 0
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert all(r["mfu"] > 0 and r["tflops_per_device"] > 0 and r["tokens_per_s"] > 0 for r in logged), logged
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fails(train.main, [a if a != "16" else "8" for a in args[:2]] + args[2:] + ["--resume"], capsys,
           "another config")
    _fails(train.main, args, capsys, "already holds a checkpoint")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    for fraction in ("0", "1", "1.5"):
        _fails(complete.main, ["--run_dir", str(out), "--checkpoint", "last", "--fraction", fraction,
                               "--device", "cpu"], capsys, "--fraction: must be a finite number in (0, 1)")
    # outputs are checked before any work, and never silently replaced
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cpu = ["--run_dir", str(out), "--device", "cpu", "--no_progress"]
    _fails(generate.main, cpu + ["--num_samples", "1", "--out_dir", str(a_file)], capsys, "is not a directory")
    _fails(complete.main, cpu + ["--num_images", "1", "--num_samples", "1", "--out_dir", str(a_file)], capsys,
           "is not a directory")
    _fails(evaluate.main, cpu + ["--out", str(tmp_path)], capsys, "is a directory")
    assert generate.main(cpu + ["--num_samples", "1", "--batch_size", "1", "--attn_impl", "reference"]) == 0
    _fails(generate.main, cpu + ["--num_samples", "1", "--batch_size", "1"], capsys, "pass --overwrite")
    assert generate.main(cpu + ["--num_samples", "1", "--batch_size", "1", "--overwrite"]) == 0
    # the resume point is gone but the run trained (best/ remains): --resume refuses instead of starting over
    ck = Checkpointer(out / "checkpoints")
    for step in ck.steps():
        shutil.rmtree(ck.step_dir(step))
    best = {p: p.read_bytes() for p in (out / "checkpoints" / "best").rglob("*") if p.is_file()}
    _fails(train.main, args + ["--resume"], capsys, "no complete checkpoint to resume from")
    assert {p: p.read_bytes() for p in (out / "checkpoints" / "best").rglob("*") if p.is_file()} == best


# --------------------------------------------------------------------------- launch templates
LAUNCH = REPO / "autoregressive_transformers" / "launch"


def test_launch_templates_are_valid_bash_with_sbatch_headers():
    for name in ("train.sh", "evaluate.sh", "generate.sh", "complete.sh"):
        text = (LAUNCH / name).read_text()
        assert text.startswith("#!/usr/bin/env bash") and "#SBATCH --job-name" in text
        subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)
        for forbidden in ("CUDA_VISIBLE_DEVICES=", "MASTER_PORT=29", "/home/", "/work/"):
            assert forbidden not in text, (name, forbidden)


@pytest.mark.slow
def test_launch_template_passes_a_usage_error_through_as_one_line(tmp_path):
    """torchrun's ChildFailedError block is not printed for a worker's usage error: one line, exit 2,
    and no run directory is created."""
    env = dict(_env(), OUT_DIR=str(tmp_path / "run"), NPROC="1", PRECISION="fp32", EXTRA_ARGS="--window 0 --device cpu")
    done = subprocess.run(["bash", str(LAUNCH / "train.sh")], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "error: argument --window: must be an integer >= 1, got 0 "
        "(see python -m autoregressive_transformers.train --help)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launch_train_survives_sigterm_and_resumes_then_generates(tmp_path):
    out = tmp_path / "run"
    env = dict(_env(), OUT_DIR=str(out), NPROC="1", PRECISION="fp32",
               EXTRA_ARGS="--dim 16 --num_layers 2 --num_heads 2 --window 32 --top_k 16 --batch_size 4 "
                          "--limit_train 240 --limit_test 8 --max_steps 60 --log_every 1 --no_progress --device cpu")
    proc = subprocess.Popen(["bash", str(LAUNCH / "train.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r.get("step", 0) >= 3 for r in read_metrics(metrics)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as Slurm would, to the batch shell: forwarded as SIGUSR1
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, log[-3000:]
    assert "run this script again to resume" in log
    stopped = _state(out)["step"]
    assert 3 <= stopped < 60 and not (out / "results.json").exists()

    done = subprocess.run(["bash", str(LAUNCH / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert json.loads((out / "results.json").read_text())["steps"] == 60
    steps = [r["step"] for r in read_metrics(metrics) if "train_loss" in r]
    assert steps == list(range(1, 61))  # one history, no step twice

    env.update(RUN_DIR=str(out), NUM_SAMPLES="2", BATCH_SIZE="2", NUM_IMAGES="2", EXTRA_ARGS="--no_progress")
    for name in ("generate.sh", "complete.sh"):
        run = subprocess.run(["bash", str(LAUNCH / name)], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (out / "samples" / "samples_t1_s0.npz").is_file()
    assert (out / "completions" / "completion_f0.5_t1_s0.png").is_file()


@pytest.mark.slow
def test_cifar10_files_train_generate_complete_rgb(tmp_path, monkeypatch):
    """The CIFAR-10 preset end to end on torchvision-format files: 3,072 tokens, RGB outputs."""
    import torchvision.datasets.cifar as tv_cifar
    from test_autoregressive import _write_cifar

    data = tmp_path / "data"
    hwc = _write_cifar(str(data), per_batch=2)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    run = tmp_path / "run"
    assert train.main(["--dataset", "cifar10", "--data_path", str(data), "--attn", "krause", "--dim", "16",
                       "--num_layers", "1", "--num_heads", "2", "--window", "64", "--top_k", "32", "--batch_size", "2",
                       "--max_steps", "1", "--device", "cpu", "--no_progress", "--out_dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["seq_len"] == 3072 and config["data_path"] == str(data)
    assert generate.main(["--run_dir", str(run), "--num_samples", "1", "--device", "cpu", "--no_progress"]) == 0
    samples = np.load(run / "samples" / "samples_t1_s0.npz")["images"]
    assert samples.shape == (1, 32, 32, 3)
    assert complete.main(["--run_dir", str(run), "--num_images", "2", "--num_samples", "1", "--device", "cpu",
                          "--no_progress"]) == 0
    done = np.load(run / "completions" / "completion_f0.5_t1_s0.npz")
    assert done["samples"].shape == (2, 1, 32, 32, 3)
    assert np.array_equal(done["truth"], hwc["test_batch"])
    assert np.array_equal(done["samples"][:, 0, :16], hwc["test_batch"][:, :16])


@pytest.mark.slow
def test_demo_runs_end_to_end_with_an_evaluation_before_the_first_log(tmp_path):
    """The demo's first evaluation (step 5) comes before any training-window record with
    sigma: the figures must still be drawn and the demo finish with samples and completions."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "autoregressive_transformers.demo", "--out_dir", str(out),
                           "--steps", "10", "--no_progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "figures" / "bpd.png").exists() and (out / "figures" / "sigma.png").exists()
    assert list((out / "samples").glob("*.png")) and list((out / "completions").glob("*.png"))


# --------------------------------------------------------------------------- progress
def test_training_progress_is_whole_lines_with_rate_and_eta_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    """stderr captured (not a tty): the per-step bar writes whole lines, each with the step count, rate and ETA
    (the interval is 0 here so that every step writes one; a real log gets one line per 10 s)."""
    import krause.training.metrics as km

    monkeypatch.setattr(km, "NON_TTY_INTERVAL_S", 0.0)
    args = [a for a in TINY if a != "--no_progress"] + ["--limit_train", "12", "--epochs", "2", "--max_steps", "5",
                                                        "--log_every", "10", "--out_dir", str(tmp_path / "run")]
    assert train.main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    # 12 images / batch 4 = 3 steps per epoch; --max_steps 5 leaves 2 for the second epoch
    assert any(line.startswith("epoch 1/2:") and "2/3 [" in line for line in lines), lines
    assert any(line.startswith("epoch 2/2:") and "1/2 [" in line for line in lines), lines
    started = [line for line in lines if " 0/" not in line]  # a bar's first line has no rate yet
    assert started and all(re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(step/s|s/step)\]", line)
                           for line in started), lines
