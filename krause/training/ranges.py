"""Valid ranges of numeric flags, declared once and read by both the parser and config validation.

    from krause.training.ranges import Range, POSITIVE_INT, check_namespace

    p.add_argument("--lr", type=Range(float, gt=0), default=6e-4)
    p.add_argument("--warmup", type=Range(float, ge=0, lt=1), default=0.05)
    args = p.parse_args(argv)
    check_namespace(args, p)   # defaults and values set in code pass the same check

A `Range` is an argparse ``type``: it parses the text and refuses a value outside the range
(NaN and infinities are never valid) with a message naming the bound. `check_namespace` /
`check_mapping` walk the parser's actions and apply the same `Range` to values that did not
come through the command line (defaults, a resumed config.json, a preset), so one
declaration guards every way a value can enter a run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UsageError

__all__ = ["Range", "POSITIVE_INT", "NONNEGATIVE_INT", "POSITIVE_FLOAT", "NONNEGATIVE_FLOAT", "PROBABILITY",
           "ranges_of", "check_namespace", "check_mapping", "check_config", "read_run_config", "SEED"]


@dataclass(frozen=True)
class Range:
    """An int or float kind with optional bounds: ge/gt (lower, inclusive/exclusive), le/lt (upper)."""

    kind: type = float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self):
        if self.kind not in (int, float):
            raise TypeError(f"Range kind must be int or float, got {self.kind!r}")
        if self.ge is not None and self.gt is not None or self.le is not None and self.lt is not None:
            raise TypeError("give one lower bound (ge or gt) and one upper bound (le or lt)")

    @property
    def __name__(self) -> str:  # argparse names the type in its "invalid <name> value" message
        return "integer" if self.kind is int else "number"

    def describe(self) -> str:
        """e.g. 'an integer >= 1', 'a finite number in [0, 1)'."""
        noun = "an integer" if self.kind is int else "a finite number"
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if lo and hi:
            return f"{noun} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        if lo:
            return f"{noun} {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        if hi:
            return f"{noun} {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
        return noun

    def problem(self, value: Any) -> str | None:
        """None when `value` is valid, else what is wrong with it (without the flag's name)."""
        if self.kind is int:
            ok_type = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type:
            return f"must be {self.describe()}, got {value!r}"
        if self.kind is float and not math.isfinite(value):
            return f"must be {self.describe()}, got {value}"
        if (self.ge is not None and value < self.ge or self.gt is not None and value <= self.gt
                or self.le is not None and value > self.le or self.lt is not None and value >= self.lt):
            return f"must be {self.describe()}, got {value}"
        return None

    def __call__(self, text: str):
        """argparse type: parse `text` and check it."""
        try:
            value = self.kind(text) if self.kind is float else _parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def check(self, name: str, value: Any):
        """`value` if valid (None passes: an unset optional flag); else UsageError naming `name`."""
        if value is None:
            return value
        problem = self.problem(value)
        if problem:
            raise UsageError(f"{name} {problem}")
        return value


def _parse_int(text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        f = float(text)  # '1e6' is a common way to write a count; it must still be a whole number
        if not math.isfinite(f) or f != int(f):
            raise
        return int(f)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


POSITIVE_INT = Range(int, ge=1)
NONNEGATIVE_INT = Range(int, ge=0)
SEED = Range(int, ge=0, lt=2**32)  # numpy's seed range; torch accepts it too
POSITIVE_FLOAT = Range(float, gt=0)
NONNEGATIVE_FLOAT = Range(float, ge=0)
PROBABILITY = Range(float, ge=0, le=1)


def ranges_of(parser: argparse.ArgumentParser) -> dict[str, tuple[str, Range]]:
    """{dest: (option string, Range)} for every argument of `parser` whose type is a Range."""
    out = {}
    for action in parser._actions:  # argparse keeps no public list of actions
        if isinstance(action.type, Range):
            flag = max(action.option_strings, key=len) if action.option_strings else action.dest
            out[action.dest] = (flag, action.type)
    return out


def check_mapping(values: Mapping[str, Any], parser: argparse.ArgumentParser) -> None:
    """Apply the parser's ranges to `values` (e.g. a config.json); keys the parser lacks are ignored."""
    for dest, (flag, rng) in ranges_of(parser).items():
        if dest in values:
            value = values[dest]
            if isinstance(value, list):  # nargs='+' flags
                for v in value:
                    rng.check(flag, v)
            else:
                rng.check(flag, value)


def check_namespace(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Apply the parser's ranges to every value of `args` (defaults included); returns `args`."""
    check_mapping(vars(args), parser)
    return args


def check_config(config: Mapping[str, Any], parser: argparse.ArgumentParser, where: str) -> dict:
    """A config read from disk (a run's config.json, a checkpoint's meta) against the parser's
    ranges, nested sections (e.g. "model") included; UsageError naming `where` otherwise."""
    try:
        check_mapping(config, parser)
        for value in config.values():
            if isinstance(value, Mapping):
                check_mapping(value, parser)
    except UsageError as e:
        raise UsageError(f"{where}: {e} (edited by hand, or written by another version)") from None
    return dict(config)


def read_run_config(run_dir, parser: argparse.ArgumentParser) -> dict | None:
    """<run_dir>/config.json checked by `check_config`; None when the run has none yet."""
    import json
    from pathlib import Path

    path = Path(run_dir).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON ({e}); restore it, or start the run again with --overwrite") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path} holds no config (a JSON object), got {type(saved).__name__}")
    return check_config(saved, parser, str(path))
