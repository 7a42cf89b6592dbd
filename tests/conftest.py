"""Session-wide test setup."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The flag is read when a
# kernel is decorated, so it must be set before any test imports krause.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
