"""FLAN data from local files: every format, the split recipe, response-only labels with EOS
kept, bad examples counted, clear errors."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from lora_llms import data  # noqa: E402
from lora_llms.testing import flan_examples, train_tokenizer, write_flan_dir  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def flan_dir(tmp_path_factory):
    return write_flan_dir(tmp_path_factory.mktemp("flan"), n=60, bad=3)


def test_all_formats_load_into_one_dataset(flan_dir):
    files = data.find_data_files(flan_dir)
    assert len(files["json"]) == 2 and len(files["parquet"]) == 1
    raw = data.load_raw(flan_dir)
    assert len(raw) == 63 and raw.column_names == ["inputs", "targets"]


def test_split_recipe_is_a_seeded_shuffle(flan_dir):
    raw = data.load_raw(flan_dir)
    train, evals = data.split_examples(raw, num_train=40, num_eval=10, seed=3407)
    assert (len(train), len(evals)) == (40, 10)
    again, _ = data.split_examples(raw, num_train=40, num_eval=10, seed=3407)
    assert list(train["inputs"]) == list(again["inputs"])
    expected = raw.shuffle(seed=3407).select(range(50))
    assert list(train["inputs"]) + list(evals["inputs"]) == list(expected["inputs"])
    small_train, small_eval = data.split_examples(raw, num_train=50_000, num_eval=5_000)
    assert len(small_train) + len(small_eval) == 63 and len(small_eval) == round(63 / 11)


def test_labels_cover_the_response_and_eos_only(tokenizer):
    example = {"inputs": "Passage: The cat sat.\nWhat is the first word?", "targets": "the cat"}
    features, reason = data.tokenize_example(tokenizer, example["inputs"], example["targets"], max_length=512)
    assert reason is None
    ids, labels = features["input_ids"], features["labels"]
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    response = [i for i, l in zip(ids, labels) if l != data.IGNORE_INDEX]
    assert tokenizer.decode(response[:-1]) == "the cat"
    first = labels.index(next(l for l in labels if l != data.IGNORE_INDEX))
    assert tokenizer.decode(ids[:first]) == data.prompt_text(example["inputs"])


def test_collator_pads_with_a_pad_id_that_is_not_eos_and_keeps_eos_labels(tokenizer, flan_dir):
    assert data.choose_pad_token(tokenizer) != tokenizer.eos_token_id
    train, _, stats = data.build_datasets(flan_dir, tokenizer, num_train=40, num_eval=10, max_length=512)
    batch = data.collator(tokenizer)([train[0], train[1], train[2]])
    lengths = [len(train[i]["input_ids"]) for i in range(3)]
    for row, n in enumerate(lengths):
        assert batch["labels"][row, n - 1] == tokenizer.eos_token_id  # EOS labelled
        assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    assert isinstance(batch["input_ids"], torch.Tensor)


def test_bad_examples_are_skipped_and_counted(tmp_path, tokenizer):
    rows = flan_examples(10) + [{"inputs": "Q?", "targets": ""}, {"inputs": "", "targets": "a"},
                                {"inputs": None, "targets": "b"}, {"inputs": "x " * 400, "targets": "y"}]
    with gzip.open(tmp_path / "part.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    raw = data.load_raw(tmp_path)
    tokenized, stats = data.tokenize_dataset(raw, tokenizer, max_length=200)
    assert stats.skipped == {"no_response": 1, "no_prompt": 2, "prompt_fills_max_length": 1}
    assert stats.kept == len(tokenized) == 10


def test_bad_data_dirs_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no usable data files"):
        data.find_data_files(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        data.find_data_files(tmp_path / "missing")
    (tmp_path / "x.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="lack the field"):
        data.load_raw(tmp_path)
    (tmp_path / "x.jsonl").write_text(json.dumps({"inputs": "q", "targets": ""}) + "\n")
    with pytest.raises(ValueError, match="no usable examples"):
        data.tokenize_dataset(data.load_raw(tmp_path), tokenizer)


def test_no_eval_split_when_num_eval_is_zero():
    from datasets import Dataset

    from lora_llms.data import split_examples

    ds = Dataset.from_dict({"inputs": [f"q{i}" for i in range(8)], "targets": ["a"] * 8})
    for num_train in (8, 100):  # exactly the data, and more than there is
        train_split, eval_split = split_examples(ds, num_train, 0)
        assert len(train_split) == 8 and len(eval_split) == 0
