"""Session-wide test setup."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The flag is read when a
# kernel is decorated, so it must be set before any test imports krause.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread():
    """One torch CPU thread for the test (tiny ops: tests time nothing), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -n auto (scripts/run_tests.sh): memory one worker may need at once, measured on 2 cores at
# ~1.1 GiB for the worker plus ~1 GiB for each training process a test starts (up to three).
WORKER_MEMORY = 4 * 2**30


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, within a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read
    return cores


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker per usable core (not xdist's count of the host's physical cores, which
    ignores affinity and quotas), no more than the available memory holds."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    import psutil

    by_memory = psutil.virtual_memory().available // WORKER_MEMORY
    return max(1, min(usable_cores(), by_memory))


def pytest_configure(config):
    """An xdist worker gets its share of the cores as torch threads (workers x all cores would
    oversubscribe them); the processes tests start set their own threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, usable_cores() // workers))
