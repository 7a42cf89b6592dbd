"""The LM family's error contract: every foreseeable bad input (data, config, device, backend, optimiser
arguments, the attentions' settings, the numeric ranges) ends as ONE line `error: ...` on stderr with
exit 2, before anything is written, so the corrected retry is never refused.

Every case runs in-process (fast) and, marked slow, as its own subprocess of the real command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from language_models_100m import build_fwe10bt, evaluate, fake_data, params, train
from language_models_100m.fake_data import make_documents, train_tokenizer, write_fineweb_parquet

REPO = Path(__file__).resolve().parents[1]
MODULES = {"train": train, "evaluate": evaluate, "build_fwe10bt": build_fwe10bt, "fake_data": fake_data,
           "params": params}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(parquet dir, tokenizer, shards dir, a saved tiny gated model)."""
    root = tmp_path_factory.mktemp("lm_errors")
    docs = make_documents(600, seed=5)
    write_fineweb_parquet(root / "in" / "a.parquet", docs)
    tok = train_tokenizer(docs, root / "tok.json", vocab_size=256)
    assert build_fwe10bt.main(["--input", str(root / "in"), "--out_dir", str(root / "shards"), "--tokenizer", str(tok),
                               "--max_tokens", "0", "--workers", "1", "--no_progress"]) == 0
    from language_models_100m import build_model

    build_model("tiny", "gated", vocab_size=257, bos_token_id=0, eos_token_id=0).save_pretrained(root / "model")
    return root / "in", tok, root / "shards", root / "model"


# ------------------------------------------------------------------ ways to spoil a copy of the build
def _train_shard(d: Path) -> Path:
    return next(d.glob("*_train_*.bin"))


def _set_header(index: int, value: int):
    def spoil(d: Path):
        p = _train_shard(d)
        data = bytearray(p.read_bytes())
        data[4 * index:4 * index + 4] = np.int32(value).tobytes()
        p.write_bytes(bytes(data))
    return spoil


def _truncate(d: Path):
    p = _train_shard(d)
    p.write_bytes(p.read_bytes()[:-6])


def _header_only_part(d: Path):
    p = _train_shard(d)
    p.write_bytes(p.read_bytes()[:100])


def _token_beyond_vocab(d: Path):
    p = _train_shard(d)
    data = bytearray(p.read_bytes())
    data[1024 + 2 * 50:1024 + 2 * 51] = np.uint16(60_000).tobytes()  # the build's vocabulary is 257
    p.write_bytes(bytes(data))


def _remove(pattern: str):
    def spoil(d: Path):
        for p in d.glob(pattern):
            p.unlink()
    return spoil


def _manifest(text: str):
    def spoil(d: Path):
        (d / "manifest.json").write_text(text)
    return spoil


def _run_with_config(**values):
    """A run directory whose config.json was edited by hand to hold `values`."""
    def spoil(run: Path):
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"lr": 3e-3, **values}))
    return spoil


def _run_with_text(text: str):
    def spoil(run: Path):
        run.mkdir(parents=True)
        (run / "config.json").write_text(text)
    return spoil


# ------------------------------------------------------------------ the cases
TRAIN = ["--config", "tiny", "--global_batch", "4", "--micro_batch", "2", "--block_size", "32", "--max_steps", "2",
         "--val_tokens", "64", "--no_progress"]

# (id, tool, extra argv, spoil the build copy / the run dir, the message's telling part)
CASES = [
    ("shard_magic", "train", [], _set_header(0, 1234), "bad shard header (magic 1234"),
    ("shard_version", "train", [], _set_header(1, 9), "version 9"),
    ("shard_token_count", "train", [], _set_header(2, 5), "but the file has"),
    ("shard_truncated", "train", [], _truncate, "truncated or corrupt"),
    ("shard_shorter_than_header", "train", [], _header_only_part, "shorter than the 1024-byte shard header"),
    ("no_train_shards", "train", [], _remove("*_train_*.bin"), "has no train shards"),
    ("no_val_shards", "train", [], _remove("*_val_*.bin"), "has no val shards"),
    ("no_manifest", "train", [], _remove("manifest.json"), "no manifest.json"),
    ("manifest_not_json", "train", [], _manifest("{not json"), "manifest.json is not JSON"),
    ("manifest_without_vocab", "train", [], _manifest("{}"), "vocab_size must be an integer >= 1"),
    ("token_beyond_vocab", "train", [], _token_beyond_vocab, "token id 60000 at position 50 is outside the vocabulary"),
    ("missing_data_dir", "train", ["--data_dir", "/nonexistent/lm"], None, "no manifest.json"),
    ("beta1_above_1", "train", ["--beta1", "1.5"], None, "argument --beta1: must be a finite number in [0, 1)"),
    ("beta2_is_1", "train", ["--beta2", "1"], None, "argument --beta2: must be a finite number in [0, 1)"),
    ("beta2_negative", "train", ["--beta2", "-0.1"], None, "argument --beta2"),
    ("device_cuda_without_cuda", "train", ["--device", "cuda"], "no_cuda", "--device cuda: CUDA is not available"),
    ("triton_on_cpu", "train", ["--attn_impl", "triton", "--device", "cpu"], "no_cuda", "--attn_impl triton"),
    ("routing_more_clusters_than_tokens", "train", ["--attention", "routing", "--attn_num_clusters", "33"], None,
     "--attn_num_clusters 33 is more than the 32 tokens of a block"),
    ("longformer_more_global_than_block", "train", ["--attention", "longformer", "--attn_global_tokens", "40"], None,
     "--attn_global_tokens 40 is more than the 32 tokens of a block"),
    ("clusters_for_another_attention", "train", ["--attn_num_clusters", "4"], None,
     "--attn_num_clusters is read by --attention routing only"),
    ("grad_clip_nan", "train", ["--grad_clip", "nan"], None, "argument --grad_clip: must be a finite number >= 0"),
    ("max_tokens_negative", "train", ["--max_tokens", "-100"], None, "argument --max_tokens"),
    ("weight_decay_nan", "train", ["--weight_decay", "nan"], None, "argument --weight_decay"),
    ("weight_decay_negative", "train", ["--weight_decay", "-1"], None, "argument --weight_decay"),
    ("lr_zero", "train", ["--lr", "0"], None, "argument --lr: must be a finite number > 0"),
    ("dropout_one", "train", ["--dropout", "1"], None, "argument --dropout"),
    ("seed_not_integer", "train", ["--seed", "1.5"], None, "argument --seed: must be an integer"),
    ("seed_negative", "train", ["--seed", "-1"], None, "argument --seed"),
    ("block_beyond_positions", "train", ["--block_size", "65"], None, "larger than the model's 64 positions"),
    ("global_batch_not_divisible", "train", ["--global_batch", "5"], None, "not divisible by --micro_batch"),
    ("vocab_below_build", "train", ["--vocab_size", "10"], None, "smaller than the build's vocabulary 257"),
    ("resume_and_overwrite", "train", ["--resume", "--overwrite"], None, "--resume and --overwrite exclude each other"),
    ("resume_step_alone", "train", ["--resume_step", "2"], None, "--resume_step needs --resume"),
    ("unknown_flag", "train", ["--learning_rate", "1"], None, "unrecognized arguments: --learning_rate"),
    ("unknown_attention", "train", ["--attention", "flash"], None, "argument --attention: invalid choice"),
    ("saved_config_out_of_range", "train", ["--resume"], _run_with_config(grad_clip=-1.0),
     "config.json: --grad_clip must be a finite number >= 0"),
    ("saved_config_not_json", "train", ["--resume"], _run_with_text("{"), "config.json is not JSON"),
    ("evaluate_batch_size_zero", "evaluate", ["--batch_size", "0"], None, "argument --batch_size"),
    ("evaluate_val_tokens_zero", "evaluate", ["--val_tokens", "0"], None, "argument --val_tokens"),
    ("evaluate_device_cuda_without_cuda", "evaluate", ["--device", "cuda"], "no_cuda", "--device cuda"),
    ("evaluate_triton_on_cpu", "evaluate", ["--attn_impl", "triton", "--device", "cpu"], "no_cuda",
     "--attn_impl triton"),
    ("evaluate_missing_model", "evaluate", ["--model", "/nonexistent/model"], None,
     "neither a save_pretrained directory nor a run directory"),
    ("build_prefix_escapes", "build_fwe10bt", ["--prefix", "../escaped"], None, "--prefix must be a plain file-name"),
    ("build_max_tokens_nan", "build_fwe10bt", ["--max_tokens", "nan"], None, "argument --max_tokens"),
    ("build_workers_zero", "build_fwe10bt", ["--workers", "0"], None, "argument --workers: must be an integer >= 1"),
    ("build_missing_input", "build_fwe10bt", ["--input", "/nonexistent/parquet"], None, "no such file or directory"),
    ("fake_data_too_few_docs", "fake_data", ["--docs", "3"], None, "argument --docs: must be an integer >= 10"),
    ("params_vocab_zero", "params", ["--vocab_size", "0"], None, "argument --vocab_size"),
]


def _argv(case, built, tmp_path):
    """(tool, argv, the directory that must not appear, the run directory)."""
    name, tool, extra, spoil, _ = case
    inputs, tok, shards, model = built
    data = shards
    out = tmp_path / "out"
    if callable(spoil) and tool == "train" and "--resume" in extra:
        spoil(out)  # a run directory as the user left it
    elif callable(spoil):
        data = tmp_path / "data"
        shutil.copytree(shards, data)
        spoil(data)
    if tool == "train":
        argv = TRAIN + ["--data_dir", str(data), "--out_dir", str(out)]
    elif tool == "evaluate":
        argv = ["--model", str(model), "--out_dir", str(out), "--tasks", "", "--data_dir", str(data)]
    elif tool == "build_fwe10bt":
        argv = ["--input", str(inputs), "--out_dir", str(out), "--tokenizer", str(tok), "--workers", "1",
                "--no_progress", "--max_tokens", "0"]
    elif tool == "fake_data":
        argv = [str(out)]
    else:
        argv = []
    argv += extra  # argparse keeps the last of a repeated flag: the case's value wins
    return tool, argv, out


def _before(out: Path):
    return sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file()) \
        if out.exists() else None


def _check(case, code, err, out, before):
    name, tool, _, _, message = case
    lines = err.strip().splitlines()
    assert code == 2, (name, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
    assert message in lines[0], (name, lines[0])
    assert _before(out) == before, f"{name}: the failed start wrote into {out}"


def _marks(case):
    return [NO_CUDA] if case[3] == "no_cuda" else []


PARAMS = [pytest.param(c, id=c[0], marks=_marks(c)) for c in CASES]


def test_at_least_25_lm_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    """conftest lets the Triton kernels run on CPU through the interpreter; a user's machine does not."""
    import krause.dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    krause.dispatch.clear_cache()
    yield
    krause.dispatch.clear_cache()


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, built, tmp_path, capsys, no_triton_interpreter):
    tool, argv, out = _argv(case, built, tmp_path)
    before = _before(out)
    capsys.readouterr()
    code = MODULES[tool].main(argv)
    _check(case, code, capsys.readouterr().err, out, before)


# The in-process test above runs every case. A fresh interpreter adds what only a new process
# shows (import-time output on stderr, the exit status of `python -m`), the same for every case
# that fails at the same stage of a tool, so one case per (tool, stage) runs as a subprocess:
# flag types, flags against each other, the data, the device/backend, a saved run, the model.
SUBPROCESS_CASES = (
    "beta1_above_1", "unknown_flag", "routing_more_clusters_than_tokens", "block_beyond_positions",
    "resume_and_overwrite", "no_manifest", "token_beyond_vocab", "shard_truncated", "triton_on_cpu",
    "saved_config_not_json", "evaluate_batch_size_zero", "evaluate_triton_on_cpu", "evaluate_missing_model",
    "build_prefix_escapes", "build_missing_input", "fake_data_too_few_docs", "params_vocab_zero",
)


def test_subprocess_cases_cover_every_tool():
    names = {c[0]: c[1] for c in CASES}
    assert set(SUBPROCESS_CASES) <= set(names)
    assert {names[n] for n in SUBPROCESS_CASES} == set(names.values())


@pytest.mark.slow  # one interpreter per case (~7 s each on a 2-core VM)
@pytest.mark.parametrize("case", [p for p in PARAMS if p.id in SUBPROCESS_CASES])
def test_bad_input_as_a_subprocess(case, built, tmp_path, no_triton_interpreter):
    tool, argv, out = _argv(case, built, tmp_path)
    before = _before(out)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"language_models_100m.{tool}", *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    _check(case, proc.returncode, proc.stderr, out, before)


def test_the_corrected_retry_runs_after_each_kind_of_failure(built, tmp_path, capsys):
    """A refused start (a flag, the data, the backend) leaves nothing behind: the corrected command trains."""
    _, _, shards, _ = built
    out = tmp_path / "run"
    argv = TRAIN + ["--data_dir", str(shards), "--out_dir", str(out), "--max_steps", "1", "--eval_every", "1"]
    bad_data = tmp_path / "bad"
    shutil.copytree(shards, bad_data)
    _token_beyond_vocab(bad_data)
    for wrong in (["--weight_decay", "nan"], ["--data_dir", str(bad_data)], ["--attention", "routing",
                                                                               "--attn_num_clusters", "64"]):
        assert train.main(argv + wrong) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()
    assert train.main(argv) == 0
    assert (out / "hf" / "config.json").is_file()


# ------------------------------------------------------------------ every declared range, at and beyond its bounds
def _parsers():
    from language_models_100m import cli

    return {"train": (cli.build_parser(), ["--data_dir", "d", "--out_dir", "o"]),
            "evaluate": (evaluate.build_parser(), ["--model", "m", "--out_dir", "o"]),
            "build_fwe10bt": (build_fwe10bt.build_parser(), ["--input", "i", "--out_dir", "o"]),
            "fake_data": (fake_data.build_parser(), ["o"])}


def _bound_values(rng):
    """[(text, accepted)] at and just beyond each bound of a Range."""
    step = (lambda x, d: str(int(x) + d)) if rng.kind is int else \
        (lambda x, d: repr(float(np.nextafter(float(x), np.inf if d > 0 else -np.inf))))
    out = []
    if rng.ge is not None:
        out += [(str(rng.ge if rng.kind is float else int(rng.ge)), True), (step(rng.ge, -1), False)]
    if rng.gt is not None:
        out += [(str(rng.gt if rng.kind is float else int(rng.gt)), False), (step(rng.gt, +1), True)]
    if rng.le is not None:
        out += [(str(rng.le if rng.kind is float else int(rng.le)), True), (step(rng.le, +1), False)]
    if rng.lt is not None:
        out += [(str(rng.lt if rng.kind is float else int(rng.lt)), False), (step(rng.lt, -1), True)]
    if rng.kind is float:
        out += [("nan", False), ("inf", False), ("-inf", False)]
    else:
        out += [("1.5", False), ("x", False)]
    return out


@pytest.mark.parametrize("tool", ["train", "evaluate", "build_fwe10bt", "fake_data"])
def test_every_numeric_flag_is_range_checked_at_and_beyond_its_bounds(tool):
    from krause.training.ranges import ranges_of
    from krause.training.errors import UsageError

    parser, required = _parsers()[tool]
    ranges = ranges_of(parser)
    numeric = [a.dest for a in parser._actions if a.type in (int, float)]
    assert not numeric, f"{tool}: numeric flags without a declared range: {numeric}"
    assert ranges
    for dest, (flag, rng) in ranges.items():
        for text, accepted in _bound_values(rng):
            if accepted:
                parsed = parser.parse_args(required + [f"{flag}={text}"])
                assert getattr(parsed, dest) == rng.kind(float(text)), (flag, text)
            else:
                with pytest.raises(UsageError, match=f"argument {flag}: must be"):
                    parser.parse_args(required + [f"{flag}={text}"])


def test_paper_preset_resolves_to_the_first_release_choices_and_flags_still_win():
    from language_models_100m import cli

    base = ["--data_dir", "d", "--out_dir", "o"]
    default = cli.parse_args(base)
    paper = cli.parse_args(base + ["--preset", "paper"])
    assert (default.global_batch, default.decay_all) == (512, False)
    assert (paper.recipe_preset, paper.global_batch, paper.micro_batch, paper.decay_all) == ("paper", 488, 61, True)
    assert paper.global_batch * 1024 == 499_712  # the release's tokens per step at the 100m block
    for world in (1, 2, 4, 8):  # its micro-batch divides the global batch on the usual process counts
        assert paper.global_batch % (paper.micro_batch * world) == 0
    preset_keys = ("recipe_preset", "global_batch", "micro_batch", "decay_all")
    same = {k: v for k, v in vars(paper).items() if k not in preset_keys}
    assert same == {k: v for k, v in vars(default).items() if k in same}  # nothing else differs
    assert cli.parse_args(base + ["--preset", "paper", "--global_batch", "122"]).global_batch == 122


def test_evaluate_checks_a_run_config_against_the_training_ranges(tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_config(weight_decay=float("nan"))(run)  # json writes NaN; a hand-edited or foreign config
    (run / "checkpoints").mkdir()
    assert evaluate.main(["--model", str(run), "--out_dir", str(tmp_path / "out"), "--tasks", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: --weight_decay must be a finite number >= 0, got nan" in err
    assert not (tmp_path / "out").exists()


def test_the_paper_preset_reaches_the_optimizer_and_the_run_config(built, tmp_path, monkeypatch):
    import krause.training.recipe as recipe

    seen = []
    real = recipe.build_adamw
    monkeypatch.setattr(recipe, "build_adamw", lambda model, **kw: seen.append(kw["decay_all"]) or real(model, **kw))
    _, _, shards, _ = built
    common = TRAIN + ["--data_dir", str(shards), "--max_steps", "1", "--eval_every", "1"]
    # the preset's global batch with a micro-batch that fits the tiny test
    assert train.main(common + ["--out_dir", str(tmp_path / "paper"), "--preset", "paper", "--global_batch", "4",
                                "--micro_batch", "2"]) == 0
    assert train.main(common + ["--out_dir", str(tmp_path / "default")]) == 0
    assert seen == [True, False]
    paper = json.loads((tmp_path / "paper" / "config.json").read_text())
    default = json.loads((tmp_path / "default" / "config.json").read_text())
    assert paper["decay_all"] is True and paper["recipe_preset"] == "paper"
    assert "decay_all" not in default and default["recipe_preset"] == "default"  # older runs still resume
