"""A real English text corpus that ships inside an installed dependency, read offline.

timm (a pinned requirement, Apache-2.0) ships ``timm/data/_info/imagenet_synset_to_definition.txt``
and ``imagenet_synset_to_lemma.txt``: the WordNet 3.0 glosses of 21,844 synsets
(Princeton WordNet licence: free use, copy, modification and distribution with the
copyright notice). One document per synset, "lemmas: definition", about 2.2 MB of text;
bytes are the tokens (vocabulary 256), so no tokenizer download is needed.

Split: every 20th synset (in the file's order) is validation, the rest training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .common import MissingPrerequisite

NAME = "WordNet 3.0 glosses of the ImageNet-21k synsets, shipped in timm (timm/data/_info)"
LICENCE = "WordNet 3.0 licence (Princeton University; permissive, notice kept); file shipped in timm (Apache-2.0)"
VOCAB_SIZE = 256
VAL_EVERY = 20


@dataclass
class Corpus:
    train: torch.Tensor  # (N,) uint8 bytes
    val: torch.Tensor
    name: str = NAME
    licence: str = LICENCE
    source: str = ""
    documents: int = 0


def _info_dir() -> Path:
    try:
        import timm.data
    except ImportError as e:
        raise MissingPrerequisite(f"corpus: timm is not installed ({e}); pip install timm") from None
    return Path(timm.data.__file__).resolve().parent / "_info"


def _read_tsv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, text = line.partition("\t")
        if key and text:
            out[key] = text.strip()
    return out


def load_corpus() -> Corpus:
    """The glosses as byte tensors (train, val); MissingPrerequisite if the files are absent."""
    info = _info_dir()
    definitions, lemmas = info / "imagenet_synset_to_definition.txt", info / "imagenet_synset_to_lemma.txt"
    if not definitions.is_file():
        raise MissingPrerequisite(f"corpus: {definitions} not found (timm without its data files)")
    defs = _read_tsv(definitions)
    names = _read_tsv(lemmas) if lemmas.is_file() else {}
    train, val = [], []
    for i, (key, text) in enumerate(defs.items()):
        doc = f"{names[key]}: {text}\n" if key in names else f"{text}\n"
        (val if i % VAL_EVERY == VAL_EVERY - 1 else train).append(doc)

    def as_bytes(docs):
        return torch.frombuffer(bytearray("".join(docs).encode("utf-8")), dtype=torch.uint8).clone()

    return Corpus(as_bytes(train), as_bytes(val), source=str(definitions), documents=len(defs))


def batch_at(data: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len) int64 windows at random offsets."""
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def fixed_windows(data: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced (seq_len,) windows: the same validation set for every model."""
    stride = max(1, (data.numel() - seq_len) // count)
    return torch.stack([data[i * stride:i * stride + seq_len] for i in range(count)]).long()


class ByteTokenizer:
    """tokenizer(text, return_tensors="pt", truncation=True, max_length=N) -> {"input_ids": (1, T)}:
    the call ``lora_llms.sinks.sink_values`` makes, on UTF-8 bytes."""

    def __call__(self, text: str, return_tensors: str = "pt", truncation: bool = True, max_length: int | None = None):
        ids = list(text.encode("utf-8"))
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}
