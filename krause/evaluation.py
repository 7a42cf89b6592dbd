"""lm-evaluation-harness tasks that behave offline: runnable ones run, missing data is named.

lm-eval builds a task by loading its dataset from the Hugging Face hub, and without a
network that ends, after a minute of retries, in a ``ConnectionError`` traceback. Here
each task is first built from the local datasets cache alone; a task that is not cached
is downloaded only when the hub answers. What cannot be had is reported with the dataset
it needs and the two ways out.

    python -m krause.evaluation download --tasks hellaswag piqa [--include_path DIR ...]

fills the cache on a machine with a network (the same ``HF_HOME`` / ``HF_DATASETS_CACHE``
then serves an offline machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from dataclasses import dataclass, field
from urllib.parse import urlparse

DOWNLOAD_COMMAND = "python -m krause.evaluation download --tasks {tasks}"


def download_command(tasks, include_paths=()) -> str:
    extra = "".join(f" --include_path {p}" for p in include_paths)
    return DOWNLOAD_COMMAND.format(tasks=" ".join(tasks)) + extra


class TaskUnavailable(ValueError):
    """A requested lm-eval task whose dataset is neither cached nor downloadable now."""


@dataclass
class PreparedTasks:
    runnable: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why
    offline: bool = False  # run lm-eval with the hub switched off (no network: no retries)


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host does not accept a connection."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline():
    """datasets and huggingface_hub read their offline switch at call time from these module constants."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE, previous = saved
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _datasets_of(manager, name: str, depth: int = 0) -> list[str]:
    """The hub datasets a task or group reads, from its indexed YAML (nothing is loaded)."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    if cfg.get("dataset_path"):
        return [cfg["dataset_path"]]
    found = []
    members = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    for member in members if depth < 3 else []:
        for path in _datasets_of(manager, member, depth + 1) if isinstance(member, str) else []:
            if path not in found:
                found.append(path)
    return found


def _missing_data(error: BaseException) -> bool:
    """Whether an exception raised while building a task means 'dataset not available here'."""
    seen = error
    while seen is not None:
        text = f"{type(seen).__name__}: {seen}"
        if isinstance(seen, (ConnectionError, TimeoutError, FileNotFoundError)) or any(
                marker in text for marker in ("OfflineModeIsEnabled", "LocalEntryNotFound", "not cached",
                                              "Couldn't reach", "couldn't be found", "ConnectionError")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _try_build(manager, name: str) -> BaseException | None:
    try:
        manager.load_task_or_group([name])
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return e
    return None


def prepare_tasks(names, manager, *, strict: bool, network: bool | None = None, include_paths=(),
                  log=print) -> PreparedTasks:
    """Builds every task once (cache first, then the hub if reachable) to learn which can run.

    ``strict``: a task that cannot be had raises ``TaskUnavailable`` (one line naming the task, its
    dataset and the ways out) instead of being skipped; use it for tasks the user asked for by name.
    Names lm-eval does not know always raise.
    """
    names = [n for n in names if n]
    unknown = [n for n in names if n not in set(manager.all_tasks)]
    if unknown:
        raise TaskUnavailable(f"tasks: unknown lm-eval task(s) {', '.join(unknown)}")
    prepared = PreparedTasks()
    missing = []
    for name in names:
        with hub_offline():
            error = _try_build(manager, name)
        if error is None:
            prepared.runnable.append(name)
        elif _missing_data(error):
            missing.append(name)
        else:
            raise error
    if missing:
        network = hub_reachable() if network is None else network
        prepared.offline = not network
        for name in missing:
            error = _try_build(manager, name) if network else FileNotFoundError("no network")
            if error is None:
                prepared.runnable.append(name)
                continue
            if not _missing_data(error):
                raise error
            datasets = ", ".join(_datasets_of(manager, name)) or "its dataset"
            reason = (f"{datasets} is not in the local datasets cache"
                      + ("" if network else " and the hub is unreachable"))
            if strict:
                available = " ".join(prepared.runnable) or "''"
                raise TaskUnavailable(
                    f"task {name}: {reason}; pre-download it where there is a network with "
                    f"`{download_command([name], include_paths)}` (same HF_HOME), or pass --tasks {available}")
            prepared.skipped[name] = reason
            log(f"skipping lm-eval task {name}: {reason} (pre-download: `{download_command([name], include_paths)}`)")
    prepared.runnable = [n for n in names if n in prepared.runnable]  # keep the requested order
    return prepared


def task_manager(include_paths=(), include_defaults: bool = True):
    """lm-eval's TaskManager over its own tasks (unless ``include_defaults`` is False) and ``include_paths``."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_paths]
    for path in paths:
        if not Path(path).is_dir():
            raise ValueError(f"include_path: {path} is not a directory")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m krause.evaluation", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="build lm-eval tasks once, filling the local datasets cache")
    d.add_argument("--tasks", nargs="+", required=True, help="lm-eval task / group names")
    d.add_argument("--include_path", nargs="*", default=[], help="extra task directories (e.g. a family's tasks/)")
    args = p.parse_args(argv)
    try:
        prepared = prepare_tasks(args.tasks, task_manager(args.include_path), strict=True,
                                 include_paths=args.include_path)
    except TaskUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("cached: " + " ".join(prepared.runnable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
