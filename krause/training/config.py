"""Resolved run configs: to plain JSON, fingerprint, diff.

A config is whatever the family's argument parser produced (argparse.Namespace,
a dataclass or a mapping). Some keys say where or how a run executes rather
than what it computes (output directory, resume flag, number of loader workers,
data location, ...); they are left out of the fingerprint so that a run moved to
another machine or restarted with --resume still matches its checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import hashlib
import json
import math
import os
from pathlib import PurePath
from typing import Any, Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "RUNTIME_KEYS",
    "config_to_dict",
    "config_fingerprint",
    "config_diff",
    "format_config_diff",
    "without_defaults",
]

#: Keys that never enter the fingerprint: where the run lives and how it is executed.
RUNTIME_KEYS: frozenset[str] = frozenset(
    {
        "out_dir",
        "resume",
        "resume_step",
        "overwrite",
        "num_workers",
        "workers",
        "data_dir",
        "data_root",
        "data_path",
        "cache_dir",
        "device",
        "dist_backend",
        "compile",
        "log_every",
        "print_freq",
        "save_every",
        "eval_every",
        "progress",
        "no_progress",
    }
)


def _to_jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)  # JSON has no inf/nan; keep them readable and stable
        return value
    if isinstance(value, enum.Enum):
        return _to_jsonable(value.value, where)
    if isinstance(value, (PurePath, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, np.generic):
        return _to_jsonable(value.item(), where)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"config key {where}{k!r} is not a string")
            out[k] = _to_jsonable(v, f"{where}{k}.")
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_to_jsonable(v, where) for v in items]
    raise TypeError(f"config value at {where.rstrip('.') or '<root>'} has type {type(value).__name__}, which is not JSON-serialisable")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict from a Namespace, dataclass or mapping (None gives {})."""
    if config is None:
        return {}
    result = _to_jsonable(config, "")
    if not isinstance(result, dict):
        raise TypeError(f"a config must be a mapping, Namespace or dataclass, got {type(config).__name__}")
    return result


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _strip(config: Any, ignore: Iterable[str]) -> dict[str, Any]:
    ignore = set(ignore)
    flat = _flatten(config_to_dict(config))
    return {k: v for k, v in flat.items() if k not in ignore and k.rsplit(".", 1)[-1] not in ignore}


def config_fingerprint(config: Any, ignore: Iterable[str] = RUNTIME_KEYS) -> str:
    """SHA-256 (hex) of the canonical JSON of `config` without the `ignore` keys (matched at any depth)."""
    canonical = json.dumps(_strip(config, ignore), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_MISSING = "<missing>"


def config_diff(old: Any, new: Any, ignore: Iterable[str] = RUNTIME_KEYS) -> list[tuple[str, Any, Any]]:
    """[(dotted key, old value, new value)] for every key that differs, ignoring `ignore`."""
    a, b = _strip(old, ignore), _strip(new, ignore)
    return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]


def format_config_diff(diff: list[tuple[str, Any, Any]], limit: int = 20) -> str:
    lines = [f"  {k}: {a!r} -> {b!r}" for k, a, b in diff[:limit]]
    if len(diff) > limit:
        lines.append(f"  ... and {len(diff) - limit} more")
    return "\n".join(lines)


def without_defaults(config: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """`config` without the keys of settings added after runs already existed (``later``:
    dotted key -> default) while they hold that default: a run directory written before a
    setting existed still matches the config of the same run today, so it still resumes."""
    out = copy.deepcopy(dict(config))
    for dotted, default in later.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
    return out
