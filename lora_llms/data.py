"""FLAN v2 instruction data for LoRA fine-tuning, from local files.

Files: every ``*.json``, ``*.jsonl``, ``*.jsonl.gz`` and ``*.parquet`` under ``data_dir``
(the public FLAN v2 dump is ``*.jsonl.gz`` with fields ``inputs`` and ``targets``), read
with ``datasets``. The recipe: shuffle (seed 3407), keep 55k, split 50k train / 5k eval;
each example becomes ``"{inputs}\\n\\n### Response:\\n{targets}" + EOS`` with the loss on the
response tokens and the EOS only (prompt tokens get label -100).

Labels come from the tokenizer's character offsets: a token is a response token when it
starts at or after the response's first character (one pass over the offsets). EOS is
appended as a token id (not as text) and keeps its label, whatever the pad token is:
padding is masked by position in the collator, never by comparing ids with the pad id.
Examples without a string prompt or with an empty response, or whose prompt alone fills
``max_length``, are skipped and counted by reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

RESPONSE_TEMPLATE = "\n\n### Response:\n"
DATA_PATTERNS = {"json": ("*.json", "*.jsonl", "*.jsonl.gz", "*.json.gz"), "parquet": ("*.parquet",)}
IGNORE_INDEX = -100


def prompt_text(inputs: str) -> str:
    """The prompt the model sees at training and evaluation time (everything before the response)."""
    return f"{inputs}{RESPONSE_TEMPLATE}"


def find_data_files(data_dir) -> dict[str, list[str]]:
    """{"json": [...], "parquet": [...]} under ``data_dir`` (recursively), sorted; raises when empty."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data_dir: {data_dir} is not a directory")
    found = {kind: sorted(str(p) for pat in pats for p in root.rglob(pat) if p.is_file())
             for kind, pats in DATA_PATTERNS.items()}
    found = {kind: files for kind, files in found.items() if files}
    if not found:
        patterns = ", ".join(p for pats in DATA_PATTERNS.values() for p in pats)
        raise ValueError(f"data_dir: no usable data files ({patterns}) under {data_dir}")
    return found


def load_raw(data_dir, columns=("inputs", "targets")):
    """All files under ``data_dir`` as one ``datasets.Dataset`` with the given columns."""
    from datasets import Features, Value, concatenate_datasets, load_dataset

    parts = []
    quiet = logging.getLogger("datasets")  # its readers log a traceback before raising: the error below says it
    level = quiet.level
    for kind, files in find_data_files(data_dir).items():
        try:
            quiet.setLevel(logging.CRITICAL)
            ds = load_dataset(kind, data_files=files, split="train")
        except Exception as err:  # datasets raises many types for unreadable / mismatched files
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(f"data_dir: cannot read the {kind} files under {data_dir} as FLAN examples "
                             f"(fields {', '.join(columns)}): {type(err).__name__}: {first_line}") from err
        finally:
            quiet.setLevel(level)
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise ValueError(f"data_dir: {kind} files lack the field(s) {missing} (have {ds.column_names})")
        ds = ds.select_columns(list(columns))
        # parquet stores large_string, json string: one schema so the parts concatenate
        parts.append(ds.cast(Features({c: Value("string") for c in columns})))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def split_examples(ds, num_train: int = 50_000, num_eval: int = 5_000, seed: int = 3407):
    """Shuffle with ``seed``, keep ``num_train + num_eval``, split train / eval (in that order)."""
    total = num_train + num_eval
    n_eval = num_eval
    if len(ds) < total:  # keep the split's proportions
        n_eval = round(len(ds) * num_eval / total)
        log.warning("only %d examples for %d train + %d eval: splitting them %d / %d",
                    len(ds), num_train, num_eval, len(ds) - n_eval, n_eval)
    ds = ds.shuffle(seed=seed).select(range(min(total, len(ds))))
    n_train = len(ds) - n_eval
    # an empty range at the end is refused by datasets' contiguous select: an empty index list is not
    evals = ds.select(range(n_train, len(ds))) if n_eval else ds.select([])
    return ds.select(range(n_train)), evals


def response_labels(input_ids, offsets, response_start: int) -> list[int]:
    """Labels for one tokenized text: the token id where the token starts inside the response, else -100.

    ``offsets`` are the tokenizer's (start, end) character offsets; special tokens it
    added (BOS) have (0, 0) and count as prompt.
    """
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets):
        is_response = start >= response_start and end > start
        labels.append(token_id if is_response else IGNORE_INDEX)
    return labels


@dataclass
class TokenizeStats:
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


def _skip_reason(inputs, targets) -> str | None:
    if not isinstance(inputs, str) or not inputs.strip():
        return "no_prompt"
    if not isinstance(targets, str) or not targets.strip():
        return "no_response"
    return None


def tokenize_example(tokenizer, inputs, targets, max_length: int, label_eos: bool = True):
    """(features dict, None) for a usable example, (None, reason) otherwise; ``label_eos=False``
    masks the final EOS from the loss (the first release's behaviour)."""
    reason = _skip_reason(inputs, targets)
    if reason:
        return None, reason
    prompt = prompt_text(inputs)
    enc = tokenizer(prompt + targets, return_offsets_mapping=True, add_special_tokens=True)
    ids = list(enc["input_ids"])
    labels = response_labels(ids, enc["offset_mapping"], len(prompt))
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id if label_eos else IGNORE_INDEX)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "prompt_fills_max_length"
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": truncated}, None


def tokenize_dataset(ds, tokenizer, max_length: int = 2048, num_proc: int | None = None, allow_empty: bool = False,
                     label_eos: bool = True):
    """Tokenized ``ds`` (input_ids, attention_mask, labels) and the :class:`TokenizeStats`
    (an empty result raises unless ``allow_empty``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer: a fast tokenizer is needed (labels come from its character offsets)")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: it has no EOS token")

    def batch_fn(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "truncated": [], "skip": []}
        for inputs, targets in zip(batch["inputs"], batch["targets"]):
            features, reason = tokenize_example(tokenizer, inputs, targets, max_length, label_eos)
            features = features or {"input_ids": [], "attention_mask": [], "labels": [], "truncated": False}
            for key, value in features.items():
                out[key].append(value)
            out["skip"].append(reason or "")
        return out

    mapped = ds.map(batch_fn, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                    desc="tokenize")
    reasons = Counter(mapped["skip"])
    stats = TokenizeStats(skipped=Counter({k: v for k, v in reasons.items() if k}))
    kept = mapped.filter(lambda skip: not skip, input_columns="skip")
    stats.kept = len(kept)
    stats.truncated = sum(kept["truncated"])
    if stats.skipped:
        log.warning("skipped %d bad examples: %s", sum(stats.skipped.values()), dict(stats.skipped))
    if stats.kept == 0 and not allow_empty:
        raise ValueError("data_dir: no usable examples after skipping bad ones: " + str(dict(stats.skipped)))
    return kept.remove_columns(["skip", "truncated"]), stats


def choose_pad_token(tokenizer) -> int:
    """Sets a pad token different from EOS when the tokenizer has none (or pad == eos): its unk
    token, else its last added special token that is not EOS/BOS. Which id pads does not
    change training (padding is masked by position), only that EOS stays a distinct label."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    candidates = [tokenizer.unk_token_id] + list(reversed(list(tokenizer.added_tokens_decoder)))
    for cand in candidates:
        if cand is not None and cand not in (eos, tokenizer.bos_token_id):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(cand)
            return cand
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log.warning("tokenizer had no pad token other than EOS: added <|pad|>; resize the embeddings")
    return tokenizer.pad_token_id


def collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) per batch."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def build_datasets(data_dir, tokenizer, *, num_train=50_000, num_eval=5_000, seed=3407, max_length=2048,
                   num_proc=None, label_eos=True):
    """(train, eval, stats) ready for the Trainer."""
    raw = load_raw(data_dir)
    train_raw, eval_raw = split_examples(raw, num_train, num_eval, seed)
    train, train_stats = tokenize_dataset(train_raw, tokenizer, max_length, num_proc, label_eos=label_eos)
    evals, eval_stats = (tokenize_dataset(eval_raw, tokenizer, max_length, num_proc, allow_empty=True,
                                          label_eos=label_eos)
                         if len(eval_raw) else (None, None))
    if evals is not None and len(evals) == 0:
        log.warning("the eval split has no usable examples: training without evaluation")
        evals = None
    stats = {"raw": len(raw), "train": train_stats.as_dict(), "eval": eval_stats.as_dict() if eval_stats else None}
    return train, evals, stats


def eval_texts(data_dir, num_texts: int = 500, seed: int = 3407, num_train: int = 50_000, num_eval: int = 5_000):
    """The first ``num_texts`` texts of the eval split (prompt + response), for analyses."""
    raw = load_raw(data_dir)
    _, eval_raw = split_examples(raw, num_train, num_eval, seed)
    texts = []
    for row in eval_raw:
        if _skip_reason(row["inputs"], row["targets"]) is None:
            texts.append(prompt_text(row["inputs"]) + row["targets"])
        if len(texts) == num_texts:
            break
    if not texts:
        raise ValueError(f"data_dir: no usable eval texts under {data_dir}")
    return texts
