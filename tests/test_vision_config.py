"""The vision command lines: every numeric flag declares its range once (krause.training.ranges),
values from the recipe / preset / a saved config.json pass the same check, --resume --overwrite
is refused, and the `paper` preset resolves to the first release's choices. Every refusal is one
line, exit 2, before anything is written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from krause.training import UsageError
from krause.training.ranges import Range, ranges_of
from vision_transformers import compare, config, demo, train

REPO = Path(__file__).resolve().parents[1]


PARSERS = {"train": config.build_parser, "demo": demo.build_parser, "compare": compare.build_parser}


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_every_numeric_flag_declares_a_range(tool):
    parser = PARSERS[tool]()
    untyped = [a.dest for a in parser._actions
               if a.type is not None and not isinstance(a.type, Range) and a.type is not str]
    assert not untyped, f"{tool}: flags with a type that is not a Range: {untyped}"
    numeric_defaults = [a.dest for a in parser._actions if isinstance(a.default, (int, float))
                        and not isinstance(a.default, bool) and not isinstance(a.type, Range)]
    assert not numeric_defaults, f"{tool}: numeric defaults without a Range: {numeric_defaults}"
    assert ranges_of(parser)


def _edges(rng: Range):
    """(values at the bounds that pass, values beyond them that are refused), as text."""
    step = 1 if rng.kind is int else 1e-6
    good, bad = [], ["nan", "inf"] if rng.kind is float else ["1.5", "x"]
    if rng.ge is not None:
        good.append(rng.ge)
        bad.append(rng.ge - step)
    if rng.gt is not None:
        good.append(rng.gt + step)
        bad.append(rng.gt)
    if rng.le is not None:
        good.append(rng.le)
        bad.append(rng.le + step)
    if rng.lt is not None:
        good.append(rng.lt - step)
        bad.append(rng.lt)
    fmt = (lambda v: str(int(v))) if rng.kind is int else repr
    return [fmt(v) for v in good], [v if isinstance(v, str) else fmt(v) for v in bad]


def _cases(tool):
    parser = PARSERS[tool]()
    return [(tool, dest, flag, rng) for dest, (flag, rng) in ranges_of(parser).items()]


@pytest.mark.parametrize("tool, dest, flag, rng", _cases("train") + _cases("demo") + _cases("compare"),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_flag_at_and_beyond_its_bounds(tool, dest, flag, rng):
    parser = PARSERS[tool]()
    base = {"train": ["--out_dir", "x"], "demo": [], "compare": ["r", "--out_dir", "x"]}[tool]
    good, bad = _edges(rng)
    assert good, flag
    for text in good:
        value = getattr(parser.parse_args(base + [f"{flag}={text}"]), dest)
        assert value == pytest.approx(float(text)) or value == [int(text)], (flag, text)
    for text in bad:
        with pytest.raises(UsageError, match=f"argument {flag}.*must be"):
            parser.parse_args(base + [f"{flag}={text}"])


def test_swin_lists_are_checked_entry_by_entry():
    p = config.build_parser()
    assert p.parse_args(["--out_dir", "x", "--depths", "2,2,6,2"]).depths == [2, 2, 6, 2]
    for text in ("2,0,6,2", "2,-1", "", "a,b"):
        with pytest.raises(UsageError, match="--depths"):
            p.parse_args(["--out_dir", "x", "--depths", text])


def test_values_set_in_code_pass_the_same_ranges(monkeypatch):
    """A recipe or preset value outside a flag's range is refused like a typed one."""
    assert config.parse_args(["--out_dir", "x", "--model", "kvit-s"]).lr == 3e-4
    bad = {**config.RECIPES[("vit", "cifar")], "lr": -1.0}
    monkeypatch.setitem(config.RECIPES, ("vit", "cifar"), bad)
    with pytest.raises(UsageError, match="--lr must be a finite number > 0, got -1.0"):
        config.parse_args(["--out_dir", "x", "--model", "kvit-s"])
    monkeypatch.setitem(config.PRESETS["paper"].by_model, "kvit_small_patch4_32", {"drop_path": 1.0})
    with pytest.raises(UsageError, match=r"--drop_path must be a finite number in \[0, 1\), got 1.0"):
        config.parse_args(["--out_dir", "x", "--model", "kvit-s", "--lr", "1e-3", "--preset", "paper"])


def test_cross_flag_checks():
    with pytest.raises(UsageError, match="--resume and --overwrite exclude each other"):
        config.parse_args(["--out_dir", "x", "--resume", "--overwrite"])
    with pytest.raises(UsageError, match=r"--warmup_epochs must be in \[0, --epochs=2\], got 3.0"):
        config.parse_args(["--out_dir", "x", "--epochs", "2", "--warmup_epochs", "3"])
    assert config.parse_args(["--out_dir", "x", "--epochs", "2", "--warmup_epochs", "2"]).warmup_epochs == 2


def test_paper_preset_resolves_to_the_first_releases_choices():
    kvit = config.parse_args(["--out_dir", "x", "--model", "kvit-s", "--preset", "paper"])
    assert (kvit.norm_placement, kvit.decay_all, kvit.sigma) == ("post", True, None)
    kvit_b = config.parse_args(["--out_dir", "x", "--model", "kvit-b-16", "--dataset", "imagenet", "--preset", "paper"])
    assert (kvit_b.norm_placement, kvit_b.decay_all, kvit_b.sigma, kvit_b.lr) == ("post", True, 9.0, 5e-4)
    vit = config.parse_args(["--out_dir", "x", "--model", "vit-s", "--preset", "paper"])
    assert (vit.norm_placement, vit.decay_all) == (None, True)  # the release's ViT baseline was pre-norm
    swin = config.parse_args(["--out_dir", "x", "--model", "kswin-t", "--preset", "paper"])
    assert (swin.decay_all, getattr(swin, "norm_placement")) == (True, None)
    # flags still win over the preset; without it, the fair defaults
    mine = config.parse_args(["--out_dir", "x", "--model", "kvit-b-16", "--preset", "paper", "--norm_placement", "pre",
                              "--sigma", "8"])
    assert (mine.norm_placement, mine.sigma, mine.decay_all) == ("pre", 8.0, True)
    plain = config.parse_args(["--out_dir", "x", "--model", "kvit-s"])
    assert (plain.norm_placement, plain.decay_all, plain.preset) == (None, False, None)
    # the recorded config: the preset's values are there; at their defaults the new keys are not
    # (run directories made before them still resume)
    assert config.run_config(kvit)["preset"] == "paper" and config.run_config(kvit)["decay_all"] is True
    assert "preset" not in config.run_config(plain) and "decay_all" not in config.run_config(plain)
    # the preset's model arguments build: post-norm blocks, no final norm
    from vision_transformers.data import dataset_info
    from vision_transformers.models import PostNormBlock, create

    model = create(kvit.model, **{**config.model_kwargs(kvit, dataset_info("cifar10")), "embed_dim": 16,
                                  "depth": 2, "num_heads": 2})
    assert all(isinstance(b, PostNormBlock) for b in model.blocks)


def test_decay_all_puts_every_parameter_under_weight_decay():
    import torch
    from krause.training.optim import param_groups
    from vision_transformers.models import create

    model = create("kvit-s", embed_dim=16, depth=2, num_heads=2)
    decay, no_decay = param_groups(model, 0.05)
    assert any("log_sigma" in n for n in no_decay["param_names"])
    decay, no_decay = param_groups(model, 0.05, decay_all=True)
    assert not no_decay["params"] and len(decay["params"]) == len(list(model.parameters()))
    assert isinstance(decay["params"][0], torch.nn.Parameter)


def test_a_saved_config_out_of_range_is_refused_on_resume_and_by_compare(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = vars(config.parse_args(["--out_dir", str(run), "--model", "kvit-s", "--dataset", "mnist"]))
    (run / "config.json").write_text(json.dumps({**cfg, "lr": -0.5}))
    before = sorted(p.name for p in run.iterdir())
    assert train.main(["--out_dir", str(run), "--model", "kvit-s", "--dataset", "mnist", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: --lr must be a finite number > 0, got -0.5" in err, err
    assert compare.main([str(run), "--out_dir", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr must be" in err, err
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("module, argv, words", [
    ("train", ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    # one subprocess each costs a torch import: more flag types run with the slow tests
    pytest.param("train", ["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0", marks=pytest.mark.slow),
    pytest.param("train", ["--seed", "1.5"], "argument --seed: must be an integer in [0, 4294967296), got '1.5'",
                 marks=pytest.mark.slow),
    pytest.param("train", ["--mix_prob", "1.01"], "argument --mix_prob: must be a finite number in [0, 1], got 1.01",
                 marks=pytest.mark.slow),
    ("train", ["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ("demo", ["--batch_size", "-4"], "argument --batch_size: must be an integer >= 1, got -4"),
])
def test_refused_in_one_line_exit_2_as_a_subprocess(tmp_path, module, argv, words):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", f"vision_transformers.{module}", "--out_dir", str(out), *argv],
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert not out.exists()  # refused before anything is written
