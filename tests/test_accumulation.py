"""Gradient accumulation: any split of the global batch (ranks x micro-batches) gives the same update."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import krause.training as kt
from krause.training import example

GLOBAL = 16


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL, 6, generator=g)
    return x, torch.randint(0, 3, (GLOBAL,), generator=g)


def _loss_sum(model):
    return lambda mb: (F.cross_entropy(model(mb[0]), mb[1], reduction="sum"), mb[1].numel())


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_batch_plan_splits_the_global_batch_or_says_why_not():
    plan = kt.BatchPlan.from_global(512, 16, world_size=8)
    assert (plan.accum_steps, plan.per_rank) == (4, 64)
    assert kt.BatchPlan.from_global(64, None, world_size=4).accum_steps == 1
    with pytest.raises(ValueError, match=r"not divisible by --micro_batch_size x world size = 24 x 2"):
        kt.BatchPlan.from_global(64, 24, world_size=2)
    with pytest.raises(ValueError, match="world size 3"):
        kt.BatchPlan.from_global(64, 4, world_size=3)
    with pytest.raises(ValueError, match="positive"):
        kt.BatchPlan.from_global(64, 0, world_size=1)


@pytest.mark.parametrize("micro", [16, 8, 4, 1])
def test_one_rank_any_micro_batch_size_gives_the_full_batch_gradient(micro):
    x, y = _data()
    ref = _model()
    F.cross_entropy(ref(x), y).backward()
    model = _model()
    result = kt.accumulate_gradients(model, kt.split_micro_batches((x, y), GLOBAL // micro), _loss_sum(model),
                                     world_size=1)
    assert result.count == GLOBAL
    torch.testing.assert_close(result.loss, F.cross_entropy(ref(x), y).detach().double(), rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(ref), _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_uneven_element_counts_are_normalised_by_the_global_count():
    """Token models: micro-batches with different numbers of real tokens weigh by tokens, not by batch."""
    x, y = _data()
    mask = torch.arange(GLOBAL) % 3 != 0  # a ragged selection of "real" elements
    ref = _model()
    F.cross_entropy(ref(x[mask]), y[mask]).backward()
    model = _model()
    parts = [(x[:5], y[:5], mask[:5]), (x[5:], y[5:], mask[5:])]

    def loss_sum(mb):
        xb, yb, mb_mask = mb
        return F.cross_entropy(model(xb[mb_mask]), yb[mb_mask], reduction="sum"), int(mb_mask.sum())

    kt.accumulate_gradients(model, parts, loss_sum, world_size=1, counts=[int(p[2].sum()) for p in parts])
    for a, b in zip(_grads(ref), _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = kt.init_distributed(device="cpu")
    try:
        x, y = _data()
        mine = (x[rank::2], y[rank::2])  # this rank's half of the global batch, in 2 micro-batches
        results = {}
        for kind in ("ddp", "fsdp", "fsdp_ac"):
            model = _model()
            if kind == "ddp":
                wrapped = kt.wrap_ddp(model, env)
            else:  # fsdp_ac: activation checkpointing of every block as well
                wrapped = kt.apply_fsdp(model, kt.build_mesh("cpu"), blocks="", activation_checkpointing=kind == "fsdp_ac")
            opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
            kt.accumulate_gradients(wrapped, kt.split_micro_batches(mine, 2), _loss_sum(wrapped), world_size=2)
            opt.step()
            params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in wrapped.parameters()]
            results[kind] = [p.detach().tolist() for p in params]
            if kind == "fsdp_ac":
                from torch.distributed.checkpoint.state_dict import get_model_state_dict

                results["ac_keys"] = sorted(get_model_state_dict(wrapped))
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        kt.cleanup(synchronize=True)


@pytest.mark.slow
def test_two_ranks_times_two_micro_batches_equal_one_rank_one_batch(tmp_path):
    """1 rank x 1 micro == 2 ranks x 2 micro-batches, with DDP (no_sync) and FSDP2 (set_requires_gradient_sync)."""
    out = tmp_path / "params.json"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    x, y = _data()
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    got = json.loads(out.read_text())
    assert got["ac_keys"] == sorted(ref.state_dict())  # no wrapper prefixes in checkpoints
    for kind in ("ddp", "fsdp", "fsdp_ac"):
        for a, b in zip(ref.parameters(), got[kind]):
            torch.testing.assert_close(torch.tensor(b), a.detach(), rtol=1e-5, atol=1e-6)


def test_example_1x4_equals_4x1(tmp_path):
    """The template's whole loop: 4 micro-batches of 4 == one batch of 16 (no dropout)."""
    def run(name, *extra):
        assert example.main(["--out_dir", str(tmp_path / name), "--epochs", "1", "--n_train", "64", "--n_test", "16",
                             "--batch_size", "16", "--hidden", "16", "--dropout", "0", "--no_progress", *extra]) == 0
        ck = kt.Checkpointer(tmp_path / name / "checkpoints")
        return torch.load(ck.export(tmp_path / f"{name}.pt"), weights_only=False)["app"]["model"]

    whole, accumulated = run("whole"), run("accum", "--micro_batch_size", "4")
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-5, atol=1e-6)
