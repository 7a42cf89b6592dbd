"""Zero-shot evaluation with lm-evaluation-harness of a base model, a LoRA baseline or a Krause model.

    python -m lora_llms.evaluate --model /models/Meta-Llama-3-8B --label base --out_dir results/
    python -m lora_llms.evaluate --model /models/Meta-Llama-3-8B --adapter runs/lora/adapter --label lora ...
    python -m lora_llms.evaluate --model /models/Meta-Llama-3-8B --adapter runs/krause/adapter --label krause ...

Each model is loaded as what it is: an adapter saved by ``lora_llms.train`` is rebuilt with
``krause.hf.load`` (a Krause adapter patches the base first; a Krause adapter can never be
scored by the plain model), merged, and handed to lm-eval as ``HFLM(pretrained=<model>)``.
Default tasks: the paper's BoolQ, CB, ANLI R1-R3, PIQA, MNLI, MMLU-Pro (``mmlu_pro_paper``:
the paper's zero-shot answer-letter scoring, see lora_llms/tasks/README.md) and IFEval.
``--include_path`` adds task folders (e.g. local copies of the datasets). Writes
``<out_dir>/<label>.json``; ``python -m lora_llms.report`` builds the comparison table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from krause.dispatch import IMPLS
from krause.evaluation import download_command, hub_offline, prepare_tasks
from krause.evaluation import task_manager as shared_task_manager
from krause.training.entry import entry_point
from krause.training.paths import plain_name
from krause.training.run_dir import atomic_write_text
from krause.training.ranges import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, check_namespace
from lora_llms import cli

log = logging.getLogger("lora_llms.evaluate")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PAPER_TASKS = ("boolq", "cb", "anli_r1", "anli_r2", "anli_r3", "piqa", "mnli", "mmlu_pro_paper", "ifeval")


def parse_args(argv=None):
    p = cli.parser("lora_llms.evaluate", "lm-eval zero-shot evaluation of base / LoRA / Krause models")
    p.add_argument("--model", required=True, help="base model path or hub id")
    p.add_argument("--adapter", default=None, help="adapter dir saved by lora_llms.train (none: the base model)")
    p.add_argument("--label", default=None, help="name of this model in the results (default: its kind)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated lm-eval task names (default: {','.join(PAPER_TASKS)}, skipping those whose "
                        "data is not cached when offline; named tasks must all be available)")
    p.add_argument("--include_path", action="append", default=[], help="extra lm-eval task folder (repeatable)")
    p.add_argument("--no_default_tasks", action="store_true",
                   help="index only lora_llms/tasks and --include_path (skips lm-eval's thousands of task files)")
    p.add_argument("--num_fewshot", type=NONNEGATIVE_INT, default=None,
                   help="default: each task's own (0 for the paper's)")
    p.add_argument("--batch_size", type=cli.batch_size, default="1", help="an integer >= 1, auto or auto:N")
    p.add_argument("--max_length", type=POSITIVE_INT, default=None)
    p.add_argument("--limit", type=POSITIVE_FLOAT, default=None,
                   help="examples per task (for smoke runs; below 1: a fraction of each task)")
    p.add_argument("--dtype", choices=cli.DTYPES, default="bfloat16")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--impl", choices=IMPLS, default=None,
                   help="run the Krause op with this implementation (default: the one the adapter was saved with)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--log_samples", action="store_true")
    return check_namespace(p.parse_args(argv), p)


def check_model_inputs(model: str, adapter: str | None, device: str | None, impl: str | None, dtype: str) -> str:
    """The model folder, its tokenizer, the adapter (present and intact) and the device, checked
    before any model loads (evaluate and sinks); returns the resolved device."""
    from krause.hf.lora import read_krause_config, verify_adapter

    cli.check_model_dir(model)
    device = cli.resolve_device(device)
    patch = None
    if adapter is not None:
        verify_adapter(adapter)
        patch = read_krause_config(adapter).get("patch")
        if patch:  # the saved settings obey the ranges training declares for them
            from krause.training.ranges import check_mapping
            from lora_llms.config import build_parser

            check_mapping(patch, build_parser())
    if not (adapter is not None and cli.has_tokenizer(adapter)):
        cli.check_tokenizer(model)
    if impl is not None or patch:
        cli.check_impl(impl or patch.get("impl", "auto"), device, dtype, window=(patch or {}).get("window"))
    return device


def load_for_eval(model_path, adapter=None, dtype="bfloat16", attn_implementation="sdpa", device=None, impl=None,
                  verify=True):
    """(model, tokenizer, kind) with kind "base", "lora" or "krause"; adapters merged (and verified:
    sizes and checksums, before anything of them is read; ``verify=False`` where
    ``check_model_inputs`` already did). ``impl``: the Krause op's implementation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import krause.hf
    from krause.hf.lora import read_krause_config, verify_adapter

    kind = "base"
    if adapter is not None:
        if verify:
            verify_adapter(adapter)
        kind = "krause" if read_krause_config(adapter).get("patch") else "lora"
    tokenizer = AutoTokenizer.from_pretrained(adapter if adapter and cli.has_tokenizer(adapter) else model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    if adapter is not None:
        model = krause.hf.merge_and_unload(krause.hf.load(model, adapter, verify=False, impl=impl))
    if (kind == "krause") != krause.hf.is_patched(model):
        state = "plain" if kind == "krause" else "Krause-patched"
        raise RuntimeError(f"adapter: loading the {kind} model produced a {state} model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, kind


def task_manager(include_paths=(), include_defaults: bool = True):
    """``krause.evaluation.task_manager`` over lora_llms/tasks and ``include_paths``."""
    return shared_task_manager([TASKS_DIR, *include_paths], include_defaults=include_defaults)


def check_tasks(manager, tasks: list[str]) -> None:
    """Unknown names and missing offline resources as one clear error before any model runs."""
    if not tasks:
        raise ValueError("tasks: give at least one task name")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task(s) {unknown} (not in lm-eval or {TASKS_DIR})")
    if any(t.startswith("ifeval") for t in tasks):
        import nltk

        try:
            nltk.data.find("tokenizers/punkt_tab")
        except LookupError:
            raise ValueError(
                "tasks: ifeval needs NLTK's punkt_tab data; download it once with "
                "python -c \"import nltk; nltk.download('punkt_tab')\""
            ) from None


def evaluate(model, tokenizer, tasks, *, manager, batch_size="1", max_length=None, limit=None,
             num_fewshot=None, log_samples=False, offline=False):
    """lm-eval ``simple_evaluate`` on an in-memory model; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    bs = int(batch_size) if str(batch_size).isdigit() else batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, max_length=max_length)
    limit = int(limit) if limit is not None and float(limit).is_integer() and limit >= 1 else limit
    with hub_offline() if offline else contextlib.nullcontext():
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                               limit=limit, log_samples=log_samples, bootstrap_iters=0)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.label is not None:
        plain_name(args.label, "--label")  # <out_dir>/<label>.json: a name, never a path out of out_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tasks_named = args.tasks is not None
    tasks = [t.strip() for t in (args.tasks if tasks_named else ",".join(PAPER_TASKS)).split(",") if t.strip()]
    manager = task_manager(args.include_path, include_defaults=not args.no_default_tasks)
    check_tasks(manager, tasks)  # before the model is loaded
    prepared = prepare_tasks(tasks, manager, strict=tasks_named, include_paths=[TASKS_DIR, *args.include_path])
    if not prepared.runnable:
        raise ValueError(f"tasks: none of {', '.join(tasks)} has its data here; pre-download with "
                         f"`{download_command(tasks, [TASKS_DIR, *args.include_path])}`")
    tasks = prepared.runnable
    device = check_model_inputs(args.model, args.adapter, args.device, args.impl, args.dtype)
    model, tokenizer, kind = load_for_eval(args.model, args.adapter, args.dtype, args.attn_implementation,
                                           device, args.impl, verify=False)  # check_model_inputs verified it
    label = args.label or kind
    results = evaluate(model, tokenizer, tasks, manager=manager, batch_size=args.batch_size,
                       max_length=args.max_length, limit=args.limit, num_fewshot=args.num_fewshot,
                       log_samples=args.log_samples, offline=prepared.offline)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "label": label, "kind": kind, "model": args.model, "adapter": args.adapter, "tasks": tasks,
        "skipped_tasks": prepared.skipped,
        "results": results["results"], "n-shot": results.get("n-shot"), "versions": results.get("versions"),
        "n-samples": results.get("n-samples"), "lm_eval_config": results.get("config"),
    }
    if args.log_samples:
        record["samples"] = results.get("samples")
    path = out_dir / f"{label}.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    from lora_llms.report import write_tables

    write_tables([path], out_dir / f"{label}_table")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
