"""Contained writes: every path the project writes resolves under its run or build directory.

`inside(root, name, what=...)` is the one check for a name that comes from a flag or a config
(a file name, a prefix, a sub-folder): absolute names, '..' and symlinks that lead out of
`root` are refused in one line naming `what`. `escaping_symlinks(root)` lists links inside a
directory that point out of it, so a run directory can refuse to write through them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

__all__ = ["inside", "escaping_symlinks", "plain_name"]


def inside(root: str | os.PathLike, *parts: str | os.PathLike, what: str = "path") -> Path:
    """`root / parts`, resolved (symlinks followed); UsageError if it is not `root` or below it."""
    base = Path(root).resolve()
    rel = Path(*parts) if parts else Path(".")
    if rel.is_absolute():
        raise UsageError(f"{what} must be a name inside {base}, got the absolute path {rel}")
    full = (base / rel).resolve()
    if full != base and base not in full.parents:
        raise UsageError(f"{what} {str(rel)!r} would write outside {base} (to {full})")
    return full


def escaping_symlinks(root: str | os.PathLike) -> list[Path]:
    """Symlinks under `root` (not following links to directories) whose targets lie outside it."""
    base = Path(root).resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                target = p.resolve()
                if target != base and base not in target.parents:
                    out.append(p)
    return sorted(out)


def plain_name(name: str, what: str = "name") -> str:
    """`name` if it is one file-name component (a tag or label that becomes part of a file
    name); UsageError naming `what` for '', '.', '..' or anything with a path separator."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(c in name for c in seps) or "\0" in name:
        raise UsageError(f"{what} must be a plain name (no path separators, not '.' or '..'), got {name!r}")
    return name
