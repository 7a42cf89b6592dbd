"""language_models_100m.evaluate: lm-eval end to end on a tiny model, on local copies of the stock tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from language_models_100m import build_model, evaluate  # noqa: E402
from language_models_100m.fake_data import make_documents, train_tokenizer  # noqa: E402
from language_models_100m.shards import write_shard  # noqa: E402

STOCK = Path(__import__("lm_eval").__file__).parent / "tasks"
CBT_DIR = Path(evaluate.__file__).parent / "tasks" / "cbt"


def _docs(kind, rng):
    w = lambda n: " ".join(rng.choice(["water", "light", "river", "cell", "school", "plant"], n))  # noqa: E731
    if kind == "hellaswag":
        return {"ind": 0, "activity_label": "Cooking", "ctx_a": w(5), "ctx_b": w(3), "ctx": w(8),
                "endings": [w(4) for _ in range(4)], "source_id": "x", "split": "val", "split_type": "indomain",
                "label": str(rng.integers(4))}
    if kind == "piqa":
        return {"goal": w(6), "sol1": w(4), "sol2": w(5), "label": int(rng.integers(2))}
    if kind == "arc_easy":
        return {"id": "q", "question": w(7) + "?", "choices": {"text": [w(2) for _ in range(4)],
                                                                "label": ["A", "B", "C", "D"]},
                "answerKey": "ABCD"[rng.integers(4)]}
    if kind == "lambada_openai":
        return {"text": w(12)}
    if kind == "blimp":
        return {"sentence_good": w(6) + ".", "sentence_bad": w(6) + ".", "field": "syntax",
                "linguistics_term": "island_effects", "UID": "adjunct_island", "simple_LM_method": True,
                "one_prefix_method": False, "two_prefix_method": False, "lexically_identical": False,
                "pair_id": 0}
    if kind == "cbt":
        options = [f"word{i}" for i in range(10)]
        return {"sentences": [w(6) + "." for _ in range(20)], "question": w(4) + " XXXXX " + w(3) + ".",
                "answer": options[int(rng.integers(10))], "options": options}
    raise KeyError(kind)


def localise(yaml_text: str, name: str, data: Path) -> str:
    """A stock task YAML with its hub dataset replaced by a local JSON file for each split it names
    (schema, prompts and metrics unchanged)."""
    splits = re.findall(r"^(?:training|validation|test)_split: (\w+)$", yaml_text, flags=re.M)
    files = "".join(f"\n    {s}: {data}" for s in dict.fromkeys(splits) if s != "null")
    lines = []
    skip_list = False
    for line in yaml_text.splitlines():
        if skip_list and line.startswith("  - "):
            continue
        skip_list = False
        if line.startswith("tag:"):
            skip_list = True
            continue
        if line.startswith(("dataset_name:", "include:")):
            continue
        if line.startswith("dataset_path:"):
            line = f"dataset_path: json\ndataset_kwargs:\n  data_files:{files}"
        if line.startswith("task:"):
            line = f"task: {name}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    sources = {  # local name: (stock yaml text, document schema)
        "local_hellaswag": ((STOCK / "hellaswag" / "hellaswag.yaml").read_text(), "hellaswag"),
        "local_piqa": ((STOCK / "piqa" / "piqa.yaml").read_text(), "piqa"),
        "local_arc_easy": ((STOCK / "arc" / "arc_easy.yaml").read_text(), "arc_easy"),
        "local_lambada_openai": ((STOCK / "lambada" / "lambada_openai.yaml").read_text(), "lambada_openai"),
        "local_blimp": ((STOCK / "blimp" / "_template_yaml").read_text() + "task: x\n", "blimp"),
        "local_cbt": ((CBT_DIR / "_cbt_template_yaml").read_text() + "task: x\n", "cbt"),
    }
    for name, (text, kind) in sources.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(_docs(kind, rng)) + "\n" for _ in range(6)))
        (root / f"{name}.yaml").write_text(localise(text, name, data))
    # The stock hellaswag and our CBT task call functions in a utils module next to the YAML.
    (root / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
                                   + (CBT_DIR / "utils.py").read_text())
    return root, list(sources)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("models")
    docs = make_documents(300, seed=3)
    tok_file = train_tokenizer(docs, root / "tok.json", vocab_size=200)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token="<|endoftext|>")
    dirs = []
    for attention in ("gated", "standard"):
        run = root / f"tiny_{attention}"
        model = build_model("tiny", attention, vocab_size=len(tokenizer), eos_token_id=0, bos_token_id=0)
        model.save_pretrained(run / "hf")
        tokenizer.save_pretrained(run / "hf")
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": 5.0 - 0.1 * s}) + "\n"
                                                   for s in (10, 20, 30)))
        dirs.append(run)
    data = root / "data"
    data.mkdir()
    write_shard(data / "x_val_000000.bin", np.random.default_rng(0).integers(0, len(tokenizer), 700), "uint16")
    return dirs, data


def test_lm_eval_end_to_end_on_tiny_models(local_tasks, model_dirs, tmp_path):
    task_dir, tasks = local_tasks
    runs, data = model_dirs
    out = tmp_path / "eval"
    code = evaluate.main(["--model", *map(str, runs), "--out_dir", str(out), "--tasks", *tasks,
                          "--include_path", str(task_dir), "--data_dir", str(data), "--batch_size", "4",
                          "--bootstrap_iters", "0", "--device", "cpu"])
    assert code == 0
    result = json.loads((out / "tiny_gated" / "results.json").read_text())
    assert result["attention"] == "gated" and result["val_tokens"] == (699 // 64) * 64
    assert 4.5 < result["val_loss"] < 7.5  # an untrained model over a ~260-token vocabulary: ~ln(260) = 5.6
    for name in tasks:
        scores = result["tasks"][name]
        assert 0.0 <= scores["acc"] <= 1.0, name
    for name in ("local_hellaswag", "local_piqa", "local_arc_easy", "local_cbt"):
        assert "acc_norm" in result["tasks"][name]
    table = (out / "comparison.md").read_text()
    assert "| tiny_gated | gated |" in table and "| tiny_standard | standard |" in table
    header = (out / "comparison.csv").read_text().splitlines()[0]
    assert header.startswith("model,attention,val_loss,val_ppl,local_hellaswag acc,local_hellaswag acc_norm")
    assert (out / "val_loss.png").stat().st_size > 1000


def test_cbt_task_scores_option_plus_rest_of_sentence():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cbt_utils", CBT_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"sentences": ["One day .", "The cat sat ."], "question": "Then the XXXXX ran away .",
           "answer": "dog", "options": ["cat", "dog", "mat"]}
    assert utils.doc_to_text(doc) == "One day . The cat sat . Then the"
    assert utils.doc_to_choice(doc) == ["cat ran away .", "dog ran away .", "mat ran away ."]
    assert utils.doc_to_target(doc) == 1
    from lm_eval.tasks import TaskManager

    names = TaskManager(include_path=str(CBT_DIR.parent), include_defaults=False).all_tasks
    assert {"cbt", "cbt_cn", "cbt_ne", "cbt_p", "cbt_v"} <= set(names)
    # Every shipped subset YAML points at the hub dataset's config of that name.
    for sub in ("cn", "ne", "p", "v"):
        text = (CBT_DIR / f"cbt_{sub}.yaml").read_text()
        assert re.search(rf"dataset_name: {sub.upper()}\b", text)


def test_bad_model_path_is_one_line(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path), "--out_dir", str(tmp_path / "o"), "--tasks", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a save_pretrained directory nor a run directory" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- offline task data
@pytest.fixture
def offline_tasks(local_tasks, tmp_path, monkeypatch):
    """One task whose data is a local file, one whose hub dataset is not cached; the hub unreachable."""
    import krause.evaluation

    task_dir, _ = local_tasks
    missing = tmp_path / "missing_tasks"
    missing.mkdir()
    (missing / "uncached_piqa.yaml").write_text(
        (STOCK / "piqa" / "piqa.yaml").read_text().replace("task: piqa", "task: uncached_piqa")
        .replace("dataset_path: baber/piqa", "dataset_path: krause-tests/no-such-dataset"))
    monkeypatch.setattr(krause.evaluation, "hub_reachable", lambda timeout=3.0: False)
    return task_dir, missing


def test_prepare_tasks_runs_the_cached_and_names_the_missing(offline_tasks):
    from krause.evaluation import TaskUnavailable, prepare_tasks, task_manager

    task_dir, missing = offline_tasks
    manager = task_manager([task_dir, missing])
    lines = []
    prepared = prepare_tasks(["local_piqa", "uncached_piqa"], manager, strict=False, log=lines.append)
    assert prepared.runnable == ["local_piqa"] and list(prepared.skipped) == ["uncached_piqa"]
    assert prepared.offline and "krause-tests/no-such-dataset" in prepared.skipped["uncached_piqa"]
    assert len(lines) == 1 and "krause.evaluation download --tasks uncached_piqa" in lines[0]
    with pytest.raises(TaskUnavailable, match=r"task uncached_piqa: krause-tests/no-such-dataset .*"
                                              r"--tasks local_piqa$"):
        prepare_tasks(["local_piqa", "uncached_piqa"], manager, strict=True)
    with pytest.raises(TaskUnavailable, match="unknown lm-eval task"):
        prepare_tasks(["no_such_task"], manager, strict=False)


def test_evaluate_offline_named_task_is_one_line_and_writes_nothing(offline_tasks, model_dirs, tmp_path, capsys):
    task_dir, missing = offline_tasks
    runs, _ = model_dirs
    out = tmp_path / "res"
    code = evaluate.main(["--model", str(runs[0]), "--out_dir", str(out), "--tasks", "local_piqa", "uncached_piqa",
                          "--include_path", str(task_dir), str(missing)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "uncached_piqa" in err and "krause.evaluation download" in err and "--tasks local_piqa" in err
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_offline_default_tasks_skips_them_and_reports(offline_tasks, model_dirs, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(evaluate, "DEFAULT_TASKS", ("local_piqa", "uncached_piqa"))
    task_dir, missing = offline_tasks
    runs, data = model_dirs
    out = tmp_path / "res"
    code = evaluate.main(["--model", str(runs[1]), "--out_dir", str(out), "--include_path", str(task_dir),
                          str(missing), "--data_dir", str(data), "--batch_size", "4", "--bootstrap_iters", "0"])
    assert code == 0
    result = json.loads((out / runs[1].name / "results.json").read_text())
    assert "val_loss" in result and "acc" in result["tasks"]["local_piqa"]
    assert list(result["skipped_tasks"]) == ["uncached_piqa"]
    assert "skipped (data not available offline): uncached_piqa" in capsys.readouterr().out
