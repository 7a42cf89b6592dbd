"""The vision training entry point: exact kill-and-resume, 2-process torchrun (gloo) equal to
one process, run directory contents, and one-line errors that leave nothing overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from krause.training import Checkpointer, read_metrics
from vision_transformers.fake_data import write_cifar10, write_image_folder
from vision_transformers import train

REPO = Path(__file__).resolve().parents[1]
# A tiny KViT on 192 embedded MNIST digits: 6 steps per epoch.
TINY = ["--model", "kvit-s", "--dataset", "mnist", "--embed_dim", "16", "--depth", "2", "--num_heads", "2",
        "--train_subset", "192", "--val_subset", "64", "--batch_size", "32", "--epochs", "2", "--log_every", "2",
        "--no_progress", "--no_flops", "--num_workers", "0", "--figures", "none", "--device", "cpu"]
VOLATILE = {"time", "img_per_s", "epoch_time", "eval_time"}


def _latest(run: Path) -> dict:
    """The latest checkpoint as {step, model, train_state} (through krause.training's export)."""
    ck = Checkpointer(run / "checkpoints")
    step = ck.latest_step()
    payload = torch.load(ck.export(run.parent / f"_{run.name}_{step}.pt", step), weights_only=False)
    return {"step": payload["meta"]["step"], "model": payload["app"]["model"],
            "train_state": json.loads(payload["app"]["train_state"]["json"])}


def _stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def _assert_same_records(a, b, rel=1e-6):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            va, vb = ra[key], rb[key]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=rel, abs=1e-9), (key, ra["step"], va, vb)
            else:
                assert va == vb, (key, ra["step"])


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    # MixUp/CutMix (numpy RNG), drop-path (torch RNG) and per-sample augmentation all on.
    args = TINY + ["--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1"]
    assert train.main(args + ["--out_dir", str(tmp_path / "full")]) == 0
    # SIGTERM arrives after step 4 (mid-epoch 1): the run saves step 4 and exits cleanly
    assert train.main(args + ["--out_dir", str(tmp_path / "cut"), "--preempt_at_step", "4"]) == 0
    state = _latest(tmp_path / "cut")
    assert state["step"] == 4 and set(state["train_state"]["sums"]) >= {"loss", "correct", "count"}
    # resumed with a different number of loader workers: augmentation does not depend on it
    resumed = args + ["--out_dir", str(tmp_path / "cut"), "--resume"]
    resumed[resumed.index("--num_workers") + 1] = "2"
    assert train.main(resumed) == 0

    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [r["step"] for r in full] == [2, 4, 6, 6, 8, 10, 12, 12]
    _assert_same_records(_stable(full), _stable(cut))
    for name in ("full", "cut"):
        run = tmp_path / name
        assert (run / "checkpoints" / "best" / "checkpoint.json").is_file()
        config = json.loads((run / "config.json").read_text())
        assert config["model"] == "kvit_small_patch4_32" and config["lr"] == 1e-3  # resolved recipe
    a = _latest(tmp_path / "full")["model"]
    b = _latest(tmp_path / "cut")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    # sigma is logged per layer every epoch and is trained (not decayed, not frozen)
    sig = [r["sigma"] for r in full if "sigma" in r]
    assert len(sig) == 2 and len(sig[0]) == 2 and sig[-1] != [2.5, 2.5]


def test_run_directory_summary_and_figures(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--out_dir", str(out), "--epochs", "1", "--figures", "all"]
    args.remove("--no_flops")
    assert train.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == sum(p.numel() for p in train.create(
        "kvit-s", embed_dim=16, depth=2, num_heads=2, img_size=28, in_chans=1).parameters())
    assert summary["flops_per_image"]["flops"] > 0 and summary["train_img_per_s"] > 0
    assert 0 <= summary["best_acc1"] <= 1 and len(summary["sigma"]) == 2
    for fig in ("curves.png", "sigma.png", "attention.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    epoch = [r for r in read_metrics(out / "metrics.jsonl") if "test_acc1" in r][-1]
    assert epoch["test_samples"] == 64 and 0 <= epoch["test_acc1"] <= epoch["test_acc5"] <= 1
    # a finished run is not clobbered by a second launch without --resume / --overwrite
    assert train.main(args) == 2


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, argv, match):
    rc = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_bad_input_gives_one_line_errors_and_overwrites_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out_dir", str(out), "--epochs", "1"]) == 0
    capsys.readouterr()
    before = _hashes(out)

    # a checkpoint from another model (the run directory of a KViT resumed as a ViT)
    _one_line_error(capsys, [a if a != "kvit-s" else "vit-s" for a in TINY] + ["--out_dir", str(out), "--resume"],
                    "another config: | epochs: 1 -> 2 | model: 'kvit_small_patch4_32' -> 'vit_small_patch4_32'")
    # hyper-parameters out of range
    _one_line_error(capsys, TINY + ["--out_dir", str(out), "--resume", "--top_k", "0"], "--top_k: must be an integer >= 1, got 0")
    _one_line_error(capsys, TINY + ["--out_dir", str(out), "--resume", "--sigma", "-1"], "--sigma: must be a finite number > 0")
    _one_line_error(capsys, TINY + ["--out_dir", str(out), "--resume", "--warmup_epochs", "9"], "--warmup_epochs")
    # Krause flags on a baseline
    _one_line_error(capsys, ["--model", "vit-s", "--sigma", "2", "--out_dir", str(tmp_path / "x")], "--sigma applies")
    # batch size that does not split over the ranks, checked before any process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    _one_line_error(capsys, TINY[:-2] + ["--batch_size", "33", "--out_dir", str(tmp_path / "y")],
                    "not divisible by the world size 2")
    monkeypatch.delenv("WORLD_SIZE")
    assert _hashes(out) == before

    # a corrupted checkpoint
    last = next((out / "checkpoints").glob("step-*/__0_0.distcp"))
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    before = _hashes(out)
    line = _one_line_error(capsys, TINY + ["--out_dir", str(out), "--resume"], "corrupted")
    assert "step-000006" in line and "no older complete checkpoint" in line
    assert _hashes(out) == before

    # image size not divisible by the patch size, missing and malformed dataset folders
    write_image_folder(tmp_path / "imnet", classes=("a", "b"), per_class=(2, 1), size=(20, 20))
    common = ["--no_progress", "--no_flops", "--epochs", "1", "--batch_size", "2", "--num_workers", "0"]
    _one_line_error(capsys, ["--model", "kvit-s-16", "--dataset", "imagenet", "--data_path", str(tmp_path / "imnet"),
                             "--img_size", "40", "--out_dir", str(tmp_path / "a")] + common, "not divisible by patch_size")
    _one_line_error(capsys, ["--dataset", "cifar10", "--data_path", str(tmp_path / "none"), "--no_download",
                             "--out_dir", str(tmp_path / "b")] + common, "does not exist")
    write_cifar10(tmp_path / "cifar")
    os.remove(tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch")
    _one_line_error(capsys, ["--dataset", "cifar10", "--data_path", str(tmp_path / "cifar"), "--no_checksum",
                             "--out_dir", str(tmp_path / "c")] + common, "missing test_batch")
    for name in ("a", "b", "c", "x", "y"):
        assert not (tmp_path / name).exists()  # failed launches leave no run directory behind


def test_cifar10_and_imagenet_runs_through_the_entry_point(tmp_path):
    """One step of each real pipeline: CIFAR-10 batches (mixing, recipe of the paper) and an ImageFolder tree."""
    write_cifar10(tmp_path / "cifar", per_batch=4)
    small = ["--embed_dim", "16", "--epochs", "1", "--no_progress", "--num_workers", "0", "--figures", "none"]
    assert train.main(["--model", "kvit-s", "--dataset", "cifar10", "--data_path", str(tmp_path / "cifar"),
                       "--no_checksum", "--depth", "2", "--num_heads", "2", "--batch_size", "10",
                       "--out_dir", str(tmp_path / "c10")] + small) == 0
    cfg = json.loads((tmp_path / "c10" / "config.json").read_text())
    assert (cfg["lr"], cfg["weight_decay"], cfg["mixup"], cfg["cutmix"], cfg["cutmix_prob"]) == (3e-4, 0.05, 0.8, 1.0, 0.8)
    rec = [r for r in read_metrics(tmp_path / "c10" / "metrics.jsonl") if "test_acc1" in r]
    assert rec and rec[-1]["test_samples"] == 8

    assert train.main(["--model", "kswin-t", "--dataset", "cifar10", "--data_path", str(tmp_path / "cifar"),
                       "--no_checksum", "--depths", "1,1,1,1", "--num_heads", "2,2,2,2", "--batch_size", "10",
                       "--out_dir", str(tmp_path / "swin")] + small) == 0
    cfg = json.loads((tmp_path / "swin" / "config.json").read_text())
    assert (cfg["lr"], cfg["weight_decay"], cfg["re_prob"]) == (2e-3, 0.01, 0.25)
    assert cfg["warmup_epochs"] == pytest.approx(20 / 300)  # the recipe's warmup fraction of a 1-epoch run

    write_image_folder(tmp_path / "imnet", classes=("a", "b", "c"), per_class=(4, 2), size=(40, 40))
    assert train.main(["--model", "kvit-s-16", "--dataset", "imagenet", "--data_path", str(tmp_path / "imnet"),
                       "--img_size", "64", "--depth", "2", "--num_heads", "2", "--amp", "bf16", "--channels_last",
                       "--batch_size", "4", "--out_dir", str(tmp_path / "in1k")] + small) == 0
    cfg = json.loads((tmp_path / "in1k" / "config.json").read_text())
    assert (cfg["lr"], cfg["randaugment"], cfg["re_prob"]) == (5e-4, "rand-m9-n2", 0.25)
    summary = json.loads((tmp_path / "in1k" / "summary.json").read_text())
    assert summary["flops_per_image"]["flops"] > 0


@pytest.mark.slow
def test_torchrun_two_processes_gloo_equals_one_process(tmp_path):
    """2 ranks x 16 images == 1 rank x 32 images: same sample order (set_epoch(epoch)), averaged
    gradients and test metrics summed over both shards (mixing and drop-path off, so no per-rank RNG)."""
    args = TINY + ["--mixup", "0", "--cutmix", "0", "--drop_path", "0", "--val_subset", "63"]
    assert train.main(args + ["--out_dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vision_transformers.train", *args, "--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _stable(read_metrics(tmp_path / "one" / "metrics.jsonl"))
    two = _stable(read_metrics(tmp_path / "two" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [r["step"] for r in one]
    last = [r for r in two if "test_acc1" in r][-1]
    assert last["test_samples"] == 63  # odd size: no sample dropped or counted twice
    _assert_same_records(one, two, rel=2e-4)
    launches = [json.loads(line) for line in (tmp_path / "two" / "launches.jsonl").read_text().splitlines()]
    assert launches[-1]["world_size"] == 2


def test_compare_runs_side_by_side(tmp_path, capsys):
    from vision_transformers import compare

    base = TINY + ["--epochs", "1"]
    for model in ("vit-s", "kvit-s"):
        argv = [a if a != "kvit-s" else model for a in base] + ["--out_dir", str(tmp_path / model)]
        assert train.main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "vit-s"), str(tmp_path / "kvit-s"), "--labels", "ViT,KViT",
                         "--out_dir", str(out)]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in rows] == ["ViT", "KViT"]
    assert rows[1]["params"] - rows[0]["params"] == 2 and rows[0]["sigma"] is None and len(rows[1]["sigma"]) == 2
    for fig in ("curves.png", "attention.png", "sigma_KViT.png"):
        assert (out / fig).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "ViT" in printed and "KViT" in printed and "best acc1" in printed
    assert compare.main([str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "cmp2")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    ar = tmp_path / "ar_run"  # an autoregressive_transformers run: refused in one line, no traceback
    ar.mkdir()
    (ar / "config.json").write_text(json.dumps({"dataset": "mnist", "model": {"attn": "krause"}}))
    assert compare.main([str(ar), "--out_dir", str(tmp_path / "cmp3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a vision_transformers.train run" in err and len(err.splitlines()) == 1
    assert compare.main([str(tmp_path / "vit-s"), "--out_dir", str(out)]) == 2  # never replaced silently
    assert "--overwrite" in capsys.readouterr().err
    # a damaged checkpoint is refused by the reader (sizes and CRC-32s, as resume checks them)
    shard = max((p for p in (tmp_path / "kvit-s" / "checkpoints" / "best").iterdir() if p.suffix == ".distcp"),
                key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\0" * len(data[len(data) // 2: len(data) // 2 + 4096])
    shard.write_bytes(bytes(data))
    assert compare.main([str(tmp_path / "kvit-s"), "--out_dir", str(tmp_path / "cmp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert "CRC-32 mismatch" in err and shard.name in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cmp4").exists()


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path, capsys, monkeypatch):
    """torchvision creates the data folder before it downloads; a download that fails must not leave
    an empty data/cifar10/ behind (a folder that existed before is kept)."""
    from vision_transformers import data as vision_data
    from vision_transformers.data import DataError

    def failing_download(name, path, **kwargs):
        os.makedirs(os.path.join(path, "cifar-10-batches-py"), exist_ok=True)
        raise DataError("could not download cifar10: no network")

    monkeypatch.setattr(vision_data, "build_datasets", failing_download)
    target = tmp_path / "data" / "cifar10"
    base = ["--dataset", "cifar10", "--no_progress", "--num_workers", "0", "--out_dir", str(tmp_path / "run")]
    assert train.main(base + ["--data_path", str(target)]) == 2
    assert "could not download" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    assert train.main(base + ["--data_path", str(kept)]) == 2
    assert kept.is_dir()



# ----------------------------------------------------------------------------- the fault matrix
FAULT_ARGS = TINY + ["--epochs", "3", "--save_every_steps", "3", "--keep_latest_k", "5"]  # 18 steps
FAULT_ENV = dict(os.environ, OMP_NUM_THREADS="1",
                 PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _launch(*extra):
    """A training process; every run is a fresh process with one torch thread, so float
    reductions round alike in all of them."""
    return subprocess.Popen([sys.executable, "-m", "vision_transformers.train", *FAULT_ARGS, *extra], env=FAULT_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [r.get("step", 0) for r in read_metrics(path)]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("fault") / "whole"
    proc = _launch("--out_dir", str(run))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_fault_at_a_random_step_then_resume_is_bit_identical(tmp_path, uninterrupted, sig):
    """kill -9 (nothing saved on the way out, the lock left behind), SIGTERM or Ctrl-C (the loop
    finishes its step, saves and exits 0) at a random step, then --resume: the final weights and
    every logged loss and accuracy equal the uninterrupted run's exactly."""
    import random
    import signal
    import time

    seed = random.SystemRandom().randrange(1 << 30)
    target = random.Random(seed).randint(4 if sig == "SIGKILL" else 2, 12)  # SIGKILL needs a checkpoint (every 3)
    where = f"({sig} at logged step >= {target}, random seed {seed})"
    parts = tmp_path / "parts"
    proc = _launch("--out_dir", str(parts))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _logged_step(parts) < target:
        time.sleep(0.01)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=120)
    if sig == "SIGKILL":
        assert proc.returncode == -9, f"the run finished before the kill {where}"
    else:
        assert proc.returncode == 0, f"{where}: {out[-2000:]}"
    stopped = _latest(parts)["step"]
    assert target <= stopped + 3 and stopped < 18, f"{where}: stopped at {stopped}: {out[-2000:]}"
    resumed = _launch("--out_dir", str(parts), "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, f"{where}: {out[-2000:]}"
    a, b = _latest(uninterrupted), _latest(parts)
    assert a["step"] == b["step"] == 18, where
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), (key, where)
    whole = _stable(read_metrics(uninterrupted / "metrics.jsonl"))
    cut = _stable(read_metrics(parts / "metrics.jsonl"))
    assert [r["step"] for r in cut] == [r["step"] for r in whole], where
    assert cut == whole, where  # losses, lr, grad norms, accuracies: bit-identical


@pytest.mark.slow
def test_the_same_seed_twice_gives_identical_weights_and_metrics(tmp_path):
    """MixUp / CutMix (numpy), drop-path (torch) and per-sample augmentation all draw from the seed."""
    args = TINY + ["--epochs", "1", "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert train.main(args + ["--seed", seed, "--out_dir", str(tmp_path / name)]) == 0
    a, b, c = (_latest(tmp_path / n) for n in "abc")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    records = {n: _stable(read_metrics(tmp_path / n / "metrics.jsonl")) for n in "abc"}
    assert records["a"] == records["b"]
    # another seed is another run (the seed reaches what it should)
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"], c["model"]["blocks.0.attn.qkv.weight"])
    assert records["a"] != records["c"]


def test_a_second_writer_on_a_running_run_dir_is_refused(tmp_path, capsys):
    import time

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "vision_transformers.train", *TINY, "--epochs", "200",
                              "--out_dir", str(run)], env=FAULT_ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and _logged_step(run) < 2:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[0][-2000:]
        capsys.readouterr()
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert train.main(TINY + ["--epochs", "200", "--out_dir", str(run), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "is in use by" in err and str(first.pid) in err, err
        assert first.poll() is None  # the first writer runs on
    finally:
        first.kill()
        first.communicate(timeout=60)
