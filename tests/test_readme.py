"""The README's library example runs as written (at smaller sizes)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs():
    text = README.read_text()
    code = re.search(r"## The library\n\n```python\n(.*?)```", text, re.S).group(1)
    small = code.replace("4096", "256").replace("14 * 14", "4 * 4").replace("(14, 14)", "(4, 4)").replace(":100]", ":10]")
    scope: dict = {}
    exec(compile(small, "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 6, 17, 64)
    out1, mask = scope["out1"], scope["mask"]
    assert out1.shape == (2, 8, 1, 64) and torch.isfinite(out1).all()
    assert not mask[1, :10].any()
