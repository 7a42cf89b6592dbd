"""Every numeric flag of the lora_llms entry points declares its range once (krause.training.ranges):
each is accepted at its bound and refused one step beyond it (and NaN / inf), in one line naming
the flag; the presets resolve as documented; the checks that span flags refuse before any write."""

from __future__ import annotations

import json

import pytest

from krause.training.errors import UsageError
from krause.training.ranges import check_mapping, ranges_of
from lora_llms import config, evaluate, sinks, testing

TRAIN_REQUIRED = ["--mode", "krause", "--model", "m", "--data_dir", "d", "--out_dir", "o"]
EVAL_REQUIRED = ["--model", "m", "--out_dir", "o"]
SINKS_REQUIRED = ["analyze", "--model", "m", "--data_dir", "d", "--out_dir", "o"]

# flag -> (value at the bound, values beyond it)
TRAIN_BOUNDS = {
    "--num_train": ("1", ["0"]), "--num_eval": ("0", ["-1"]), "--shuffle_seed": ("0", ["-1", "4294967296"]),
    "--max_length": ("1", ["0"]), "--window": ("1", ["0"]), "--top_k": ("1", ["0"]),
    "--sigma": ("1e-9", ["0", "-1", "nan", "inf"]), "--lora_r": ("1", ["0"]), "--lora_alpha": ("1", ["0", "-8"]),
    "--lora_dropout": ("0", ["-0.1", "1", "nan"]), "--lr": ("1e-12", ["0", "-1", "nan", "inf"]),
    "--epochs": ("1e-3", ["0", "-1", "nan", "inf"]), "--max_steps": ("-1", ["-2"]),
    "--batch_size": ("1", ["0"]), "--grad_accum": ("1", ["0"]), "--warmup_ratio": ("0", ["-0.01", "1", "nan"]),
    "--weight_decay": ("0", ["-1", "nan", "inf"]), "--grad_clip": ("0", ["-1", "nan", "inf"]),
    "--seed": ("4294967295", ["-3", "4294967296", "1.5", "abc"]), "--logging_steps": ("1", ["0"]),
    "--eval_steps": ("1", ["0"]), "--save_steps": ("1", ["0"]), "--save_total_limit": ("1", ["0"]),
    "--num_workers": ("0", ["-1"]), "--num_proc": ("1", ["0"]), "--kill_at_step": ("1", ["0"]),
}
EVAL_BOUNDS = {"--num_fewshot": ("0", ["-1"]), "--max_length": ("1", ["0"]), "--limit": ("0.01", ["0", "-1", "nan"]),
               "--batch_size": ("1", ["0", "-2", "auto:0", "x"])}
SINKS_BOUNDS = {"--num_texts": ("1", ["0"]), "--max_length": ("2", ["1"]), "--shuffle_seed": ("0", ["-1"])}


def test_every_numeric_flag_declares_a_range():
    """No numeric flag without a declared range: a plain int/float type would accept nonsense."""
    train_parser = config.build_parser()
    for action in train_parser._actions:
        assert action.type not in (int, float), action.option_strings
    declared = {flag for flag, _ in ranges_of(train_parser).values()}
    assert declared == set(TRAIN_BOUNDS)  # the table below covers each of them


@pytest.mark.parametrize("flag", sorted(TRAIN_BOUNDS))
def test_train_flag_at_and_beyond_its_bound(flag):
    at, beyond = TRAIN_BOUNDS[flag]
    extra = ["--window", "1"] if flag == "--top_k" else ["--top_k", "1"] if flag == "--window" else []
    args = config.parse_args([*TRAIN_REQUIRED, *extra, flag, at])
    assert getattr(args, flag[2:]) == type(getattr(args, flag[2:]))(float(at))
    for value in beyond:
        with pytest.raises(UsageError, match=f"^argument {flag}: must be "):
            config.parse_args([*TRAIN_REQUIRED, *extra, flag, value])


@pytest.mark.parametrize("flag", sorted(EVAL_BOUNDS))
def test_evaluate_flag_at_and_beyond_its_bound(flag):
    at, beyond = EVAL_BOUNDS[flag]
    evaluate.parse_args([*EVAL_REQUIRED, flag, at])
    for value in beyond:
        with pytest.raises(UsageError, match=f"argument {flag}: must be"):
            evaluate.parse_args([*EVAL_REQUIRED, flag, value])


@pytest.mark.parametrize("flag", sorted(SINKS_BOUNDS))
def test_sinks_flag_at_and_beyond_its_bound(flag):
    at, beyond = SINKS_BOUNDS[flag]
    sinks.parse_args([*SINKS_REQUIRED, flag, at])
    for value in beyond:
        with pytest.raises(UsageError, match=f"argument {flag}: must be"):
            sinks.parse_args([*SINKS_REQUIRED, flag, value])


def test_stand_ins_refuse_zero_examples(tmp_path, capsys):
    assert testing.main([str(tmp_path / "si"), "--examples", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: argument --examples: must be an integer >= 1, got 0 "
                                               "(see python -m lora_llms.testing --help)")
    assert not (tmp_path / "si").exists()


def test_checks_across_flags():
    with pytest.raises(UsageError, match="--max_steps must be -1"):
        config.parse_args([*TRAIN_REQUIRED, "--max_steps", "0"])
    with pytest.raises(UsageError, match=r"--top_k \(16\) must be at most --window \(8\)"):
        config.parse_args([*TRAIN_REQUIRED, "--window", "8"])


def test_defaults_and_saved_configs_pass_the_same_ranges(tmp_path):
    parser = config.build_parser()
    check_mapping(vars(config.parse_args(TRAIN_REQUIRED)), parser)  # every default is in range
    with pytest.raises(UsageError, match="--lora_alpha must be an integer >= 1, got -8"):
        check_mapping({"lora_alpha": -8, "unknown_key": "ignored"}, parser)
    with pytest.raises(UsageError, match="--sigma must be a finite number > 0"):
        check_mapping({"window": 8, "top_k": 4, "sigma": float("nan")}, parser)  # an adapter's patch entry


def test_the_paper_preset_resolves_to_the_first_releases_choices():
    default = vars(config.parse_args(TRAIN_REQUIRED))
    paper = vars(config.parse_args([*TRAIN_REQUIRED, "--preset", "paper"]))
    changed = {k: (default[k], paper[k]) for k in default if default[k] != paper[k]}
    assert changed == {"preset": (None, "paper"), "freeze_sigma": (False, True), "label_eos": (True, False)}
    # the recipe itself is the same: lr 5e-5, 2 epochs, warmup 0.1, wd 0.01, r 16 / alpha 32 / dropout 0.1, W 32, k 16
    assert (paper["lr"], paper["epochs"], paper["warmup_ratio"], paper["weight_decay"]) == (5e-5, 2.0, 0.1, 0.01)
    assert (paper["lora_r"], paper["lora_alpha"], paper["lora_dropout"]) == (16, 32, 0.1)
    assert (paper["window"], paper["top_k"], paper["sigma"], paper["max_length"]) == (32, 16, 5.5, 2048)
    # a flag on the command line wins over the preset
    assert config.parse_args([*TRAIN_REQUIRED, "--preset", "paper", "--label_eos"]).label_eos is True
    with pytest.raises(UsageError, match="invalid choice"):
        config.parse_args([*TRAIN_REQUIRED, "--preset", "release"])
    json.dumps(paper)  # the resolved config is what config.json records



@pytest.mark.parametrize("saved, words", [({"mode": "krause", "lora_alpha": -8}, "--lora_alpha must be an integer >= 1"),
                                          ("{not json", "is not JSON")])
def test_a_resumed_runs_config_json_passes_the_same_ranges(tmp_path, capsys, saved, words):
    from lora_llms import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(saved if isinstance(saved, str) else json.dumps(saved))
    before = (run / "config.json").read_text()
    argv = ["--mode", "krause", "--model", str(tmp_path / "unused"), "--data_dir", "d", "--out_dir", str(run), "--resume"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"] and (run / "config.json").read_text() == before


def test_help_still_prints_and_exits_0(capsys):
    """OneLineParser turns only errors into UsageError: --help is argparse's own."""
    with pytest.raises(SystemExit) as done:
        config.parse_args(["--help"])
    assert done.value.code == 0 and "--preset {paper}" in capsys.readouterr().out
