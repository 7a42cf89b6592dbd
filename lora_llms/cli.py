"""What every lora_llms entry point checks before it writes anything, written once.

- ``parser``: argparse that reports a bad flag as one ``error: ...`` line (exit 2 under
  ``entry_point``); numeric flags declare their range with ``krause.training.ranges``.
- ``check_model_dir`` / ``check_tokenizer``: a local model folder that exists, has a
  ``config.json`` and a tokenizer (a hub id is left to transformers).
- ``resolve_device`` / ``check_impl``: ``--device cuda`` needs CUDA; the Krause op's
  implementation must be able to run on that device (``krause.dispatch`` decides, as at run time).
- ``batch_size``: lm-eval's batch size, a count >= 1 or ``auto`` / ``auto:N``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from krause.training.entry import OneLineParser
from krause.training.errors import UsageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = ("bfloat16", "float16", "float32")


def parser(module: str, description: str) -> argparse.ArgumentParser:
    """The one-line-error parser of ``python -m <module>`` (named so in its messages)."""
    return OneLineParser(prog=f"python -m {module}", description=description)


def _looks_local(path: str) -> bool:
    """A path, not a hub id ('org/name'): absolute, relative with ./ ../ ~, or more than one '/'."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def check_model_dir(path: str, flag: str = "--model") -> None:
    """A local model folder must exist and hold config.json; a hub id passes (transformers reports it)."""
    if not _looks_local(path):
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"{flag}: {path} does not exist")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UsageError(f"{flag}: {path} is not a model folder (no config.json; save the model with save_pretrained)")


def has_tokenizer(path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer(path: str, flag: str = "--model") -> None:
    """A local model folder must hold a tokenizer (the LoRA entry points read it from there)."""
    if _looks_local(path) and not has_tokenizer(Path(path).expanduser()):
        raise UsageError(f"{flag}: {path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); save the model's "
                         "tokenizer there with tokenizer.save_pretrained")


def resolve_device(device: str | None) -> str:
    """``None``: cuda if available, else cpu. ``cuda`` without CUDA is refused in one line."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def check_impl(impl: str, device: str, dtype: str = "float32", window: int | None = None) -> None:
    """The one check of a Krause op implementation against the device it will run on (train,
    evaluate and sinks alike): what ``krause.dispatch`` would refuse at the first forward."""
    import torch

    from krause.dispatch import choose_impl

    try:
        choose_impl("causal", torch.device(device).type, impl, dtype=getattr(torch, dtype), window=window)
    except ValueError as e:
        raise UsageError(f"--impl {impl} on {device}: {e}") from None


def batch_size(text: str) -> str:
    """argparse type of lm-eval's batch size: an integer >= 1, ``auto`` or ``auto:N`` (N >= 1)."""
    value = text.strip()
    count = value[len("auto:"):] if value.startswith("auto:") else value
    if value == "auto" or (count.isdigit() and int(count) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, 'auto' or 'auto:N', got {text!r}")
