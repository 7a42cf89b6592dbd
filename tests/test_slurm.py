"""The launch templates submitted to a real (one-node, local) Slurm: each family's training
template runs and exits 0, preemption checkpoints + requeues + resumes to the same metrics as an
uninterrupted run, a sweep runs as a job array and is collected, two tasks form one process
group and a killed task fails the job, bad input is one line.

Needs a running Slurm (`bash scripts/slurm_local.sh start`, which .ci/run does); without one
every test here is skipped with that reason. The jobs run on the CPU at a tiny size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from krause.training import read_metrics

# the job-running tests are slow too; the header check is quick. One xdist group: under
# scripts/run_tests.sh (--dist loadgroup) they run on one worker in file order, beside the
# module fixture that cancels their leftover jobs
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

REPO = Path(__file__).resolve().parents[1]
AR = REPO / "autoregressive_transformers" / "launch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# a tiny KARM on 64 of the embedded MNIST digits
AR_TINY = ("--dim 16 --num_layers 1 --num_heads 2 --window 32 --top_k 16 --batch_size 4 --limit_train 64 "
           "--limit_test 8 --log_every 1 --save_every 1000 --no_progress --device cpu")


def _slurm_ready() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm is not installed (bash scripts/slurm_local.sh start installs and starts a local one; .ci/run does)"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = done.stdout.split()
    if done.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return (f"no Slurm node is up ({(done.stderr or ' '.join(states) or 'no nodes').strip()}); "
                "start one with bash scripts/slurm_local.sh start")
    return None


SUBMITTED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = _slurm_ready()
    if reason:
        pytest.skip(reason)
    yield
    if SUBMITTED:  # a failed test leaves no job behind
        subprocess.run(["scancel", *SUBMITTED], capture_output=True, timeout=60)


def job_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MASTER_", "RANK", "WORLD_"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO), **extra)
    return env


def submit(script: Path, tmp_path: Path, *sbatch_args: str, env: dict, name: str = "job", args=()) -> str:
    out = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/{name}-%j.out", f"--chdir={tmp_path}",
                          *sbatch_args, str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    SUBMITTED.append(out.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout.splitlines()[0]))


def release_requeued() -> None:
    """Slurm holds a requeued job for 2 minutes (Reason=BeginTime) before it may start again: start them sooner.

    Not at once: slurmd refuses a launch credential stamped in the same second as (or before) the requeue's
    revocation of the job's credentials ("Job credential revoked"; Slurm's own hold exists for that), so a
    job released `now` lands in that second when the requeue is fast. Two seconds on is always after it."""
    held = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True, timeout=30)
    for line in held.stdout.splitlines():
        job, _, reason = line.partition(" ")
        if reason.strip() == "BeginTime" and job.split("_")[0] in {j.split("_")[0] for j in SUBMITTED}:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], capture_output=True, timeout=30)


def wait_for(job: str, timeout: float = 600, release: bool = True) -> dict[str, str]:
    """Polls until the job ended, releasing this test's requeued jobs from Slurm's hold on the way."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info["JobState"] in TERMINAL:
            return info
        if release:
            release_requeued()
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"job {job} did not end within {timeout} s: {job_info(job)}")


def log_of(tmp_path: Path, name: str, job: str) -> str:
    return (tmp_path / f"{name}-{job}.out").read_text()


def wait_for_step(metrics: Path, step: int, job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and any(r.get("step", 0) >= step and "train_loss" in r for r in read_metrics(metrics)):
            return
        assert job_info(job)["JobState"] not in TERMINAL, f"job {job} ended before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"job {job} never reached step {step}")


def sacct_states(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-c", "-n", "-X", "-j", job, "-o", "State"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.split()


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r}


# --------------------------------------------------------------------------- every template's headers
TEMPLATES = sorted(p for pattern in ("vision_transformers/*/*.sh", "autoregressive_transformers/launch/*.sh",
                                     "lora_llms/scripts/*.sh", "language_models_100m/launch/*.sh")
                   for p in REPO.glob(pattern) if "#SBATCH" in p.read_text())


def test_every_template_is_accepted_by_slurm_as_written(tmp_path):
    """`sbatch --test-only` checks each template's own #SBATCH headers against the cluster without running it."""
    assert len(TEMPLATES) >= 18
    for template in TEMPLATES:
        out = subprocess.run(["sbatch", "--test-only", f"--chdir={tmp_path}", str(template)], env=job_env(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "to start at" in out.stderr, (template, out.stderr)


# --------------------------------------------------------------------------- one template per family
@pytest.mark.slow
def test_every_family_trains_under_sbatch(tmp_path):
    """The four families' training templates, submitted with their own #SBATCH headers, at once."""
    from language_models_100m import build_fwe10bt
    from language_models_100m.fake_data import make_documents, train_tokenizer, write_fineweb_parquet
    from lora_llms.testing import write_flan_dir, write_tiny_model
    from vision_transformers.fake_data import write_cifar10

    write_cifar10(tmp_path / "cifar", per_batch=16)
    docs = make_documents(1500, seed=2)
    write_fineweb_parquet(tmp_path / "fwe" / "a.parquet", docs)
    tok = train_tokenizer(docs, tmp_path / "tok.json", vocab_size=256)
    assert build_fwe10bt.main(["--input", str(tmp_path / "fwe"), "--out_dir", str(tmp_path / "lmdata"), "--tokenizer",
                               str(tok), "--max_tokens", "0", "--workers", "1", "--no_progress"]) == 0
    model = write_tiny_model(tmp_path / "qwen2", "qwen2")
    flan = write_flan_dir(tmp_path / "flan", n=40)

    runs = {name: tmp_path / name for name in ("vision", "ar", "lm", "lora")}
    jobs = {
        "vision": submit(REPO / "vision_transformers" / "cifar10" / "run_kvit.sh", tmp_path, name="vision", env=job_env(
            DATA_PATH=str(tmp_path / "cifar"), OUT_DIR=str(runs["vision"]), EPOCHS="1", BATCH_SIZE="8", NUM_WORKERS="0"),
            args=["--no_checksum", "--embed_dim", "16", "--depth", "1", "--num_heads", "2", "--no_progress",
                  "--figures", "none", "--no_flops", "--threads", "1", "--device", "cpu"]),
        "ar": submit(AR / "train.sh", tmp_path, name="ar",
                     env=job_env(OUT_DIR=str(runs["ar"]), EXTRA_ARGS=AR_TINY + " --max_steps 4")),
        "lm": submit(REPO / "language_models_100m" / "launch" / "train.sh", tmp_path, name="lm", env=job_env(
            CONFIG="tiny", ATTENTION="gated", DATA_DIR=str(tmp_path / "lmdata"), OUT_DIR=str(runs["lm"]), COMPILE="0",
            GLOBAL_BATCH="4", MICRO_BATCH="2", EVAL_EVERY="2",
            EXTRA_ARGS="--block_size 32 --max_steps 3 --save_every 2 --val_tokens 128 --device cpu --no_progress")),
        "lora": submit(REPO / "lora_llms" / "scripts" / "train_qwen.sh", tmp_path, name="lora",
                       env=job_env(MODEL_PATH=str(model), DATA_DIR=str(flan), OUT_DIR=str(runs["lora"])),
                       args=["--num_train", "8", "--num_eval", "2", "--max_length", "128", "--max_steps", "2",
                             "--batch_size", "2", "--grad_accum", "1", "--precision", "fp32", "--num_workers", "0",
                             "--window", "8", "--top_k", "4"]),
    }
    queued = subprocess.run(["squeue", "-h", "-j", ",".join(jobs.values()), "-o", "%i %T"], capture_output=True,
                            text=True, timeout=30).stdout
    assert all(job in queued for job in jobs.values()), queued
    for name, job in jobs.items():
        info = wait_for(job, timeout=900)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (name, info, log_of(tmp_path, name, job))
        assert "COMPLETED" in sacct_states(job), name
        assert (runs[name] / "metrics.jsonl").is_file(), name
    assert json.loads((runs["ar"] / "results.json").read_text())["steps"] == 4
    assert json.loads((runs["vision"] / "config.json").read_text())["epochs"] == 1
    assert max(r["step"] for r in read_metrics(runs["lm"] / "metrics.jsonl")) == 3
    assert (runs["lora"] / "adapter").is_dir()


# --------------------------------------------------------------------------- preemption
@pytest.mark.slow
def test_signals_checkpoint_requeue_and_resume_to_the_uninterrupted_metrics(tmp_path):
    """`scancel --signal=USR1 --batch` (the warning Slurm sends with --signal=B:USR1@..) to one job and a SIGTERM
    to every process of another: the workers save, each job requeues itself, the requeued job resumes from the
    run dir, and the metrics equal an uninterrupted run's exactly (KARM on the CPU is deterministic)."""
    # Long enough that the signal, sent at step 3 through slurmctld (about a second), lands
    # mid-run: the tiny model trains tens of steps a second, and 20 steps could end first.
    steps = 300
    extra = AR_TINY + f" --max_steps {steps}"
    runs = {name: tmp_path / name for name in ("reference", "usr1", "term")}
    jobs = {name: submit(AR / "train.sh", tmp_path, name=name, env=job_env(OUT_DIR=str(run), EXTRA_ARGS=extra))
            for name, run in runs.items()}
    signals = {"usr1": ["--signal=USR1", "--batch"], "term": ["--signal=TERM", "--full"]}
    for name, how in signals.items():
        wait_for_step(runs[name] / "metrics.jsonl", 3, jobs[name])
        subprocess.run(["scancel", *how, jobs[name]], check=True, timeout=30)
    infos = {name: wait_for(job, timeout=600) for name, job in jobs.items()}
    assert infos["reference"]["JobState"] == "COMPLETED", log_of(tmp_path, "reference", jobs["reference"])[-3000:]
    want = train_losses(runs["reference"])
    expected = json.loads((runs["reference"] / "results.json").read_text())
    assert sorted(want) == list(range(1, steps + 1))
    for name in signals:
        info, log = infos[name], log_of(tmp_path, name, jobs[name])
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, log[-3000:])
        assert f"requeueing job {jobs[name]}" in log and "resumed from" in log, log[-3000:]
        assert train_losses(runs[name]) == want, name  # one history, no step twice, the same losses
        result = json.loads((runs[name] / "results.json").read_text())
        assert (result["test_bpd"], result["steps"]) == (expected["test_bpd"], steps), name


# --------------------------------------------------------------------------- sweeps as job arrays
@pytest.mark.slow
def test_sweep_array_runs_one_dir_per_element_and_collects(tmp_path):
    """A 3-element array, one run dir per element named by its settings, collected into a table and a plot; an
    index beyond the grid and an element whose run dir is held by a running trainer are one line and write
    nothing."""
    from krause.training import RunLock

    sweep = tmp_path / "sweep"
    env = job_env(SWEEP_DIR=str(sweep), SIGMAS="1.5 2.5 3.5", WINDOWS="32", DROPOUTS="0.0",
                  EXTRA_ARGS=AR_TINY + " --max_steps 3")
    job = submit(AR / "sweep.sh", tmp_path, "--array=0-2", name="sweep", env=env)
    beyond = submit(AR / "sweep.sh", tmp_path, "--array=3", name="beyond", env=env)
    for element in range(3):
        info = wait_for(f"{job}_{element}", timeout=600)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    names = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert names == ["sigma=1.5,window=32,dropout=0.0", "sigma=2.5,window=32,dropout=0.0",
                     "sigma=3.5,window=32,dropout=0.0"]
    for name in names:
        model = json.loads((sweep / name / "config.json").read_text())["model"]
        assert name == f"sigma={model['sigma']},window={model['window']},dropout={model['dropout']}"

    info = wait_for(f"{beyond}_3", timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    lines = [ln for ln in (tmp_path / f"beyond-{beyond}.out").read_text().splitlines() if ln.strip()]
    assert lines == ["launch: array index 3 is beyond the sweep's 3 runs (0-2); nothing was written"]
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == names

    # element 1 again while a trainer (this test, standing in for a running element) holds its run dir
    held = sweep / names[1]
    before = {p: p.read_bytes() for p in held.rglob("*") if p.is_file()}
    with RunLock(held / ".lock") as lock:
        assert (held / ".lock").is_file() and lock.held
        again = submit(AR / "sweep.sh", tmp_path, "--array=1", name="again", env=env)
        info = wait_for(f"{again}_1", timeout=300)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
        errors = [ln for ln in (tmp_path / f"again-{again}.out").read_text().splitlines()
                  if ln.strip() and not ln.startswith("launch: krause on")]
        assert len(errors) == 1 and "is in use by another trainer" in errors[0], errors
        assert {p: p.read_bytes() for p in held.rglob("*") if p.is_file() and p.name != ".lock"} == \
            {p: b for p, b in before.items() if p.name != ".lock"}

    collect = subprocess.run([sys.executable, "-m", "krause.training.sweep", str(sweep)], env=job_env(),
                             capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0, collect.stderr
    table = (sweep / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| sigma | window | dropout | step |") and "test_bpd" in table[0]
    rows = [ln.split("|")[1:-1] for ln in table[2:]]
    assert [r[0].strip() for r in rows] == ["1.5", "2.5", "3.5"] and all(r[3].strip() == "3" for r in rows)
    bpd = [json.loads((sweep / n / "results.json").read_text())["test_bpd"] for n in names]
    column = table[0].split("|")[1:-1].index(" test_bpd ")
    assert [float(r[column]) for r in rows] == pytest.approx(bpd, rel=1e-5)
    assert (sweep / "sweep.png").stat().st_size > 5000 and (sweep / "sweep.csv").is_file()


def test_bad_submissions_are_one_line(tmp_path):
    env = job_env(SWEEP_DIR=str(tmp_path / "sweep"))
    # a missing partition: sbatch itself refuses (its own two lines), before anything runs or is written
    missing = subprocess.run(["sbatch", "--partition=no_such_partition", str(AR / "train.sh")],
                             env=dict(env, OUT_DIR=str(tmp_path / "run")), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "invalid partition specified: no_such_partition" in missing.stderr
    assert not (tmp_path / "run").exists()
    outside = subprocess.run(["bash", str(AR / "sweep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and outside.stderr.strip().splitlines() == [
        "launch: autoregressive_transformers/launch/sweep.sh is a job array of 18 runs: submit it with "
        "sbatch --array=0-17 autoregressive_transformers/launch/sweep.sh (or set SWEEP_INDEX)"]
    assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------- multi-task rendezvous
def _worker_pids(job: str, rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"RANK={rank}".encode() in environ and \
                b"TORCHELASTIC_RUN_ID=none" not in environ and any(e.startswith(b"LOCAL_RANK=") for e in environ):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_two_tasks_form_one_process_group_and_a_killed_task_fails_the_job(tmp_path):
    """--ntasks-per-node=2: the two processes train as one group (world size 2); in a second job, SIGKILL to
    rank 1 stops rank 0 too and fails the job with one line naming rank 1, not requeued."""
    run, killed = tmp_path / "run", tmp_path / "killed"
    job = submit(AR / "train.sh", tmp_path, "--ntasks-per-node=2", name="two", env=job_env(
        OUT_DIR=str(run), EXTRA_ARGS=AR_TINY + " --max_steps 3"))
    kill = submit(AR / "train.sh", tmp_path, "--ntasks-per-node=2", name="kill", env=job_env(
        OUT_DIR=str(killed), EXTRA_ARGS=AR_TINY + " --max_steps 100000"))
    wait_for_step(killed / "metrics.jsonl", 2, kill)
    pids = _worker_pids(kill, 1)
    assert pids, "no rank-1 worker found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    info = wait_for(kill, timeout=300, release=False)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    log = log_of(tmp_path, "kill", kill)
    assert "launch: rank 1 failed (killed by signal 9)" in log, log[-3000:]
    assert not (killed / "results.json").exists()

    info = wait_for(job, timeout=600)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(tmp_path, "two", job)[-3000:]
    assert "1 node(s) x 2 process(es)" in log_of(tmp_path, "two", job)
    assert json.loads((run / "results.json").read_text())["world_size"] == 2
