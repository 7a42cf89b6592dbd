"""Tiny stand-ins for smoke runs without the hub: random Llama/Qwen2 models, a BPE tokenizer
trained on local text, and FLAN-format data files.

    python -m lora_llms.testing OUT_DIR    # writes OUT_DIR/{llama,qwen2,flan}

Everything is written in the real on-disk formats (``save_pretrained`` folders, FLAN
``*.jsonl.gz`` / ``*.json`` / ``*.parquet`` with ``inputs`` / ``targets``), so the entry
points load them exactly as they load the real models and data.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from krause.training.entry import OneLineParser, entry_point
from krause.training.ranges import POSITIVE_INT, check_namespace

WORDS = (
    "the cat dog sat ran on a mat under tree river blue red green big small happy sad yes no maybe "
    "question answer because therefore premise hypothesis true false neither passage goal solution "
    "choose option which what is are was were of to in and or not it this that"
).split()

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]


def sentence(rng: random.Random, n_min=4, n_max=12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max))).capitalize() + "."


def flan_examples(n: int, seed: int = 0) -> list[dict]:
    """Synthetic FLAN-style pairs whose answer is learnable from the prompt (copy the first word)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = sentence(rng)
        first = text.split()[0].lower()
        out.append({"inputs": f"Passage: {text}\nWhat is the first word?", "targets": first})
    return out


def write_flan_dir(out_dir, n: int = 120, seed: int = 0, bad: int = 3) -> Path:
    """FLAN files in three formats plus ``bad`` unusable examples (empty response / missing prompt)."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = flan_examples(n, seed)
    third = len(rows) // 3
    with gzip.open(out / "flan_part0.jsonl.gz", "wt") as fh:
        for row in rows[:third]:
            fh.write(json.dumps(row) + "\n")
        for i in range(bad):
            fh.write(json.dumps({"inputs": "Say nothing." if i % 2 == 0 else "", "targets": ""}) + "\n")
    (out / "flan_part1.json").write_text(json.dumps(rows[third:2 * third]))
    pd.DataFrame(rows[2 * third:]).to_parquet(out / "flan_part2.parquet")
    return out


def train_tokenizer(out_dir, vocab_size: int = 256):
    """A byte-level BPE (with offsets) trained on the synthetic text, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [sentence(rng) for _ in range(2000)] + [r["inputs"] + "\n\n### Response:\n" + r["targets"]
                                                    for r in flan_examples(200, 2)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


OUR_TASKS = Path(__file__).resolve().parent / "tasks"


def write_local_tasks(root) -> Path:
    """Local lm-eval tasks: YAMLs that include lm-eval's own (or ours) and point them at local rows in the
    real schema (boolq_local: loglikelihood, gsm8k_local: generate_until, mmlu_pro_paper_local)."""
    import lm_eval

    stock = Path(lm_eval.__file__).resolve().parent / "tasks"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        "boolq.jsonl": [{"passage": "The cat sat on the mat.", "question": "did the cat sit", "label": i % 2, "idx": i}
                        for i in range(4)],
        "gsm8k.jsonl": [{"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"} for _ in range(2)],
        "mmlu_pro.jsonl": [{"question_id": i, "question": "Which is red?", "options": ["sky", "blood", "grass"],
                            "answer": "B", "answer_index": 1, "cot_content": "", "category": "biology", "src": "t"}
                           for i in range(3)],
    }
    for name, items in rows.items():
        (root / name).write_text("\n".join(json.dumps(r) for r in items) + "\n")
    (root / "boolq_local.yaml").write_text(
        f"include: {stock / 'super_glue/boolq/default.yaml'}\ntask: boolq_local\ntag: null\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {root / 'boolq.jsonl'}\n"
        "training_split: null\n")
    (root / "gsm8k_local.yaml").write_text(
        f"include: {stock / 'gsm8k/gsm8k.yaml'}\ntask: gsm8k_local\ntag: null\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {root / 'gsm8k.jsonl'}\n"
        "training_split: null\nfewshot_split: null\nnum_fewshot: 0\n"
        "generation_kwargs:\n  until: ['Question:']\n  do_sample: false\n  max_gen_toks: 5\n")
    (root / "mmlu_pro_paper_local.yaml").write_text(
        f"include: {OUR_TASKS / 'mmlu_pro_paper/mmlu_pro_paper.yaml'}\ntask: mmlu_pro_paper_local\n"
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {root / 'mmlu_pro.jsonl'}\n")
    return root


def tiny_config(kind: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, pad_token_id=3, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"kind must be 'llama' or 'qwen2', got {kind!r}")


def write_tiny_model(out_dir, kind: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A random tiny model (and the tokenizer) saved with ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = tokenizer or train_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer), **overrides))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@entry_point
def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m lora_llms.testing", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--examples", type=POSITIVE_INT, default=120)
    args = check_namespace(parser.parse_args(argv), parser)
    out = Path(args.out_dir)
    tok = train_tokenizer(out / "tokenizer")
    for kind in ("llama", "qwen2"):
        write_tiny_model(out / kind, kind, tokenizer=tok)
    write_flan_dir(out / "flan", args.examples)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
