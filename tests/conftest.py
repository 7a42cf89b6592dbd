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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup), every test of the one local Slurm runs on one
    worker, in file order: its module fixture cancels the jobs its tests left, and the
    preemption tests release requeued jobs from Slurm's hold while they wait."""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
