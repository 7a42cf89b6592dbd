"""autoregressive_transformers: every numeric flag of every entry point declares its range once
(krause.training.ranges); the parser, the defaults and a loaded config.json all read it, and a
refusal is one `error:` line, exit 2, before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoregressive_transformers import complete, config, demo, evaluate, generate, train
from autoregressive_transformers.common import run_main
from krause.training.errors import UsageError
from krause.training.ranges import Range, check_namespace, ranges_of

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "16", "--num_layers", "1", "--num_heads", "2", "--window", "32", "--top_k", "16",
        "--batch_size", "4", "--limit_train", "8", "--limit_test", "4", "--device", "cpu", "--no_progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _demo_parser():
    """demo builds its parser inside main: catch it there."""
    seen = {}
    real = config.OneLineParser.parse_args

    def grab(self, argv=None, namespace=None):
        seen["p"] = self
        raise SystemExit(0)

    config.OneLineParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            demo.main.__wrapped__([])
    finally:
        config.OneLineParser.parse_args = real
    return seen["p"]


PARSERS = {"train": (train.build_parser, ["--out_dir", "x"]), "evaluate": (evaluate.build_parser, []),
           "generate": (generate.build_parser, []), "complete": (complete.build_parser, []),
           "demo": (_demo_parser, ["--out_dir", "x"])}

# flag -> (values at the bound that parse, values beyond it that are refused)
BOUNDS = {
    "--epochs": (["1"], ["0", "-1", "1.5"]), "--max_steps": (["1"], ["0"]), "--batch_size": (["1"], ["0", "-4"]),
    "--micro_batch_size": (["1"], ["0"]), "--limit_train": (["1"], ["0"]), "--limit_test": (["1"], ["0"]),
    "--dim": (["1"], ["0"]), "--num_layers": (["1"], ["0"]), "--num_heads": (["1"], ["0"]),
    "--window": (["1"], ["0"]), "--top_k": (["1"], ["0"]), "--sigma": (["1e-6"], ["0", "-1", "nan", "inf"]),
    "--dropout": (["0", "0.99"], ["1", "-0.1", "nan"]), "--lr": (["1e-9"], ["0", "-1e-3", "nan", "inf"]),
    "--weight_decay": (["0"], ["-1", "nan"]), "--warmup": (["0", "1"], ["-0.1", "1.01"]),
    "--min_lr_ratio": (["0", "1"], ["-1e-9", "2"]), "--grad_clip": (["0"], ["-1", "nan", "inf"]),
    "--seed": (["0", str(2**32 - 1)], ["-1", "1.5", "abc", str(2**32)]), "--resume_step": (["1"], ["0"]),
    "--eval_batch_size": (["1"], ["0"]), "--eval_every": (["0"], ["-1"]), "--log_every": (["1"], ["0"]),
    "--save_every": (["0"], ["-1"]), "--keep_latest_k": (["1"], ["0"]), "--peak_tflops": (["1e-3"], ["0", "nan"]),
    "--limit": (["1"], ["0"]), "--num_samples": (["1"], ["0"]), "--num_images": (["1"], ["0"]),
    "--temperature": (["0"], ["-0.1", "inf", "nan"]), "--fraction": (["0.01", "0.99"], ["0", "1", "nan"]),
    "--steps": (["1"], ["0"]),
}


def _cases():
    for tool, (make, required) in PARSERS.items():
        for dest, (flag, rng) in ranges_of(make()).items():
            yield pytest.param(tool, flag, id=f"{tool}{flag}")


def test_every_numeric_flag_has_a_range_and_a_bounds_case():
    """No numeric flag is left an unchecked `type=int` / `type=float`, and each one is tested below."""
    for tool, (make, _) in PARSERS.items():
        p = make()
        for action in p._actions:
            assert action.type not in (int, float), f"{tool} {action.option_strings}: declare a Range"
        for dest, (flag, rng) in ranges_of(p).items():
            assert flag in BOUNDS, f"{tool} {flag}: add its bounds to BOUNDS"


@pytest.mark.parametrize("tool, flag", list(_cases()))
def test_flag_at_and_beyond_its_bounds(tool, flag):
    make, required = PARSERS[tool]
    good, bad = BOUNDS[flag]
    for text in good:
        p = make()
        args = check_namespace(p.parse_args(required + [flag, text]), p)
        assert getattr(args, flag.lstrip("-")) == Range.__call__(ranges_of(p)[flag.lstrip("-")][1], text)
    for text in bad:
        with pytest.raises(UsageError, match=rf"^argument {flag}: must be .*got"):
            make().parse_args(required + [f"{flag}={text}"])  # "=": "-1e-3" is not read as a flag


def test_defaults_and_code_set_values_pass_the_same_check():
    args = train.parse_args(["--out_dir", "x"])
    assert args.batch_size == 64  # the dataset's default, filled in after parsing, checked too
    p = train.build_parser()
    args.grad_clip = float("nan")
    with pytest.raises(UsageError, match="^--grad_clip must be a finite number >= 0, got nan$"):
        check_namespace(args, p)


def test_flag_pairs_refused():
    with pytest.raises(UsageError, match="--resume and --overwrite exclude each other"):
        train.parse_args(["--out_dir", "x", "--resume", "--overwrite"])
    with pytest.raises(UsageError, match="--resume_step needs --resume"):
        train.parse_args(["--out_dir", "x", "--resume_step", "3"])


def test_a_loaded_config_is_checked_with_the_flags_ranges():
    good = json.loads(json.dumps(vars(train.parse_args(["--out_dir", "x"]))))
    good["model"] = config.model_config("mnist").to_dict()
    config.check_run_config(good, "config.json")
    for key, value, flag in (("grad_clip", float("nan"), "--grad_clip"), ("seed", -3, "--seed"),
                             ("batch_size", 0, "--batch_size"), ("lr", "0.1", "--lr")):
        bad = dict(good, **{key: value})
        with pytest.raises(UsageError, match=rf"^config.json: {flag} must be"):
            config.check_run_config(bad, "config.json")
    bad = dict(good, model=dict(good["model"], dropout=1.5))
    with pytest.raises(UsageError, match=r"^config.json: --dropout must be a finite number in \[0, 1\)"):
        config.check_run_config(bad, "config.json")


def _fails(main, argv, capsys, match):
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err
    return err


def test_resume_refuses_a_hand_edited_config_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--max_steps", "1", "--out_dir", str(out)]
    assert train.main(args) == 0
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["weight_decay"] = -1
    cfg_path.write_text(json.dumps(saved))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fails(train.main, args + ["--resume"], capsys, f"{cfg_path}: --weight_decay must be a finite number >= 0")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_attn_impl_triton_on_cpu_is_refused_by_every_tool_before_writing(tmp_path, capsys, monkeypatch):
    """One shared check (common.check_attn_impl): train, evaluate, generate and complete refuse alike."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    refused = _fails(train.main, TINY + ["--attn_impl", "triton", "--out_dir", str(tmp_path / "t")], capsys,
                     "--attn_impl triton: impl='triton' cannot run causal on cpu")
    assert "pass --attn_impl auto" in refused and not (tmp_path / "t").exists()
    out = tmp_path / "run"
    assert train.main(TINY + ["--max_steps", "1", "--out_dir", str(out)]) == 0
    before = sorted(out.rglob("*"))
    cpu = ["--run_dir", str(out), "--device", "cpu", "--no_progress", "--attn_impl", "triton"]
    for main, extra in ((evaluate.main, []), (generate.main, ["--num_samples", "1"]),
                        (complete.main, ["--num_images", "1", "--num_samples", "1"])):
        assert _fails(main, cpu + extra, capsys, "--attn_impl triton: impl='triton' cannot run causal on cpu")
    assert sorted(out.rglob("*")) == before


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.parametrize("module, argv, words", [
    ("train", ["--grad_clip", "nan"], "argument --grad_clip: must be a finite number >= 0, got nan"),
    ("generate", ["--temperature", "inf"], "argument --temperature: must be a finite number >= 0, got inf"),
    # one subprocess each costs a torch import: the rest run with the slow tests
    pytest.param("train", ["--seed", "1.5"], "argument --seed: must be an integer in [0, 4294967296), got '1.5'",
                 marks=pytest.mark.slow),
    pytest.param("evaluate", ["--batch_size", "0"], "argument --batch_size: must be an integer >= 1, got 0",
                 marks=pytest.mark.slow),
    pytest.param("complete", ["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967296), got -1",
                 marks=pytest.mark.slow),
])
def test_command_line_refusal_is_one_line_exit_2_nothing_written(tmp_path, module, argv, words):
    out = tmp_path / "out"
    where = {"train": ["--out_dir", str(out)], "evaluate": ["--run_dir", str(tmp_path), "--out", str(out / "e.json")]}
    argv = where.get(module, ["--run_dir", str(tmp_path), "--out_dir", str(out)]) + argv
    done = subprocess.run([sys.executable, "-m", f"autoregressive_transformers.{module}", *argv], env=_env(),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {words} (see python -m autoregressive_transformers.{module} --help)"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []

