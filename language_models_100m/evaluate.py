"""Zero-shot evaluation of trained language models with lm-evaluation-harness, and a comparison.

    python -m language_models_100m.evaluate --model runs/100m_gated runs/100m_standard \\
        --data_dir /data/fwe10bt --out_dir results/100m [--tasks hellaswag piqa ...] [--limit 100]

Every file read is verified first (a run's ``hf/`` export against its sizes and CRC-32s,
a DCP checkpoint as resume verifies it): a damaged one is refused in one line.

``--split test`` (or ``all``) scores the test shards' loss / perplexity as well (the first
release's end-of-training number; training reports it at its end too).

For every ``--model`` (a training run directory: its ``hf/`` export, or with
``--checkpoint best|last|STEP_DIR`` that DCP checkpoint; or a ``save_pretrained``
directory; any attention type): validation loss / perplexity on
the ``--data_dir`` val shards (``--val_tokens``), then the lm-eval tasks, zero-shot:
HellaSwag, PIQA, ARC-Easy, BLiMP (all 67 subsets), LAMBADA (OpenAI) — stock tasks — and
CBT (all four subsets; the task YAML ships in ``tasks/cbt``). lm-eval reports ``acc``
(summed log-likelihood of each choice: the un-normalised scoring the first release
used) and, where the task has it, ``acc_norm`` (log-likelihood per byte of the choice).

Writes ``<out_dir>/<name>/results.json`` per model and, across models,
``comparison.md``, ``comparison.csv`` and ``val_loss.png`` (validation-loss curves from
the runs' metrics.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from krause.evaluation import PreparedTasks, hub_offline, prepare_tasks, task_manager
from krause.dispatch import IMPLS
from krause.training.entry import OneLineParser, entry_point
from krause.training.ranges import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, check_namespace

from .cli import check_attn_impl, check_saved_config, resolve_device

TASK_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "blimp", "lambada_openai", "cbt")


def resolve_model(path, checkpoint: str | None, device, attn_impl: str | None = None):
    """(model, directory holding a tokenizer or None, run directory or None, tokenizer spec or None).

    A save_pretrained directory loads as it is. A run directory loads its ``hf/`` export,
    or with ``checkpoint`` ("best", "last" or a step directory) the weights of that DCP
    checkpoint into the model its config.json describes (runs stopped before the end too).
    ``attn_impl`` replaces the Krause backend the model was saved with; one that cannot run on
    ``device`` is refused before any weights are read.
    """
    import language_models_100m  # noqa: F401  (registers krause_lm with the Auto classes)

    path = Path(path).expanduser().resolve()
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if config is not None and "model_type" not in config:  # a run's config: its values in the flags' ranges
        check_saved_config(path)
    from krause.training.checkpointer import verify_sealed

    if config is not None and "model_type" in config:  # a save_pretrained directory
        if checkpoint is not None:
            raise ValueError(f"--checkpoint {checkpoint}: {path} is a save_pretrained directory, not a run")
        verify_sealed(path, required=False)  # an export of a run carries its sizes and CRC-32s
        return _load_pretrained(path, device, attn_impl), path, None, None
    manifest = Path((config or {}).get("data_dir") or "/nonexistent") / "manifest.json"
    tokenizer_spec = json.loads(manifest.read_text()).get("tokenizer") if manifest.is_file() else None
    if checkpoint is None and (path / "hf" / "config.json").is_file():
        verify_sealed(path / "hf", required=config is not None)  # a training run's export is always sealed
        return _load_pretrained(path / "hf", device, attn_impl), path / "hf", path, tokenizer_spec
    if config is None or "model" not in config or not (path / "checkpoints").is_dir():
        raise ValueError(f"--model {path}: neither a save_pretrained directory nor a run directory "
                         "(with hf/ or checkpoints/)")
    run_config = config
    from krause.training.checkpointer import find_checkpoint, load_model_weights

    from .model import KrauseLMConfig
    from .presets import build_model

    fields = {k: v for k, v in run_config["model"].items() if k in KrauseLMConfig.__dataclass_fields__}
    if attn_impl is not None:
        fields["krause_impl"] = attn_impl
    model = build_model(run_config["preset"], fields.pop("attention"), **fields)
    check_attn_impl(model.config.krause_impl, model.config, torch.device(device))
    load_model_weights(model, find_checkpoint(path, checkpoint or "last"))
    return model.to(device).eval(), None, path, tokenizer_spec


def _load_pretrained(path: Path, device, attn_impl: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = {} if attn_impl is None else {"krause_impl": attn_impl}
    config = AutoConfig.from_pretrained(path, **overrides)
    check_attn_impl(config.krause_impl, config, torch.device(device))
    return AutoModelForCausalLM.from_pretrained(path, config=config).to(device).eval()


def load_hf_tokenizer(model_dir: Path | None, *fallbacks: str | None):
    """The tokenizer saved next to the model, else the first fallback given (a tokenizer.json
    file, a directory or a hub name: --tokenizer, then the run's build)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model_dir is not None and ((model_dir / "tokenizer.json").is_file()
                                  or (model_dir / "tokenizer_config.json").is_file()):
        return AutoTokenizer.from_pretrained(model_dir)
    spec = next((f for f in fallbacks if f), None)
    if spec is None:
        raise ValueError(f"--tokenizer is needed: {model_dir} holds no tokenizer")
    if Path(spec).is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(spec), eos_token="<|endoftext|>")
    return AutoTokenizer.from_pretrained(spec)


@torch.no_grad()
def validation_loss(model, data_dir, block_size: int, max_tokens: int, batch_size: int, device,
                    split: str = "val") -> dict:
    """Mean next-token loss over non-overlapping block_size windows of a split (val or test):
    {split}_loss, {split}_ppl, {split}_tokens."""
    from .shards import TokenStream, split_shards

    stream = TokenStream(split_shards(data_dir, split))
    usable = min(len(stream) - 1, max_tokens)
    n_windows = usable // block_size
    if n_windows < 1:
        raise ValueError(f"--data_dir: the {split} split has {len(stream)} tokens, fewer than one block of {block_size}")
    total, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        rows = [stream.read(w * block_size, block_size + 1) for w in range(first, min(n_windows, first + batch_size))]
        batch = torch.as_tensor(np.stack(rows), device=device)
        logits = model(batch[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    loss = total / count
    return {f"{split}_loss": loss, f"{split}_ppl": math.exp(loss), f"{split}_tokens": count}


def run_lm_eval(model, tokenizer, prepared: PreparedTasks, manager, batch_size: int, limit, device,
                bootstrap_iters: int) -> dict:
    """lm-eval zero-shot on the runnable tasks; {task: {"acc": .., "acc_norm": .., ...}} for tasks and groups."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
              max_length=model.config.n_positions)
    with hub_offline() if prepared.offline else contextlib.nullcontext():
        out = simple_evaluate(model=lm, tasks=list(prepared.runnable), num_fewshot=0, task_manager=manager,
                              limit=limit, log_samples=False, bootstrap_iters=bootstrap_iters)
    scores = {}
    for name, metrics in {**out.get("results", {}), **out.get("groups", {})}.items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt in ("none", "") and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                row[metric] = float(value)
        scores[name] = row
    return scores



def comparison_rows(results: list[dict], tasks) -> tuple[list[str], list[list]]:
    scores = ["val_loss", "val_ppl"] + (["test_loss", "test_ppl"] if any("test_loss" in r for r in results) else [])
    header = ["model", "attention", *scores]
    for task in tasks:
        header += [f"{task} acc", f"{task} acc_norm"]
    rows = []
    for r in results:
        row = [r["name"], r["attention"], *(r.get(k) for k in scores)]
        for task in tasks:
            scores = r["tasks"].get(task, {})
            row += [scores.get("acc"), scores.get("acc_norm")]
        rows.append(row)
    return header, rows


def write_comparison(results: list[dict], tasks, out_dir: Path) -> tuple[Path, Path]:
    header, rows = comparison_rows(results, tasks)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    keep = [i for i in range(len(header)) if any(row[i] is not None for row in rows)]  # drop empty acc_norm columns
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(fmt(row[i]) for i in keep) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n\nacc: summed log-likelihood per choice (the first release's "
                       "scoring); acc_norm: per byte of the choice.\n")
    return md_path, csv_path


def plot_val_curves(results: list[dict], path: Path) -> Path | None:
    from krause.training.plotting import plot_comparison

    runs = {r["name"]: r["run_dir"] for r in results if r.get("run_dir")}
    if not runs:
        return None
    return plot_comparison(runs, ["val_loss"], path, x="step", title="validation loss")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m language_models_100m.evaluate", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="run directories or save_pretrained directories")
    p.add_argument("--checkpoint", default=None,
                   help="for run directories: best, last or a step directory (default: the run's hf/ export)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--tasks", nargs="*", default=None,
                   help=f"lm-eval task / group names ('' for none; default: {' '.join(DEFAULT_TASKS)}, skipping those "
                        "whose data is not cached when offline; named tasks must all be available)")
    p.add_argument("--include_path", nargs="*", default=[], help="extra lm-eval task directories")
    p.add_argument("--data_dir", default=None, help="build directory with *_val_*.bin shards (for val loss)")
    p.add_argument("--val_tokens", type=POSITIVE_INT, default=10_000_000, help="at most this many tokens per scored split")
    p.add_argument("--split", default="val", choices=["val", "test", "all"],
                   help="split(s) of --data_dir whose loss / perplexity is scored (all: val and test)")
    p.add_argument("--tokenizer", default=None, help="when a model directory has no tokenizer")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=16)
    p.add_argument("--limit", type=POSITIVE_FLOAT, default=None, help="lm-eval: at most N documents per task (testing)")
    p.add_argument("--bootstrap_iters", type=NONNEGATIVE_INT, default=1000, help="lm-eval stderr bootstrap (0: none)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--attn_impl", default=None, choices=IMPLS,
                   help="backend of the Krause op (krause.dispatch; default: the one the model was saved with)")
    return p


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    tasks_named = args.tasks is not None
    args.tasks = [t for t in (args.tasks if tasks_named else DEFAULT_TASKS) if t]
    device = resolve_device(args.device)
    out_dir = Path(args.out_dir).expanduser().resolve()
    include_paths = [TASK_DIR, *args.include_path]
    manager = task_manager(include_paths) if args.tasks else None
    prepared = (prepare_tasks(args.tasks, manager, strict=tasks_named, include_paths=include_paths)
                if args.tasks else PreparedTasks())
    results = []
    for path in args.model:
        model, model_dir, run_dir, tokenizer_spec = resolve_model(path, args.checkpoint, device, args.attn_impl)
        if args.attn_impl is not None:
            model.config.krause_impl = args.attn_impl  # the blocks read it from the config at each call
        check_attn_impl(model.config.krause_impl, model.config, device)
        name = (run_dir or model_dir).name
        record = {"name": name, "model_dir": str(model_dir) if model_dir else None,
                  "run_dir": str(run_dir) if run_dir else None, "checkpoint": args.checkpoint or "export",
                  "attention": model.config.attention, "parameters": sum(p.numel() for p in model.parameters())}
        for split in (("val", "test") if args.split == "all" else (args.split,)) if args.data_dir else ():
            record.update(validation_loss(model, args.data_dir, model.config.n_positions, args.val_tokens,
                                          args.batch_size, device, split))
        record["tasks"], record["skipped_tasks"] = {}, prepared.skipped
        if prepared.runnable:
            tokenizer = load_hf_tokenizer(model_dir, args.tokenizer, tokenizer_spec)
            limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
            record["tasks"] = run_lm_eval(model, tokenizer, prepared, manager, args.batch_size,
                                          limit, device, args.bootstrap_iters)
        (out_dir / name).mkdir(parents=True, exist_ok=True)  # only now: a refused model leaves nothing
        (out_dir / name / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        results.append(record)
        print(f"{name} ({record['attention']}): " + json.dumps({k: v for k, v in record.items() if k != "tasks"}
                                                                | {"tasks": record["tasks"]}), flush=True)
    md, csv_path = write_comparison(results, prepared.runnable, out_dir)
    plot = plot_val_curves(results, out_dir / "val_loss.png")
    print(md.read_text())
    if prepared.skipped:
        print(f"skipped (data not available offline): {', '.join(prepared.skipped)}")
    print(f"wrote {md}, {csv_path}" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
