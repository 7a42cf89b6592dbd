"""Tests of krause.training: the shared train-loop machinery (CPU only)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import krause.training as kt
from krause.training import example
from krause.training.data import ResumableDistributedSampler, derive_seed

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_factor_at_known_steps():
    f = kt.WarmupCosine(total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)  # (0 + 1) / 10: never a zero LR
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # cosine starts at its top
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.1)  # the floor...
    assert f(500) == pytest.approx(0.1)  # ...and it stays there
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    g = kt.WarmupCosine(total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.5) and g(100) == pytest.approx(0.0)


def test_warmup_cosine_scheduler_drives_the_optimizer_per_step():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=2e-3)
    sched = kt.warmup_cosine_scheduler(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.25)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    f = kt.WarmupCosine(20, 4, 0.25)
    assert seen == pytest.approx([2e-3 * f(s) for s in range(25)])
    assert seen[0] == pytest.approx(2e-3 / 4) and seen[3] == pytest.approx(2e-3) and seen[-1] == pytest.approx(5e-4)


def test_warmup_steps_helper_and_argument_checks():
    assert kt.warmup_steps(1000, fraction=0.05) == 50
    assert kt.warmup_steps(300 * 196, epochs=10, steps_per_epoch=196) == 1960
    assert kt.warmup_steps(100, epochs=10, steps_per_epoch=50) == 100  # capped at the run length
    with pytest.raises(ValueError, match="exactly one"):
        kt.warmup_steps(100, fraction=0.1, epochs=1, steps_per_epoch=10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        kt.warmup_steps(100, epochs=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        kt.WarmupCosine(total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        kt.WarmupCosine(total_steps=10, min_lr_ratio=1.5)


# ----------------------------------------------------------------------------- param groups


class _Block(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.log_sigma = nn.Parameter(torch.zeros(heads))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, heads))


class _ToyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.sigma_grid = nn.Module()
        self.sigma_grid.log_sigma = nn.Parameter(torch.zeros(2, 3))  # 2-D log_sigma: still exempt by name
        self.head = nn.Linear(8, 10)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_exempt_log_sigma_norms_biases_embeddings():
    model = _ToyViT()
    decay, no_decay = kt.param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert set(decay["param_names"]) == {"patch_embed.weight", "blocks.0.qkv.weight", "blocks.1.qkv.weight", "head.weight"}
    expected_no_decay = {
        "cls_token",
        "pos_embed",
        "patch_embed.bias",
        "head.bias",
        "sigma_grid.log_sigma",
        *(f"blocks.{i}.{n}" for i in range(2) for n in
          ("norm1.weight", "norm1.bias", "qkv.bias", "log_sigma", "relative_position_bias_table")),
    }
    assert set(no_decay["param_names"]) == expected_no_decay
    assert not any(n.startswith("frozen") for g in (decay, no_decay) for n in g["param_names"])
    # the names line up with the tensors
    params = dict(model.named_parameters())
    for g in (decay, no_decay):
        assert all(params[n] is p for n, p in zip(g["param_names"], g["params"]))


def test_adamw_does_not_decay_log_sigma():
    model = _ToyViT()
    for p in model.parameters():
        nn.init.constant_(p, 1.0)
    opt = kt.build_adamw(model, lr=1.0, weight_decay=0.5)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # no gradient: only weight decay can move a parameter
    opt.step()
    assert torch.all(model.blocks[0].log_sigma == 1.0)
    assert torch.all(model.sigma_grid.log_sigma == 1.0)
    assert torch.all(model.pos_embed == 1.0) and torch.all(model.blocks[0].norm1.weight == 1.0)
    assert torch.allclose(model.head.weight, torch.full_like(model.head.weight, 0.5))  # 1 - lr * wd


def test_param_groups_honour_timm_no_weight_decay_and_ddp_wrappers():
    class WithList(_ToyViT):
        def no_weight_decay(self):
            return {"head.weight"}

    decay, no_decay = kt.param_groups(WithList(), 0.1)
    assert "head.weight" in no_decay["param_names"] and "head.weight" not in decay["param_names"]
    compiled = torch.compile(_ToyViT())  # wrapper only: nothing is compiled until it is called
    assert kt.unwrap_model(compiled).__class__ is _ToyViT
    assert "pos_embed" in kt.param_groups(compiled, 0.1)[1]["param_names"]


# ----------------------------------------------------------------------------- checkpoints


class _MLP(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 3)
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.norm(self.fc1(x))))) * self.log_sigma.exp()


def _build(seed: int):
    model = _MLP(seed)
    opt = kt.build_adamw(model, lr=1e-2, weight_decay=0.1)
    sched = kt.warmup_cosine_scheduler(opt, total_steps=10, warmup_steps=3, min_lr_ratio=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    return model, opt, sched, scaler


# the single-file format's tests were ported to the DCP checkpointer in test_checkpoint.py


# ----------------------------------------------------------------------------- metrics


def test_metrics_jsonl_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with kt.MetricsLogger(path, enabled=True) as log:
        log.log(step=1, epoch=0.5, train_loss=torch.tensor(2.5), lr=np.float32(0.125))
        log.log({"test_acc": 0.75}, step=2, epoch=1, sigma=torch.tensor([2.5, 2.0]), nested={"a": np.int64(3)})
        # nothing is buffered: the file already holds both lines
        assert len(path.read_text().splitlines()) == 2
    records = kt.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train_loss"] == 2.5 and records[0]["lr"] == 0.125 and records[0]["epoch"] == 0.5
    assert records[1]["sigma"] == [2.5, 2.0] and records[1]["nested"] == {"a": 3} and records[1]["test_acc"] == 0.75
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in records)
    assert kt.series(records, "test_acc") == ([2], [0.75])
    assert kt.series(records, "train_loss", x="epoch") == ([0.5], [2.5])
    with pytest.raises(ValueError, match="reserved"):
        kt.MetricsLogger(tmp_path / "x.jsonl", enabled=True).log(step=1, time=3)
    with pytest.raises(TypeError, match="metric 'bad'"):
        kt.MetricsLogger(tmp_path / "y.jsonl", enabled=True).log(step=1, bad=object())


def test_metrics_reader_survives_a_crash_mid_line_and_resume_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with kt.MetricsLogger(path, enabled=True) as log:
        for s in range(1, 6):
            log.log(step=s, loss=1.0 / s)
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # killed while writing
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert [r["step"] for r in kt.read_metrics(path)] == [1, 2, 3, 4, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        kt.read_metrics(bad)
    # resuming from a checkpoint at step 3 drops what the interrupted launch logged after it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kt.MetricsLogger(path, enabled=True, resume_step=3) as log:
            log.log(step=4, loss=0.0)
    assert [(r["step"], r["loss"]) for r in kt.read_metrics(path)][-2:] == [(3, 1.0 / 3), (4, 0.0)]
    # a logger on a non-zero rank writes nothing
    quiet = kt.MetricsLogger(tmp_path / "rank1.jsonl", enabled=False)
    assert quiet.log(step=1, loss=1.0) is None and not (tmp_path / "rank1.jsonl").exists()


# ----------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_flag_set_by_a_real_signal(sig):
    before = signal.getsignal(sig)
    with kt.PreemptionHandler() as handler:
        assert not handler.requested and not handler.should_stop()
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.requested and handler.received == sig
        assert handler.should_stop()
        os.kill(os.getpid(), sig)  # a second signal does not kill the process mid-save
        time.sleep(0.05)
        assert handler.should_stop()
    assert signal.getsignal(sig) == before


def test_preemption_handler_in_a_subprocess_saves_and_exits_cleanly(tmp_path):
    """A child process gets a real SIGTERM from outside while looping; it must save and exit 0."""
    script = tmp_path / "loop.py"
    script.write_text(
        "import sys, time\n"
        "import krause.training as kt\n"
        "out = sys.argv[1]\n"
        "with kt.PreemptionHandler() as h:\n"
        "    print('ready', flush=True)\n"
        "    step = 0\n"
        "    while True:\n"
        "        step += 1\n"
        "        time.sleep(0.01)\n"
        "        if h.should_stop():\n"
        "            open(out, 'w').write(f'{h.received.name} {step}')\n"
        "            break\n"
    )
    out = tmp_path / "saved.txt"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    name, step = out.read_text().split()
    assert name == "SIGTERM" and int(step) >= 1


# ----------------------------------------------------------------------------- distributed


def test_single_process_collectives_and_batch_check():
    assert kt.all_reduce_sum(3) == 3 and isinstance(kt.all_reduce_sum(3), int)
    assert kt.all_reduce_mean(3) == 3.0
    t = torch.tensor([1.0, 2.0])
    out = kt.all_reduce_sum(t)
    assert torch.equal(out, t) and out is not t
    assert kt.all_gather_object({"a": 1}) == [{"a": 1}] and kt.broadcast_object(5) == 5
    assert kt.is_main_process() and kt.get_world_size() == 1
    assert kt.per_rank_batch_size(256, 4) == 64
    with pytest.raises(ValueError, match=r"batch_size=10 \(global\) is not divisible by the world size 4"):
        kt.per_rank_batch_size(10, 4)
    with pytest.raises(TypeError):
        kt.all_reduce_sum("3")


def test_init_distributed_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = kt.init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.device.type, env.backend, env.is_main) == (0, 1, "cpu", None, True)
    assert not torch.distributed.is_initialized()
    # a world-of-one process group on request (FSDP needs one), without address or port
    env = kt.init_distributed(device="cpu", process_group_for_one=True)
    try:
        assert torch.distributed.is_initialized() and env.backend == "gloo" and env.world_size == 1
        assert kt.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    finally:
        kt.cleanup()
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        kt.init_distributed(device="cpu")
    kt.cleanup()


def _start_method() -> str:
    # Always spawn: a forked child deadlocks or fails in autograd once any earlier test
    # in this pytest process has run a backward pass (autograd's worker threads do not
    # survive fork), and CUDA cannot be forked either.
    return "spawn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    env = kt.init_distributed(device="cpu")
    try:
        result = {
            "backend": env.backend,
            "sum": kt.all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * rank])).tolist(),
            "mean": kt.all_reduce_mean(float(rank)),
            "int_sum": kt.all_reduce_sum(rank + 1),
            "max": kt.all_reduce_max(rank),
            "gather": kt.all_gather_object(f"r{rank}"),
            "bcast": kt.broadcast_object({"from": rank}),
            "main": kt.is_main_process(),
            "local_batch": kt.per_rank_batch_size(64),
        }
        # preemption on one rank only: every rank must agree to stop
        handler = kt.PreemptionHandler()
        result["stop_before"] = handler.should_stop()
        if rank == 1:
            handler.trigger()
        result["stop_after"] = handler.should_stop()
        # a collective checkpoint: per-rank RNG states, each rank gets its own back
        kt.seed_everything(7, rank=rank)
        model = _MLP(0)
        ckpt = kt.Checkpointer(Path(out_dir) / "ck")
        ckpt.save(4, kt.AppState(kt.wrap_ddp(model)))
        expected = torch.rand(3)
        torch.manual_seed(12345)
        ckpt.load(kt.AppState(model))
        result["rng_restored"] = torch.equal(torch.rand(3), expected)
        result["n_rng"] = json.loads((ckpt.step_dir(4) / "checkpoint.json").read_text())["world_size"]
        with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        kt.cleanup()


def test_two_process_gloo_collectives_and_checkpoint(tmp_path):
    mp.start_processes(_spawned_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=_start_method())
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(results):
        assert r["backend"] == "gloo"
        assert r["sum"] == [3.0, 10.0]
        assert r["mean"] == 0.5 and r["int_sum"] == 3 and r["max"] == 1
        assert r["gather"] == ["r0", "r1"] and r["bcast"] == {"from": 0}
        assert r["main"] == (rank == 0) and r["local_batch"] == 32
        assert r["stop_before"] is False and r["stop_after"] is True
        assert r["rng_restored"] is True and r["n_rng"] == 2


def _fsdp_model(seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def _fsdp_step(model, opt, seed):
    torch.manual_seed(seed)
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    kt.init_distributed(device="cpu")
    try:
        model = _fsdp_model(0)
        opt = kt.build_adamw(model, lr=1e-2, weight_decay=0.1)
        for i in range(3):
            _fsdp_step(model, opt, seed=100 * i + rank)
        ckpt = kt.Checkpointer(Path(out_dir) / "ck")
        ckpt.save(3, kt.AppState(model, opt))
        resumed = _fsdp_model(1)  # other initial weights, empty optimizer state
        opt2 = kt.build_adamw(resumed, lr=1e-2, weight_decay=0.1)
        ckpt.load(kt.AppState(resumed, opt2))
        for i in range(3, 5):
            _fsdp_step(model, opt, seed=100 * i + rank)
            _fsdp_step(resumed, opt2, seed=100 * i + rank)
        same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), resumed.parameters()))
        (Path(out_dir) / f"rank{rank}.txt").write_text(str(same))
    finally:
        kt.cleanup()


def test_fsdp2_checkpoint_resumes_bit_identically_and_exports_in_full(tmp_path):
    """fully_shard models (language_models_100m): sharded DCP steps that a plain model loads, in one process."""
    mp.start_processes(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method=_start_method())
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["True", "True"]
    step = tmp_path / "ck" / "step-000003"
    assert json.loads((step / "checkpoint.json").read_text())["world_size"] == 2
    plain = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    kt.load_model_weights(plain, step)  # unsharded, no wrapper prefixes
    payload = kt.read_exported(kt.export_checkpoint(step, tmp_path / "full.pt"))
    assert payload["app"]["model"]["0.weight"].shape == (16, 8)
    assert torch.equal(payload["app"]["model"]["0.weight"], plain[0].weight)


# ----------------------------------------------------------------------------- run directory, config


def test_run_dir_writes_config_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "run"
    cfg = argparse.Namespace(lr=1e-3, depth=12, out_dir=str(out), data_dir=Path("/data"), betas=(0.9, 0.95))
    run = kt.prepare_run_dir(out, cfg)
    assert run.root == out.resolve() and run.checkpoint_dir.is_dir() and run.figures_dir.is_dir()
    written = json.loads(run.config_path.read_text())
    assert written == {"lr": 1e-3, "depth": 12, "out_dir": str(out), "data_dir": "/data", "betas": [0.9, 0.95]}
    assert len((out / "launches.jsonl").read_text().splitlines()) == 1
    # the same config again (e.g. a second launch before any checkpoint) is fine
    kt.prepare_run_dir(out, cfg)
    # a different config is refused unless resuming / overwriting
    other = argparse.Namespace(**{**vars(cfg), "lr": 5e-4})
    with pytest.raises(kt.RunDirError, match=r"different config:\n  lr: 0\.001 -> 0\.0005"):
        kt.prepare_run_dir(out, other)
    assert json.loads(run.config_path.read_text())["lr"] == 1e-3  # untouched
    kt.prepare_run_dir(out, other, resume=True)
    assert json.loads(run.config_path.read_text())["lr"] == 5e-4
    assert json.loads((out / "config.1.json").read_text())["lr"] == 1e-3  # the earlier one is kept
    # a run directory that holds a checkpoint needs resume (or overwrite)
    kt.Checkpointer(run.checkpoint_dir, config=other).save(1, kt.AppState(_MLP(0)))
    with pytest.raises(kt.RunDirError, match="already holds a checkpoint"):
        kt.prepare_run_dir(out, other)
    assert kt.prepare_run_dir(out, other, resume=True).last_checkpoint == run.checkpoint_dir / "step-000001"
    # an unrelated non-empty folder is not taken over
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(kt.RunDirError, match="does not look like a run directory"):
        kt.prepare_run_dir(tmp_path / "photos", cfg)
    # paths stay inside the run directory
    assert run.path("figures", "a.png") == run.root / "figures" / "a.png"
    with pytest.raises(ValueError):
        run.path("..", "elsewhere")
    with pytest.raises(ValueError):
        run.path("/etc/passwd")


def test_config_fingerprint_ignores_runtime_keys_only():
    a = {"lr": 1e-3, "model": {"depth": 12, "heads": 6}, "out_dir": "x", "num_workers": 8}
    b = {"lr": 1e-3, "model": {"depth": 12, "heads": 6}, "out_dir": "y", "num_workers": 2}
    c = {"lr": 1e-3, "model": {"depth": 12, "heads": 8}, "out_dir": "x", "num_workers": 8}
    assert kt.config_fingerprint(a) == kt.config_fingerprint(b) != kt.config_fingerprint(c)
    assert kt.config_diff(a, c) == [("model.heads", 6, 8)]
    assert kt.config_fingerprint(a, ignore=()) != kt.config_fingerprint(b, ignore=())
    with pytest.raises(TypeError, match="opt"):
        kt.config_to_dict({"opt": object()})


# ----------------------------------------------------------------------------- data order


def test_resumable_sampler_skips_without_reordering():
    data = list(range(40))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert len(order) == 20 and len(full) == 20
    part = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    part.set_epoch(2, skip=6)
    assert list(part) == order[6:] and len(part) == 14
    full.set_epoch(3)
    assert list(full) != order  # each epoch has its own order (the release reused one)
    with pytest.raises(ValueError, match="skip"):
        part.set_epoch(0, skip=21)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)


# ----------------------------------------------------------------------------- plotting


def _fake_metrics():
    records = []
    for s in range(1, 31):
        records.append({"step": s, "epoch": s / 10, "time": 0.0, "train_loss": 2.0 / s, "lr": 1e-3})
        if s % 10 == 0:
            records.append({"step": s, "epoch": s // 10, "time": 0.0, "test_loss": 2.5 / s, "test_acc": s / 40,
                            "train_acc": s / 35, "sigma": [2.5 - 0.01 * s, 2.5 + 0.01 * s, 2.5]})
    return records


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plotting_writes_pngs(tmp_path):
    records = _fake_metrics()
    assert kt.plotting.default_curve_keys(records) == {
        "loss": ["train_loss", "test_loss"], "accuracy": ["test_acc", "train_acc"], "lr": ["lr"]}
    _assert_png(kt.plot_curves(records, tmp_path / "curves.png", x="epoch"))
    _assert_png(kt.plot_series(records, tmp_path / "sigma.png", keys=["sigma"], title="sigma per layer"))
    with kt.MetricsLogger(tmp_path / "run_b" / "metrics.jsonl", enabled=True) as log:
        for r in records:
            log.log(step=r["step"], **{k: v for k, v in r.items() if k not in ("step", "epoch", "time")})
    _assert_png(kt.plot_comparison({"ViT": records, "KViT": tmp_path / "run_b"}, ["test_acc", "train_loss"],
                                   tmp_path / "cmp" / "comparison.png"))
    paths = kt.plot_run(tmp_path / "run_b")
    assert [p.name for p in paths] == ["curves.png", "sigma.png"]
    for p in paths:
        _assert_png(p)
    with pytest.raises(ValueError):
        kt.plot_series(records, tmp_path / "none.png", keys=["missing"])


# ----------------------------------------------------------------------------- the reference loop end to end


def _example_args(out_dir, *extra):
    return ["--out_dir", str(out_dir), "--epochs", "2", "--n_train", "96", "--n_test", "32", "--batch_size", "16",
            "--hidden", "16", "--log_every", "1", "--no_progress", *extra]


def _final_state(run_dir: Path):
    """The latest checkpoint of a run as {step, world_size, model, rng_ranks} (through the export)."""
    ck = kt.Checkpointer(run_dir / "checkpoints")
    step = ck.latest_step()
    out = run_dir.parent / f"_{run_dir.name}_{step}.pt"
    payload = torch.load(ck.export(out, step), weights_only=False)
    import pickle

    return {"step": payload["meta"]["step"], "world_size": payload["meta"]["world_size"],
            "model": payload["app"]["model"], "rng_ranks": len(pickle.loads(ck_rng(ck.step_dir(step))))}


def ck_rng(step_dir: Path) -> bytes:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp = step_dir.parent.parent.parent / f"_{step_dir.parent.parent.name}_rng.pt"
    dcp_to_torch_save(str(step_dir), str(tmp))
    return torch.load(tmp, weights_only=False)["app"]["rng"]


def _records_without_time(run_dir: Path):
    volatile = {"time", "samples_per_s", "steps_per_s", "tokens_per_s", "tflops_per_device", "mfu"}
    return [{k: v for k, v in r.items() if k not in volatile} for r in kt.read_metrics(run_dir / "metrics.jsonl")]


def test_example_loop_preempted_and_resumed_matches_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert example.main(_example_args(full)) == 0
    # SIGTERM after step 4 of 6 in epoch 0: saves last at step 4 and returns
    assert example.main(_example_args(cut, "--preempt_at_step", "4")) == 0
    assert _final_state(cut)["step"] == 4 and not (cut / "checkpoints" / "best").exists()
    assert example.main(_example_args(cut, "--resume")) == 0
    a, b = _final_state(full), _final_state(cut)
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _records_without_time(full) == _records_without_time(cut)
    assert (cut / "figures" / "curves.png").stat().st_size > 0 and (cut / "checkpoints" / "best").is_dir()


def test_a_resume_inside_a_log_window_logs_the_same_mean_loss(tmp_path):
    """Preempted at step 4 with a record every 3 steps: the step-6 record still averages
    steps 4-6 (the window is saved with the checkpoint), as in the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert example.main(_example_args(full, "--log_every", "3")) == 0
    assert example.main(_example_args(cut, "--log_every", "3", "--preempt_at_step", "4")) == 0
    assert example.main(_example_args(cut, "--log_every", "3", "--resume")) == 0
    assert _records_without_time(full) == _records_without_time(cut)


@pytest.mark.slow
def test_example_under_torchrun_two_processes_resumes_bit_identically(tmp_path):
    """torchrun, 2 CPU processes (gloo, DDP): SIGTERM reaches rank 1 only; both ranks stop at the same
    step, save, exit 0; the resumed run ends bit-identical to an uninterrupted one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def torchrun(out_dir, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "krause.training.example", *_example_args(out_dir, "--device", "cpu", *extra)]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(full)
    torchrun(cut, "--preempt_at_step", "2", "--preempt_rank", "1")
    assert _final_state(cut)["step"] == 2 and _final_state(cut)["rng_ranks"] == 2
    torchrun(cut, "--resume")
    a, b = _final_state(full), _final_state(cut)
    assert a["step"] == b["step"] == 12 and a["world_size"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _records_without_time(full) == _records_without_time(cut)


# ----------------------------------------------------------------------------- one writer, stops, launcher death


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_run_dir_lock_refuses_a_second_trainer_and_takes_over_a_stale_lock(tmp_path):
    out = tmp_path / "run"
    cfg = {"lr": 1e-3}
    run = kt.prepare_run_dir(out, cfg)
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    run.release()
    assert not (out / ".lock").exists()
    live = _sleeper()
    try:
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid,
                                               "start_time": kt.lock.process_start_time(live.pid)}))
        before = (out / "launches.jsonl").read_text()
        with pytest.raises(kt.RunDirError, match=f"in use by another trainer \\(pid {live.pid}"):
            kt.prepare_run_dir(out, cfg, resume=True)
        assert (out / "launches.jsonl").read_text() == before  # nothing written
    finally:
        live.kill()
        live.wait()
    # the holder died (kill -9 leaves its lock behind): the lock is stale and taken over
    run = kt.prepare_run_dir(out, cfg, resume=True)
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    run.release()
    # a recycled pid (same number, later start time) is not the holder either
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start_time": 1.0}))
    kt.RunLock(out / ".lock").acquire().release()


def test_resume_refuses_a_changed_config_or_a_lost_checkpoint_before_touching_anything(tmp_path):
    out = tmp_path / "run"
    cfg = {"lr": 1e-3, "depth": 2}
    run = kt.prepare_run_dir(out, cfg)
    model, opt = _build(0)[:2]
    kt.Checkpointer(run.checkpoint_dir, config=cfg).save(3, kt.AppState(model, opt), metric=1.0)
    run.release()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(kt.RunDirError, match=r"(?s)another config:\n  depth: 2 -> 4\n.*original settings"):
        kt.prepare_run_dir(out, {**cfg, "depth": 4}, resume=True)
    with pytest.raises(kt.RunDirError, match=r"(?s)different config.*overwrite to start a new run"):
        kt.prepare_run_dir(out, {**cfg, "depth": 4})
    with pytest.raises(kt.RunDirError, match="already holds a checkpoint"):
        kt.prepare_run_dir(out, cfg)
    shutil.rmtree(run.checkpoint_dir / "step-000003")  # the resume point is gone, best/ remains
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(kt.RunDirError, match="holds a best checkpoint but no complete checkpoint"):
        kt.prepare_run_dir(out, cfg, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    kt.prepare_run_dir(out, cfg, overwrite=True).release()  # overwrite starts over, old steps set aside
    assert (out / "checkpoints.replaced" / "best").is_dir() and not (out / "checkpoints" / "best").exists()


def _wait_for_step(metrics: Path, step: int, proc, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if metrics.is_file() and any(r.get("step", 0) >= step for r in kt.read_metrics(metrics)):
                return
        except ValueError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit code {proc.poll()})")


def _example_proc(out_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "krause.training.example", *_example_args(out_dir, *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG = ("--epochs", "5", "--n_train", "160", "--save_every", "3")


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    whole = _example_proc(full, *LONG)  # every run in one kind of process (same thread count)
    proc = _example_proc(cut, *LONG)
    _wait_for_step(cut / "metrics.jsonl", 20, proc)
    proc.kill()  # SIGKILL: no handler runs, the lock stays behind, a save may be half-written
    proc.communicate()
    assert (cut / ".lock").is_file()
    stopped = kt.Checkpointer(cut / "checkpoints").latest_step()
    assert stopped is not None and stopped < 50
    resumed = _example_proc(cut, *LONG, "--resume")
    for p in (whole, resumed):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    a, b = _final_state(full), _final_state(cut)
    assert a["step"] == b["step"] == 50
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _records_without_time(full) == _records_without_time(cut)


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = _example_proc(out, *LONG)
    _wait_for_step(out / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert [line for line in stderr.splitlines() if "interrupt" in line] == [
        "interrupt: saving at the next step boundary, then stopping (Ctrl-C again aborts)"]
    step = kt.Checkpointer(out / "checkpoints").latest_step()
    assert 5 <= step < 50 and "stop requested (SIGINT)" in stdout


def test_worker_dies_with_its_launcher(tmp_path):
    """A torchrun-style worker (LOCAL_RANK set) whose launcher is killed with -9 gets SIGTERM, so its
    preemption handler stops it (the orphaned worker of the issue kept training)."""
    flag = tmp_path / "stopped"
    child = (f"import time, krause.training as kt\n"
             f"h = kt.PreemptionHandler().install(); kt.die_with_parent(poll_s=0.1)\n"
             f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
             f"t = time.time()\nwhile not h.requested and time.time() - t < 60: time.sleep(0.05)\n"
             f"open({str(flag)!r}, 'w').write(h.reason)\n")
    launcher = ("import subprocess, sys, os, time\n"
                f"subprocess.Popen([sys.executable, '-c', {child!r}], env=dict(os.environ, LOCAL_RANK='0'))\n"
                "time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LOCAL_RANK", None)
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env)
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists() and flag.read_text() == "SIGTERM"


# ----------------------------------------------------------------------------- resharding: 2 ranks -> 1 or 2


def _example_ranks_worker(rank: int, world: int, runs: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for port, argv in runs:
        os.environ["MASTER_PORT"] = str(port)
        code = example.main(argv)
        if code != 0:
            raise SystemExit(f"rank {rank}: example exited {code} for {argv}")


def _run_two_ranks(*runs):
    mp.start_processes(_example_ranks_worker, args=(2, [(_free_port(), list(r)) for r in runs]), nprocs=2,
                       join=True, start_method=_start_method())


def _metric_values(run_dir: Path):
    keep = ("step", "train_loss", "test_loss", "test_acc", "grad_norm", "lr")
    return [{k: r[k] for k in keep if k in r} for r in kt.read_metrics(run_dir / "metrics.jsonl")]


def _assert_close_records(a, b):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra["step"])


@pytest.mark.slow
def test_two_rank_ddp_and_fsdp2_runs_resume_on_one_and_on_two_ranks(tmp_path, recwarn):
    """Saved on 2 ranks (DDP, and FSDP2 with sharded state), resumed on 2 ranks and on 1 (DCP
    reshards): the metrics equal the uninterrupted 2-rank run's (no dropout: RNG streams differ per rank)."""
    base = ("--dropout", "0", "--device", "cpu")
    full, ddp, fsdp = tmp_path / "full", tmp_path / "ddp", tmp_path / "fsdp"
    _run_two_ranks(_example_args(full, *base), _example_args(ddp, *base, "--preempt_at_step", "4"),
                   _example_args(fsdp, *base, "--fsdp", "--preempt_at_step", "4"))
    for name in ("ddp", "fsdp"):
        shutil.copytree(tmp_path / name, tmp_path / f"{name}_one")
    assert kt.Checkpointer(fsdp / "checkpoints").latest_step() == 4
    _run_two_ranks(_example_args(ddp, *base, "--resume"), _example_args(fsdp, *base, "--fsdp", "--resume"))
    for name in ("ddp_one", "fsdp_one"):
        assert example.main(_example_args(tmp_path / name, *base, "--resume")) == 0
    reference = _metric_values(full)
    assert [r["step"] for r in reference if "test_acc" in r] == [6, 12]
    for name in ("ddp", "fsdp", "ddp_one", "fsdp_one"):
        _assert_close_records(reference, _metric_values(tmp_path / name))


# ----------------------------------------------------------------------------- throughput, sigma, eval shards, sinks


def test_throughput_and_mfu_from_counted_flops():
    model = nn.Linear(32, 16, bias=False)
    per_sample = kt.train_flops_per_sample(model, torch.randn(4, 32))
    assert per_sample == 2 * (2 * 32 * 16)  # forward matmul + the weight-gradient matmul (inputs need no grad)
    assert model.weight.grad is None  # the counting pass leaves no gradients behind
    clock = iter([0.0, 2.0, 2.0]).__next__
    meter = kt.Throughput(flops_per_sample=per_sample, peak_flops=1e6, world_size=2, clock=clock)
    meter.update(samples=100, tokens=100 * 64)
    rates = meter.rates()
    assert rates["samples_per_s"] == 50 and rates["tokens_per_s"] == 3200
    assert rates["mfu"] == pytest.approx(per_sample * 50 / 2 / 1e6)
    with pytest.raises(ValueError, match="peak_flops"):
        kt.Throughput(peak_flops=0)


def test_sigma_per_layer_and_eval_shards_count_every_example_once():
    class Attn(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.log_sigma = nn.Parameter(torch.full(shape, math.log(2.0)))

    model = nn.Sequential(Attn(()), nn.Linear(2, 2), Attn((2,)))
    assert kt.sigma_per_layer(model) == [pytest.approx(2.0), [pytest.approx(2.0)] * 2]
    shards = [kt.eval_shard(13, r, 4).tolist() for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(13)) and len(kt.ShardSampler(13, 3, 4)) == 3


def test_metrics_live_sink_is_off_by_default_and_refuses_unknown(tmp_path):
    log = kt.MetricsLogger(tmp_path / "m.jsonl", enabled=True)
    log.log(step=1, loss=1.0)
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ValueError, match="live sink"):
        kt.MetricsLogger(tmp_path / "n.jsonl", enabled=True, live="wandb-ish")


def test_plot_series_integer_x_has_integer_ticks(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(kt.plotting, "_save", lambda fig, path: saved.append(fig) or Path(path))
    records = [{"layer": i, "share": 0.1 * i} for i in range(3)]  # 3 layers: matplotlib would tick 0.25, 0.5, ...
    kt.plot_series(records, tmp_path / "layers.png", keys=["share"], x="layer")
    ticks = saved[0].axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_progress_bar_writes_whole_lines_when_not_a_terminal():
    import io

    stream = io.StringIO()  # not a tty, like a log file or Slurm's output
    bar = kt.progress_bar(total=5, file=stream, desc="work", mininterval=0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("work: 100%") and "5/5" in lines[-1]
    assert bar.mininterval == 0
    default = kt.progress_bar(total=1, file=io.StringIO())
    assert default.mininterval == kt.metrics.NON_TTY_INTERVAL_S  # at most one line per 10 s in a log
    default.close()


# ----------------------------------------------------------------------------- entry points


def test_entry_point_turns_expected_errors_into_one_line_and_exit_2(capsys):
    from krause.training.entry import entry_point

    @entry_point
    def main(argv=None):
        kind = argv[0]
        if kind == "usage":
            raise kt.UsageError("--lr must be > 0\n(got -1)")
        if kind == "corrupt":
            raise kt.CorruptCheckpointError("checkpoint x: f is corrupted (CRC-32 mismatch)")
        if kind == "missing":
            open("/nonexistent/krause/file")
        if kind == "bug":
            raise KeyError("a bug keeps its traceback")
        return 0

    assert main(["ok"]) == 0
    for kind, words in (("usage", "--lr must be > 0 | (got -1)"), ("corrupt", "CRC-32"), ("missing", "No such file")):
        assert main([kind]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and len(err.splitlines()) == 1, err
    with pytest.raises(KeyError):
        main(["bug"])


def test_a_failed_start_is_undone_so_the_corrected_retry_is_not_refused(tmp_path):
    fresh = tmp_path / "fresh"
    run = kt.prepare_run_dir(fresh, {"lr": 1.0})
    run.undo_start()  # the directory did not exist: removed with its lock
    assert not fresh.exists()
    kt.prepare_run_dir(fresh, {"lr": 0.5}).release()  # the corrected retry
    # an existing run directory: the earlier config comes back
    run = kt.prepare_run_dir(fresh, {"lr": 0.7}, resume=True)
    assert json.loads((fresh / "config.json").read_text())["lr"] == 0.7
    run.undo_start()
    assert json.loads((fresh / "config.json").read_text())["lr"] == 0.5 and not (fresh / ".lock").exists()
    kt.prepare_run_dir(fresh, {"lr": 0.5}).release()
    # an existing non-run folder the user pointed at with overwrite: only the new config goes
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    kt.prepare_run_dir(other, {"lr": 1.0}, overwrite=True).undo_start()
    assert sorted(p.name for p in other.iterdir() if p.is_dir() is False) == ["keep.txt", "launches.jsonl"]


def _toy_recipe(out_dir, build, resume=False, total=4, stop_at=None):
    from krause.training.recipe import OptimSpec, Recipe

    args = argparse.Namespace(out_dir=str(out_dir), resume=resume, seed=3)

    class Hooks(kt.TrainHooks):
        def __init__(self, ctx):
            self.ctx = ctx

        def batches(self, epoch, start):
            step = start
            while True:  # the data of a step depends on the step only
                yield [torch.randn(4, 6, generator=torch.Generator().manual_seed(step))]
                step += 1

        def train_step(self, x):
            return self.ctx.train_model(x).pow(2).sum(), x.shape[0]

        def evaluate(self, state):
            return {"metric": float(self.ctx.model(torch.ones(2, 6)).pow(2).mean())}

        def selection_metric(self, result):
            return result["metric"]

    return Recipe(name="toy", args=args, config={"lr": 0.01}, ignore=kt.RUNTIME_KEYS, build_model=build,
                  make_hooks=Hooks, settings=kt.LoopSettings(total_steps=total, steps_per_epoch=total, log_every=1,
                                                                preempt_at_step=stop_at),
                  optim=OptimSpec(lr=0.01, weight_decay=0.0, warmup=0.0, min_lr_ratio=0.1))


def test_recipe_runner_undoes_a_failed_start_then_trains_and_resumes(tmp_path):
    from krause.training.recipe import run_recipe

    out = tmp_path / "toy"

    def broken():
        raise ValueError("build_model: bad width")

    with pytest.raises(ValueError, match="bad width"):
        run_recipe(_toy_recipe(out, broken), "cpu")
    assert not out.exists()  # the failed start left nothing behind
    assert run_recipe(_toy_recipe(out, lambda: _MLP(0), stop_at=2), "cpu") == 0  # SIGTERM at step 2: saved
    assert (out / "checkpoints" / "step-000002" / "checkpoint.json").is_file() and not (out / ".lock").exists()
    assert not (out / "checkpoints" / "step-000004").exists()
    # resumed to the end, it equals a run trained without the stop
    assert run_recipe(_toy_recipe(out, lambda: _MLP(0), resume=True), "cpu") == 0
    whole = tmp_path / "whole"
    assert run_recipe(_toy_recipe(whole, lambda: _MLP(0), total=4), "cpu") == 0
    a, b = _MLP(1), _MLP(2)
    kt.load_model_weights(a, out / "checkpoints" / "step-000004")
    kt.load_model_weights(b, whole / "checkpoints" / "step-000004")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_symlink_out_of_the_run_dir_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    cfg = argparse.Namespace(lr=1e-3, out_dir=str(out))
    run = kt.prepare_run_dir(out, cfg)
    run.release()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / "figures")
    (out / "figures").symlink_to(elsewhere, target_is_directory=True)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir() if not p.is_symlink()}
    for resume in (False, True):
        with pytest.raises(kt.RunDirError) as err:
            kt.prepare_run_dir(out, cfg, resume=resume)
        msg = str(err.value)
        assert "\n" not in msg and "symlink that points outside" in msg and "figures" in msg, msg
    assert {p: p.stat().st_mtime_ns for p in out.iterdir() if not p.is_symlink()} == before
    assert not any(elsewhere.iterdir())
    (out / "figures").unlink()
    (out / "figures").symlink_to(out / "checkpoints", target_is_directory=True)  # inside: allowed
    kt.prepare_run_dir(out, cfg, resume=True).release()


# ----------------------------------------------------------------------------- a diverging run
def _log_errors(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "train.log").read_text().splitlines() if " ERROR " in line]


def test_divergence_before_the_first_checkpoint_says_there_is_none_and_the_retry_works(tmp_path):
    """A learning rate of 1e30 makes the loss non-finite at step 2, before the first
    checkpoint (epoch end, step 6): exit 1, no checkpoint, and one error that says there is
    nothing to resume and how to start again; --resume is refused; the corrected settings
    with --overwrite train."""
    run = tmp_path / "run"
    assert example.main(_example_args(run, "--lr", "1e30")) == 1
    assert kt.Checkpointer(run / "checkpoints").latest_step() is None
    (error,) = _log_errors(run)
    assert "before any checkpoint was written: there is nothing to resume" in error
    assert "--overwrite" in error and "rerun with --resume" not in error
    assert example.main(_example_args(run, "--lr", "1e30", "--resume")) == 2
    assert example.main(_example_args(run, "--overwrite")) == 0
    assert kt.Checkpointer(run / "checkpoints").latest_step() == 12


@pytest.mark.parametrize("save_every, nan_step, kept", [(0, 8, 6), (3, 8, 6), (5, 9, 6)],
                         ids=["epoch-checkpoint", "periodic-checkpoints", "save-inside-the-log-window"])
def test_divergence_after_a_checkpoint_keeps_the_last_good_one(tmp_path, save_every, nan_step, kept):
    """The loss of step nan_step reads NaN (the test hook): the run stops with exit 1, writes no
    checkpoint after it (with --log_every 4 the periodic save of a later step inside the same log
    window is refused too) and names the last good checkpoint, from which --resume finishes."""
    run = tmp_path / "run"
    extra = ["--log_every", "4", "--save_every", str(save_every), "--keep_latest_k", "5"]
    args = _example_args(run, *extra)  # the later --log_every wins
    assert example.main(args + ["--nonfinite_at_step", str(nan_step)]) == 1
    ck = kt.Checkpointer(run / "checkpoints")
    assert ck.latest_step() == kept and max(ck.steps()) == kept
    (error,) = _log_errors(run)
    assert f"the last checkpoint, step {kept}" in error and "is the last good one" in error and "--resume" in error
    assert example.main(args + ["--resume"]) == 0
    assert kt.Checkpointer(run / "checkpoints").latest_step() == 12


def test_whole_number_x_gets_whole_ticks_in_every_shared_plot(tmp_path, monkeypatch):
    """plot_curves / plot_comparison (epochs 1..4: matplotlib would tick 1.5, 2.5) and a
    fractional x (epoch 0.5 steps) that keeps its fractional ticks."""
    saved = []
    monkeypatch.setattr(kt.plotting, "_save", lambda fig, path: saved.append(fig) or Path(path))
    whole = [{"epoch": e, "loss": 1.0 / e} for e in range(1, 5)]
    kt.plotting.plot_curves(whole, tmp_path / "c.png", panels={"loss": ["loss"]}, x="epoch")
    kt.plotting.plot_comparison({"a": whole, "b": whole}, ["loss"], tmp_path / "d.png", x="epoch")
    for fig in saved:
        ticks = fig.axes[0].get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    saved.clear()
    half = [{"epoch": 0.5 * e, "loss": 1.0 / e} for e in range(1, 5)]
    kt.plotting.plot_curves(half, tmp_path / "e.png", panels={"loss": ["loss"]}, x="epoch")
    assert not all(float(t).is_integer() for t in saved[0].axes[0].get_xticks())


def test_without_defaults_drops_later_settings_only_at_their_default():
    cfg = {"lr": 1.0, "decay_all": False, "model": {"first_pixel": "modelled", "dim": 8}}
    later = {"decay_all": False, "model.first_pixel": "modelled", "absent.key": 1}
    out = kt.config.without_defaults(cfg, later)
    assert out == {"lr": 1.0, "model": {"dim": 8}}
    assert cfg["model"] == {"first_pixel": "modelled", "dim": 8}  # the input is left as it was
    set_ = {"lr": 1.0, "decay_all": True, "model": {"first_pixel": "uniform"}}
    assert kt.config.without_defaults(set_, later) == set_
