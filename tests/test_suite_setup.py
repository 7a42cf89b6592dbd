"""The suite's own parallel setup (tests/conftest.py): how many workers -n auto starts, and
that the Slurm tests stay together on one worker."""

from __future__ import annotations

import os
from collections import namedtuple

import psutil
import pytest

import conftest

Memory = namedtuple("Memory", "available")


def test_auto_workers_are_the_usable_cores_capped_by_memory(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(conftest, "usable_cores", lambda: 8)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(available=64 * 2**30))
    assert conftest.pytest_xdist_auto_num_workers(None) == 8
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(available=3 * conftest.WORKER_MEMORY + 1))
    assert conftest.pytest_xdist_auto_num_workers(None) == 3
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(available=conftest.WORKER_MEMORY // 2))
    assert conftest.pytest_xdist_auto_num_workers(None) == 1  # never none
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert conftest.pytest_xdist_auto_num_workers(None) is None  # left to xdist, which reads the variable


def test_usable_cores_is_within_the_machine():
    assert 1 <= conftest.usable_cores() <= (os.cpu_count() or 1)


def test_slurm_tests_are_one_xdist_group():
    import test_slurm

    assert pytest.mark.xdist_group("slurm").mark in [m.mark for m in test_slurm.pytestmark]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_runs_torch_on_its_share_of_the_cores(workers, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    monkeypatch.setattr(conftest, "usable_cores", lambda: 4)
    try:
        conftest.pytest_configure(None)
        assert torch.get_num_threads() == (threads if workers == "1" else 2)
    finally:
        torch.set_num_threads(threads)
