"""krause.training.checkpointer (DCP): exact round trip, step directories, latest / best,
keep_latest_k, atomicity, corruption of each kind, config mismatch, async saves, export."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import krause.training as kt
from krause.training.checkpointer import MARKER


def _build(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Dropout(0.2), nn.Linear(12, 3))
    model.log_sigma = nn.Parameter(torch.zeros(()))
    opt = kt.build_adamw(model, lr=1e-2, weight_decay=0.1)
    sched = kt.warmup_cosine_scheduler(opt, total_steps=40, warmup_steps=4, min_lr_ratio=0.1)
    return model, opt, sched


def _steps(model, opt, sched, state, n):
    for _ in range(n):
        x = torch.randn(5, 6)
        loss = model(x).pow(2).mean() / model.log_sigma.exp()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        state.step += 1
        state.add(loss=float(loss.detach()))


def _app(model, opt, sched, state):
    return kt.AppState(model, opt, sched, train_state=state)


def test_round_trip_continues_bit_identically_and_restores_every_part(tmp_path):
    model, opt, sched = _build(0)
    state = kt.TrainState(extra={"note": "x"})
    torch.manual_seed(5)
    _steps(model, opt, sched, state, 3)
    ckpt = kt.Checkpointer(tmp_path, config={"lr": 1e-2})
    info = ckpt.save(state.step, _app(model, opt, sched, state), metric=0.5)
    assert info.path == tmp_path / "step-000003" and info.is_best and not info.asynchronous
    assert (tmp_path / "latest").read_text().strip() == "step-000003"
    _steps(model, opt, sched, state, 4)  # the reference continuation (dropout from the saved RNG on)

    model2, opt2, sched2 = _build(1)  # other weights, empty optimizer, fresh schedule
    state2 = kt.TrainState()
    torch.manual_seed(999)  # the RNG must come back from the checkpoint
    ckpt2 = kt.Checkpointer(tmp_path, config={"lr": 1e-2})
    assert ckpt2.load(_app(model2, opt2, sched2, state2)) == 3
    assert state2.step == 3 and state2.extra == {"note": "x"} and ckpt2.best_metric == 0.5
    assert sched2.last_epoch == 3
    _steps(model2, opt2, sched2, state2, 4)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert state2.sums == state.sums and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_keep_latest_k_prunes_and_best_survives(tmp_path):
    model, opt, sched = _build()
    state = kt.TrainState()
    ckpt = kt.Checkpointer(tmp_path, keep_latest_k=2, mode="max")
    for step, metric in [(1, 0.2), (2, 0.9), (3, 0.1), (4, 0.3)]:
        state.step = step
        ckpt.save(step, _app(model, opt, sched, state), metric=metric)
    assert ckpt.steps() == [3, 4] and ckpt.latest_step() == 4
    assert json.loads((tmp_path / "best" / MARKER).read_text())["step"] == 2  # pruned step, best kept
    state2 = kt.TrainState()
    assert kt.Checkpointer(tmp_path).load(_app(*_build(), state2), step="best") == 2 and state2.step == 2
    with pytest.raises(ValueError, match="keep_latest_k"):
        kt.Checkpointer(tmp_path, keep_latest_k=0)


def test_half_written_step_is_never_picked_up(tmp_path):
    model, opt, sched = _build()
    state = kt.TrainState(step=2)
    ckpt = kt.Checkpointer(tmp_path)
    ckpt.save(2, _app(model, opt, sched, state))
    # a crash mid-save leaves a temporary directory, or a step directory without its marker
    shutil.copytree(tmp_path / "step-000002", tmp_path / ".tmp-step-000005")
    shutil.copytree(tmp_path / "step-000002", tmp_path / "step-000004")
    (tmp_path / "step-000004" / MARKER).unlink()
    assert ckpt.steps() == [2] and ckpt.latest_step() == 2
    fresh = kt.TrainState()
    assert kt.Checkpointer(tmp_path).load(_app(*_build(), fresh)) == 2
    with pytest.raises(kt.CorruptCheckpointError, match=r"step-000004 is incomplete.*step-000002"):
        kt.Checkpointer(tmp_path).load(_app(*_build(), fresh), step=4)


def _two_steps(tmp_path):
    model, opt, sched = _build()
    state = kt.TrainState()
    ckpt = kt.Checkpointer(tmp_path, keep_latest_k=5)
    for step in (1, 2):
        state.step = step
        ckpt.save(step, _app(model, opt, sched, state))
    return tmp_path / "step-000002"


def _shard(step_dir: Path) -> Path:
    return next(p for p in step_dir.iterdir() if p.name.endswith(".distcp"))


CORRUPTIONS = {
    "truncated shard": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-7]), "truncated"),
    "flipped byte": (lambda d: _flip(_shard(d)), "CRC-32 mismatch"),
    "missing shard": (lambda d: _shard(d).unlink(), "missing"),
    "garbled metadata": (lambda d: _garble(d / ".metadata"), ".metadata"),
    "garbled marker": (lambda d: (d / MARKER).write_text("{not json"), "unreadable"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = b"\0" * (len(data) // 2)
    path.write_bytes(bytes(data))  # same size: only the content check can catch it


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_kind_is_detected_naming_the_step_and_the_older_one(tmp_path, kind):
    step_dir = _two_steps(tmp_path)
    damage, words = CORRUPTIONS[kind]
    damage(step_dir)
    with pytest.raises(kt.CorruptCheckpointError) as err:
        kt.Checkpointer(tmp_path).load(_app(*_build(), kt.TrainState()))
    msg = str(err.value)
    assert "step-000002" in msg and words in msg and "previous complete checkpoint is" in msg and "--resume_step 1" in msg, msg
    state = kt.TrainState()
    assert kt.Checkpointer(tmp_path).load(_app(*_build(), state), step=1) == 1 and state.step == 1


def test_config_mismatch_gives_the_readable_diff_and_loads_nothing(tmp_path):
    model, opt, sched = _build()
    kt.Checkpointer(tmp_path, config={"lr": 1e-3, "depth": 2, "out_dir": "a"}).save(
        1, _app(model, opt, sched, kt.TrainState(step=1)))
    other, *_ = _build(3)
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(kt.CheckpointMismatchError, match=r"another config:\n  depth: 2 -> 3"):
        kt.Checkpointer(tmp_path, config={"lr": 1e-3, "depth": 3, "out_dir": "b"}).load(kt.AppState(other))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    # runtime keys (out_dir) never count
    assert kt.Checkpointer(tmp_path, config={"lr": 1e-3, "depth": 2, "out_dir": "b"}).load(kt.AppState(other)) == 1


def test_async_save_blocks_only_for_the_cpu_copy(tmp_path, monkeypatch):
    """The writer is slowed down to 1 s: save() returns well before it, the model is changed right
    after, and the checkpoint still holds the values of the moment of the call (the staging copy)."""
    from torch.distributed.checkpoint import filesystem

    original = filesystem.FileSystemWriter.write_data

    def slow_write(self, plan, planner):
        time.sleep(1.0)
        return original(self, plan, planner)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", slow_write)
    model, opt, sched = _build()
    ckpt = kt.Checkpointer(tmp_path, async_save=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    info = ckpt.save(7, _app(model, opt, sched, kt.TrainState(step=7)))
    assert info.asynchronous and info.blocking_s < 0.8, info
    assert ckpt.steps() == []  # not finalised yet: nothing to resume from until the write is complete
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt.close()
    assert ckpt.steps() == [7]
    fresh, *_ = _build(4)
    kt.Checkpointer(tmp_path).load(kt.AppState(fresh))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_export_to_one_file_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    model, opt, sched = _build()
    ckpt = kt.Checkpointer(tmp_path / "ck", config={"a": 1})
    ckpt.save(3, _app(model, opt, sched, kt.TrainState(step=3)))
    out = ckpt.export(tmp_path / "model.pt", safetensors_file=tmp_path / "model.safetensors")
    payload = torch.load(out, weights_only=False)
    assert payload["meta"]["step"] == 3 and set(payload["app"]) >= {"model", "optimizer", "scheduler"}
    plain = _build(9)[0]
    plain.load_state_dict(payload["app"]["model"])
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_trainable_only_saves_and_restores_just_the_trainable_parameters(tmp_path):
    model, _, _ = _build()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kt.Checkpointer(tmp_path).save(1, kt.AppState(model, opt, trainable_only=True))
    marker = json.loads((tmp_path / "step-000001" / MARKER).read_text())
    assert marker["step"] == 1
    other, _, _ = _build(5)
    other[0].requires_grad_(False)
    frozen_before = other[0].weight.clone()
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    kt.Checkpointer(tmp_path).load(kt.AppState(other, opt2, trainable_only=True))
    assert torch.equal(other[0].weight, frozen_before)  # frozen base untouched
    assert torch.equal(other[4].weight, model[4].weight) and torch.equal(other.log_sigma, model.log_sigma)


# ----------------------------------------------------------------------------- ported from the single-file format's tests


def _seed_all(seed):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _noisy_steps(model, opt, sched, scaler, n):
    """Every random source is used: torch (data, dropout), numpy and python (noise scales)."""
    import random

    import numpy as np

    for _ in range(n):
        x = torch.randn(8, 6) * float(np.random.uniform(0.5, 1.5)) + random.gauss(0.0, 0.1)
        loss = model(x).pow(2).mean() / model.log_sigma.exp()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def test_every_rng_and_the_grad_scaler_come_back(tmp_path):
    def build(seed):
        model, opt, sched = _build(seed)
        return model, opt, sched, torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)

    a = build(0)
    _seed_all(123)
    _noisy_steps(*a, 10)
    rng_a = kt.capture_rng_state()

    b = build(0)
    _seed_all(123)
    _noisy_steps(*b, 5)
    kt.Checkpointer(tmp_path).save(5, kt.AppState(*b))
    c = build(99)
    _seed_all(999)  # scrambled: the checkpoint must restore python, numpy and torch
    kt.Checkpointer(tmp_path).load(kt.AppState(*c))
    _noisy_steps(*c, 5)
    for (name, pa), pc in zip(a[0].named_parameters(), c[0].parameters()):
        assert torch.equal(pa, pc), name
    assert a[3].get_scale() == c[3].get_scale() and a[2].get_last_lr() == c[2].get_last_lr()
    rng_c = kt.capture_rng_state()
    assert torch.equal(rng_a["torch"], rng_c["torch"]) and rng_a["python"] == rng_c["python"]
    assert torch.equal(torch.as_tensor(rng_a["numpy"]["key"]), torch.as_tensor(rng_c["numpy"]["key"]))

    _seed_all(6)  # restore_rng=False leaves the caller's generators alone
    kt.Checkpointer(tmp_path).load(kt.AppState(*build(1), restore_rng=False))
    import random

    expected = random.random()
    _seed_all(6)
    assert random.random() == expected


def test_compile_wrapper_is_stripped_and_a_plain_model_loads_it(tmp_path):
    model, opt, sched = _build(0)
    kt.Checkpointer(tmp_path).save(1, kt.AppState(torch.compile(model), opt, sched))
    plain, *_ = _build(1)
    meta = kt.load_model_weights(plain, tmp_path / "step-000001")
    assert meta["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    model, opt, sched = _build(0)
    kt.Checkpointer(tmp_path).save(1, _app(model, opt, sched, kt.TrainState(step=1)))
    wider = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Dropout(0.2), nn.Linear(12, 5))
    wider.log_sigma = nn.Parameter(torch.zeros(()))
    with pytest.raises(kt.CheckpointMismatchError, match="does not fit") as err:
        kt.Checkpointer(tmp_path).load(kt.AppState(wider))
    assert "\n" not in str(err.value)
    with pytest.raises(kt.CheckpointMismatchError, match="does not fit this model"):
        kt.load_model_weights(wider, tmp_path / "step-000001")
    # a trainable-only checkpoint cannot fill a model whose every parameter is expected
    frozen, *_ = _build(0)
    frozen[0].requires_grad_(False)
    kt.Checkpointer(tmp_path / "lora").save(1, kt.AppState(frozen, trainable_only=True))
    with pytest.raises(kt.CheckpointMismatchError, match="does not fit"):
        kt.Checkpointer(tmp_path / "lora").load(kt.AppState(_build(2)[0]))


def test_nan_metric_is_never_best():
    ck = kt.Checkpointer("unused", mode="max")
    assert ck.is_better(0.1) and not ck.is_better(float("nan"))
    ck.best_metric = 3.0
    assert ck.is_better(3.1) and not ck.is_better(2.9)


# ----------------------------------------------------------------------------- the verified reader


def _zeros_inside_the_weights(step_dir: Path, n: int = 4096) -> Path:
    """4 KiB of zeros written over the middle of the largest shard: same size, torch reads it happily."""
    shard = max((p for p in step_dir.iterdir() if p.name.endswith(".distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    start = max(0, len(data) // 2 - n // 2)
    data[start:start + n] = b"\0" * min(n, len(data) - start)
    shard.write_bytes(bytes(data))
    return shard


def _big_model_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))  # > 4 KiB of weights
    ck = kt.Checkpointer(tmp_path / "ck")
    ck.save(1, kt.AppState(model), metric=1.0)
    return model, ck


def test_every_reader_refuses_zeros_written_inside_the_weights(tmp_path):
    model, ck = _big_model_step(tmp_path)
    _zeros_inside_the_weights(ck.best_dir)
    # best/ holds hard links of step-000001: both are damaged now
    fresh = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    before = [p.clone() for p in fresh.parameters()]
    for path in (ck.best_dir, ck.step_dir(1)):
        with pytest.raises(kt.CorruptCheckpointError, match="CRC-32 mismatch") as err:
            kt.load_model_weights(fresh, path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(kt.CorruptCheckpointError, match="CRC-32 mismatch"):
            kt.verify_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))  # nothing loaded
    with pytest.raises(kt.CorruptCheckpointError, match="CRC-32 mismatch"):  # export reads it too
        kt.export_checkpoint(ck.step_dir(1), tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_exported_file_is_checked_on_every_read(tmp_path):
    model, ck = _big_model_step(tmp_path)
    out = ck.export(tmp_path / "model.pt")
    plain = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    assert kt.load_model_weights(plain, out)["step"] == 1
    assert torch.equal(plain[0].weight, model[0].weight)
    data = out.read_bytes()

    needle = model[0].weight.detach()[7, :4].numpy().tobytes()  # bytes inside tensor data
    pos = data.find(needle)
    assert pos > 0
    flipped = bytearray(data)
    flipped[pos + 1] ^= 0x40
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(flipped))
    torch.load(bad, weights_only=False)  # unnoticed by torch itself
    cases = {
        bad: "checksum mismatch",
        tmp_path / "truncated.pt": "truncated, corrupted or not a torch checkpoint",
        tmp_path / "garbage.pt": "truncated, corrupted or not a torch checkpoint",
        tmp_path / "foreign.pt": "is not a krause.training.export/1 record",
        tmp_path / "missing.pt": "does not exist",
    }
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    for path, words in cases.items():
        with pytest.raises(kt.CorruptCheckpointError, match=words):
            kt.load_model_weights(plain, path)
        with pytest.raises(kt.CorruptCheckpointError, match=words):
            kt.checkpoint_meta(path)
    assert kt.verify_checkpoint(out)["step"] == 1  # the original is intact


def _bump_format(path: Path, to: str) -> None:
    record = json.loads(path.read_text())
    record["format"] = to
    path.write_text(json.dumps(record))


def test_another_integrity_record_version_is_named_as_such_by_every_reader(tmp_path):
    step_dir = _two_steps(tmp_path / "ck")
    _bump_format(step_dir / MARKER, "krause.training.dcp/2")
    for read in (lambda: kt.Checkpointer(tmp_path / "ck").load(_app(*_build(), kt.TrainState()), step=2),
                 lambda: kt.verify_checkpoint(step_dir)):
        with pytest.raises(kt.CorruptCheckpointError) as err:
            read()
        msg = str(err.value)
        assert "\n" not in msg and "version 2 of the integrity record" in msg and "reads version 1" in msg, msg
    # a sealed folder (HF export, adapter) of another record version
    sealed = tmp_path / "export"
    sealed.mkdir()
    (sealed / "weights.bin").write_bytes(b"x" * 10)
    kt.seal_directory(sealed)
    from krause.training.checkpointer import SEAL, verify_sealed

    _bump_format(sealed / SEAL, "krause.training.export/9")
    with pytest.raises(kt.CorruptCheckpointError, match="version 9 of the integrity record"):
        verify_sealed(sealed)
    _bump_format(sealed / SEAL, "someone.else/1")  # not ours at all: the plain message
    with pytest.raises(kt.CorruptCheckpointError, match="is not a krause.training.export/1 record"):
        verify_sealed(sealed)
