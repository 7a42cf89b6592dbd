"""The LM family's fault matrix, as a user meets it (every run its own process):

- the same seed twice gives bit-identical weights and logged losses;
- kill -9, SIGTERM and SIGINT at a step drawn at random, then --resume, give the uninterrupted
  run's weights and losses bit for bit (the step is printed; KRAUSE_FAULT_SEED replays a draw);
- a second writer on a running run directory is refused in one line, and the run goes on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from language_models_100m import build_fwe10bt, train
from language_models_100m.fake_data import make_documents, train_tokenizer, write_fineweb_parquet

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
FAULT_SEED = int(os.environ.get("KRAUSE_FAULT_SEED", random.SystemRandom().randrange(2**31)))
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_faults")
    docs = make_documents(1200, seed=7)
    write_fineweb_parquet(root / "in" / "a.parquet", docs)
    tok = train_tokenizer(docs, root / "tok.json", vocab_size=256)
    assert build_fwe10bt.main(["--input", str(root / "in"), "--out_dir", str(root / "out"), "--tokenizer", str(tok),
                               "--max_tokens", "0", "--workers", "1", "--no_progress"]) == 0
    return root / "out"


def args(data_dir, out_dir, *extra, steps=STEPS):
    return ["--config", "tiny", "--attention", "gated", "--data_dir", str(data_dir), "--out_dir", str(out_dir),
            "--global_batch", "8", "--micro_batch", "4", "--block_size", "32", "--max_steps", str(steps),
            "--lr", "3e-3", "--log_every", "1", "--eval_every", "3", "--save_every", "2", "--val_tokens", "256",
            "--no_progress", "--device", "cpu", "--seed", "11", *extra]


def run(argv, **kw):
    return subprocess.run([sys.executable, "-m", "language_models_100m.train", *argv], env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


def logged(run_dir):
    """{step: train loss} and {step: val loss} as written, the numbers compared exactly."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["train_loss"] for r in recs if "train_loss" in r},
            {r["step"]: r["val_loss"] for r in recs if "val_loss" in r})


def assert_bit_identical(a, b, what):
    assert logged(a) == logged(b), what
    wa, wb = load_file(str(Path(a) / "hf" / "model.safetensors")), load_file(str(Path(b) / "hf" / "model.safetensors"))
    assert wa.keys() == wb.keys(), what
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and (wa[name] == wb[name]).all(), (what, name)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run(args(data_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_same_seed_twice_gives_bit_identical_weights_and_metrics(data_dir, straight, tmp_path):
    proc = run(args(data_dir, tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(logged(straight)[0]) == list(range(1, STEPS + 1))
    assert_bit_identical(straight, tmp_path / "again", "same seed, second run")
    proc = run(args(data_dir, tmp_path / "other", "--seed", "12", "--max_steps", "1"))
    assert proc.returncode == 0 and logged(tmp_path / "other")[0][1] != logged(straight)[0][1]  # the seed matters


FAULTS = {"kill -9": ("--kill_at_step", -signal.SIGKILL), "SIGTERM": ("--sigterm_at_step", 0),
          "SIGINT": ("--sigint_at_step", 0)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_at_a_random_step_then_resume_is_bit_identical(data_dir, straight, tmp_path, fault):
    flag, code = FAULTS[fault]
    # kill -9 leaves the last saved step (--save_every 2): it must fall after the first save, or
    # there is nothing to resume (refused, rightly); a graceful stop saves the step it stops at
    first = 3 if fault == "kill -9" else 1
    step = random.Random(f"{FAULT_SEED}-{fault}").randint(first, STEPS - 1)
    what = f"{fault} at step {step} (KRAUSE_FAULT_SEED={FAULT_SEED})"
    out = tmp_path / "faulted"
    proc = run(args(data_dir, out, flag, str(step)))
    assert proc.returncode == code, (what, proc.returncode, proc.stderr[-3000:])
    if code == 0:  # a graceful stop saved the step it stopped at
        assert (out / "checkpoints" / f"step-{step:06d}" / "checkpoint.json").is_file(), what
        assert not (out / "hf").exists(), what
    proc = run(args(data_dir, out, "--resume"))
    assert proc.returncode == 0, (what, proc.stderr[-3000:])
    assert_bit_identical(straight, out, what)


def test_a_second_writer_on_a_running_run_is_refused_in_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "language_models_100m.train",
                              *args(data_dir, out, steps=100_000)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and "train_loss" in (out / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:] if first.stderr else ""
            time.sleep(0.5)
        # an auto-resuming launch started twice, a start over the running one, a fresh start
        for extra in (["--resume"], ["--overwrite"], []):  # the holder is named first, whatever else applies
            assert train.main(args(data_dir, out, *extra, steps=100_000)) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith("error: ") and f"pid {first.pid}" in err, (extra, err)
        assert not (out / "checkpoints.replaced").exists()  # --overwrite set nothing of the running run aside
        assert first.poll() is None  # the running trainer was not disturbed
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert any((out / "checkpoints").glob("step-*/checkpoint.json"))  # its graceful stop saved a checkpoint
