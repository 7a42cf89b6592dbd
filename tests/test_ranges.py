"""krause.training.ranges: one declaration guards the command line, defaults and loaded configs."""

import argparse
import math

import pytest

from krause.training.errors import UsageError
from krause.training.ranges import (NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY, SEED, Range,
                                    check_mapping, check_namespace, ranges_of)


def _parser():
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument("--steps", type=POSITIVE_INT, default=None)
    p.add_argument("--warmup", type=Range(float, ge=0, lt=1), default=0.05)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--name", default="x")
    return p


@pytest.mark.parametrize("rng, good, bad", [
    (POSITIVE_INT, ["1", "7", "1e3"], ["0", "-3", "1.5", "abc", "nan", "inf", "True"]),
    (NONNEGATIVE_INT, ["0", "4"], ["-1", "0.5"]),
    (POSITIVE_FLOAT, ["1e-9", "3"], ["0", "-1", "nan", "inf", "-inf", "x"]),
    (PROBABILITY, ["0", "1", "0.5"], ["-0.01", "1.01", "nan"]),
    (Range(float, ge=0, lt=1), ["0", "0.999"], ["1", "-1e-9"]),
    (Range(float, gt=0, le=1), ["1", "1e-6"], ["0", "1.0001"]),
    (SEED, ["0", str(2**32 - 1)], ["-1", str(2**32), "0.5"]),
])
def test_bounds_at_and_beyond(rng, good, bad):
    for text in good:
        value = rng(text)
        assert rng.problem(value) is None
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            rng(text)


def test_describe_names_the_bounds():
    assert POSITIVE_INT.describe() == "an integer >= 1"
    assert Range(float, ge=0, lt=1).describe() == "a finite number in [0, 1)"
    assert POSITIVE_FLOAT.describe() == "a finite number > 0"
    assert Range(float, le=2.5).describe() == "a finite number <= 2.5"


def test_parser_refuses_in_one_message_naming_the_flag(capsys):
    p = _parser()
    with pytest.raises(SystemExit) as e:
        _strict(p, ["--lr", "nan"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "must be a finite number > 0, got nan" in err


def _strict(p, argv):
    p.exit_on_error = True
    return p.parse_args(argv)


def test_check_namespace_covers_defaults_and_code_set_values():
    p = _parser()
    args = p.parse_args([])
    check_namespace(args, p)  # defaults are valid
    args.lr = -1.0
    with pytest.raises(UsageError, match=r"^--lr must be a finite number > 0, got -1.0$"):
        check_namespace(args, p)
    args.lr = math.inf
    with pytest.raises(UsageError, match="--lr"):
        check_namespace(args, p)


def test_check_mapping_guards_loaded_configs():
    p = _parser()
    check_mapping({"lr": 0.1, "steps": None, "unknown": -5, "name": "y"}, p)  # None: unset optional flag
    with pytest.raises(UsageError, match=r"--warmup must be a finite number in \[0, 1\), got 1.5"):
        check_mapping({"warmup": 1.5}, p)
    with pytest.raises(UsageError, match="--steps must be an integer >= 1, got 2.5"):
        check_mapping({"steps": 2.5}, p)
    with pytest.raises(UsageError, match="--steps"):
        check_mapping({"steps": True}, p)


def test_ranges_of_lists_only_ranged_flags():
    assert set(ranges_of(_parser())) == {"lr", "steps", "warmup", "seed"}


def test_range_declaration_errors():
    with pytest.raises(TypeError):
        Range(str)
    with pytest.raises(TypeError):
        Range(float, ge=0, gt=0)


# ---- contained writes (krause.training.paths) ----

def test_inside_refuses_escapes(tmp_path):
    from krause.training.paths import escaping_symlinks, inside

    root = tmp_path / "run"
    root.mkdir()
    assert inside(root, "figures", "a.png") == (root / "figures" / "a.png").resolve()
    assert inside(root) == root.resolve()
    for bad in ("../x", "a/../../x", str(tmp_path / "abs")):
        with pytest.raises(UsageError, match="--prefix"):
            inside(root, bad, what="--prefix")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "ok_link").symlink_to(root / "figures", target_is_directory=True)
    with pytest.raises(UsageError, match="outside"):
        inside(root, "link", "f.txt", what="name")
    assert escaping_symlinks(root) == [root.resolve() / "link"]


def test_plain_name_refuses_anything_that_is_a_path():
    from krause.training.paths import plain_name

    assert plain_name("t1_s0", "--tag") == "t1_s0"
    for bad in ("", ".", "..", "../x", "a/b", "/abs"):
        with pytest.raises(UsageError, match="--tag must be a plain name"):
            plain_name(bad, "--tag")


@pytest.mark.parametrize("tool", ["generate", "complete"])
def test_ar_output_tag_cannot_leave_the_output_folder(tool, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"autoregressive_transformers.{tool}")
    out = tmp_path / "out"
    rc = module.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out_dir", str(out), "--tag", "../escaped"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--tag must be a plain name" in err[0], err
    assert not out.exists() and not (tmp_path / "escaped.npz").exists()


def test_read_run_config_checks_nested_sections_and_names_the_file(tmp_path):
    import json

    from krause.training.ranges import read_run_config

    p = _parser()
    assert read_run_config(tmp_path, p) is None  # no config yet
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.1, "model": {"steps": 3}}))
    assert read_run_config(tmp_path, p)["model"] == {"steps": 3}
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.1, "model": {"steps": 0}}))
    with pytest.raises(UsageError, match=r"config.json: --steps must be an integer >= 1, got 0 \(edited by hand"):
        read_run_config(tmp_path, p)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not JSON"):
        read_run_config(tmp_path, p)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="holds no config"):
        read_run_config(tmp_path, p)
