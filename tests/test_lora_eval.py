"""lm-evaluation-harness end to end on a patched model: a loglikelihood task (BoolQ's stock
YAML on local rows), the paper's MMLU-Pro task and a generate_until task (GSM8K's stock YAML),
all through HFLM(pretrained=<model object>); the CLI rebuilds Krause adapters as Krause models.

Not covered offline: IFEval's scoring needs NLTK's punkt_tab, which cannot be downloaded
here; the test checks that evaluate refuses ifeval with the download command instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import krause.hf  # noqa: E402
from krause.hf.patch import patched_attention_modules  # noqa: E402
from lora_llms import evaluate as ev  # noqa: E402
from lora_llms.report import write_tables  # noqa: E402
from lora_llms.testing import write_local_tasks, write_tiny_model  # noqa: E402

STOCK = Path(lm_eval.__file__).resolve().parent / "tasks"  # lm-eval's own task files
LOCAL_TASKS = ["boolq_local", "mmlu_pro_paper_local", "gsm8k_local"]  # lora_llms.testing.write_local_tasks


@pytest.fixture(scope="module")
def env(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("eval")
    model_dir = write_tiny_model(root / "llama", "llama")
    tasks = write_local_tasks(root / "tasks")
    # their data is built here, once (datasets shows a progress bar the first time in a fresh
    # cache), so no test's captured output depends on which test ran first
    ev.prepare_tasks(LOCAL_TASKS, ev.task_manager([tasks], include_defaults=False), strict=True)
    return root, model_dir, tasks


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    yield mp
    mp.undo()


def test_lm_eval_runs_the_patched_model(env):
    root, model_dir, tasks = env
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    krause.hf.patch_model(model, window=4, top_k=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calls = []
    for attn in patched_attention_modules(model):
        attn.krause_sigma.register_forward_hook(lambda m, a, o: calls.append(1))
    manager = ev.task_manager([tasks], include_defaults=False)
    ev.check_tasks(manager, LOCAL_TASKS)
    results = ev.evaluate(model, tokenizer, LOCAL_TASKS, manager=manager)["results"]
    assert 0.0 <= results["boolq_local"]["acc,none"] <= 1.0
    assert 0.0 <= results["mmlu_pro_paper_local"]["acc,none"] <= 1.0
    assert "exact_match,strict-match" in results["gsm8k_local"]
    # loglikelihood batches and every generated token went through the Krause branch of both layers
    assert len(calls) >= 2 * (1 + 5)


def test_paper_mmlu_pro_prompt_and_choices():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mp_utils", ev.TASKS_DIR / "mmlu_pro_paper" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"question": "Q?", "options": ["a", "b", "c", "d"], "category": "law"}
    assert utils.doc_to_text(doc).endswith("D. d\n\n### Response:\n")
    assert utils.doc_to_choice(doc) == ["A", "B", "C", "D"]


def test_cli_scores_a_krause_adapter_as_a_krause_model(env, capsys):
    root, model_dir, tasks = env
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    krause.hf.save(krause.hf.lora_model(krause.hf.patch_model(base, window=4, top_k=2)), root / "adapter")
    model, _, kind = ev.load_for_eval(model_dir, root / "adapter", dtype="float32")
    assert kind == "krause" and krause.hf.is_patched(model)
    out = root / "results"
    rc = ev.main(["--model", str(model_dir), "--adapter", str(root / "adapter"), "--include_path", str(tasks),
                  "--tasks", "boolq_local", "--no_default_tasks", "--dtype", "float32", "--out_dir", str(out), "--label", "krause"])
    assert rc == 0
    record = json.loads((out / "krause.json").read_text())
    assert record["kind"] == "krause" and "acc,none" in record["results"]["boolq_local"]
    base_record = dict(record, label="base", kind="base")
    (out / "base.json").write_text(json.dumps(base_record))
    md, csv_path = write_tables([out / "base.json", out / "krause.json"], out / "comparison")
    lines = md.read_text().splitlines()
    assert lines[0] == "| task | metric | base | krause |" and lines[2].startswith("| boolq_local | acc,none |")
    assert csv_path.read_text().splitlines()[0] == "task,metric,base,krause"


def test_a_lora_baseline_adapter_loads_unpatched(env):
    root, model_dir, _ = env
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    krause.hf.save(krause.hf.lora_model(base), root / "lora_adapter")
    model, _, kind = ev.load_for_eval(model_dir, root / "lora_adapter", dtype="float32")
    assert kind == "lora" and not krause.hf.is_patched(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged


def test_a_damaged_adapter_is_refused_in_one_line(env, capsys):
    from krause.training.checkpointer import seal_directory

    root, model_dir, tasks = env
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = root / "sealed_adapter"
    krause.hf.save(krause.hf.lora_model(krause.hf.patch_model(base, window=4, top_k=2)), adapter)
    seal_directory(adapter)  # as lora_llms.train does
    assert ev.load_for_eval(model_dir, adapter, dtype="float32")[2] == "krause"
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # the tail: LoRA B is all zeros, a zero fill may change nothing
    weights.write_bytes(bytes(data))
    rc = ev.main(["--model", str(model_dir), "--adapter", str(adapter), "--include_path", str(tasks),
                  "--tasks", "boolq_local", "--no_default_tasks", "--dtype", "float32", "--out_dir", str(root / "d")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error:") and "CRC-32 mismatch" in last and "adapter_model" in last, last
    assert not (root / "d").exists()


def test_unknown_tasks_fail_before_loading(env, capsys):
    root, model_dir, tasks = env
    rc = ev.main(["--model", "/nonexistent", "--tasks", "boolq_local,no_such_task", "--include_path", str(tasks),
                  "--no_default_tasks", "--out_dir", str(root / "x")])
    assert rc == 2 and "no_such_task" in capsys.readouterr().err


def test_paper_tasks_exist_in_lm_eval_and_ifeval_needs_punkt_tab():
    # the stock task folders only (indexing all of lm-eval's task files takes ~30 s)
    stock = [STOCK / d for d in ("super_glue/boolq", "super_glue/cb", "anli", "piqa", "glue/mnli", "mmlu_pro", "ifeval")]
    manager = ev.task_manager(stock, include_defaults=False)
    assert set(ev.PAPER_TASKS) | {"mmlu_pro"} <= set(manager.all_tasks)
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        has_punkt = True
    except LookupError:
        has_punkt = False
    if has_punkt:
        ev.check_tasks(manager, ["ifeval"])  # nothing to refuse where the data is installed
    else:
        with pytest.raises(ValueError, match="punkt_tab"):
            ev.check_tasks(manager, ["ifeval"])


def test_named_task_without_cached_data_fails_in_one_line_before_loading(env, tmp_path, capsys):
    root, model_dir, tasks = env
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "uncached_boolq.yaml").write_text(
        (STOCK / "super_glue" / "boolq" / "default.yaml").read_text()
        .replace("task: boolq", "task: uncached_boolq").replace("dataset_path: aps/super_glue",
                                                               "dataset_path: krause-tests/no-such-dataset"))
    rc = ev.main(["--model", "/nonexistent", "--tasks", "boolq_local,uncached_boolq", "--include_path", str(tasks),
                  "--include_path", str(missing), "--no_default_tasks", "--out_dir", str(root / "y")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "task uncached_boolq: krause-tests/no-such-dataset" in err and "krause.evaluation download" in err
    assert not (root / "y").exists()
