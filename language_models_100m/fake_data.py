"""Small stand-ins for FineWeb-Edu and the GPT-2 tokenizer, for tests and smoke runs offline.

``write_fineweb_parquet`` writes a parquet file in FineWeb-Edu's schema (text, id, dump,
url, date, file_path, language, language_score, token_count, score, int_score) from
generated English-like documents; ``train_tokenizer`` trains a byte-level BPE on them with
``tokenizers`` (EOS ``<|endoftext|>``, as GPT-2) and saves tokenizer.json.

As a command it makes a whole offline build that ``train`` and ``evaluate`` accept:

    python -m language_models_100m.fake_data runs/lm_fake      # -> runs/lm_fake/shards
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from krause.training.entry import OneLineParser, entry_point
from krause.training.ranges import POSITIVE_INT, SEED, Range, check_namespace

WORDS = ("the a of to and in is was for on that with as by at from it an be this which or are were has had "
         "water river light energy cell plant animal school student teacher history science number system "
         "model change large small early modern people city world study data theory process example level "
         "rapid quiet bright ancient common natural simple strong important different general public").split()


def make_documents(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"Doc {i}: " + " ".join(words).capitalize() + ".\n" + ("Second line é ü." if i % 7 == 0 else ""))
    return docs


def write_fineweb_parquet(path, docs: list[str], token_counts: list[int] | None = None, drop_text: bool = False) -> Path:
    """A parquet file with FineWeb-Edu's columns; ``token_count`` defaults to a word count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(docs)
    columns = {
        "text": docs,
        "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "date": ["2024-02-20T00:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/fake.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.95] * n,
        "token_count": token_counts if token_counts is not None else [len(d.split()) + 1 for d in docs],
        "score": [3.1] * n,
        "int_score": [3] * n,
    }
    if drop_text:
        del columns["text"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=max(1, n // 3))
    return path


def train_tokenizer(docs: list[str], path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on ``docs``, saved as tokenizer.json at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m language_models_100m.fake_data",
                       description="Write generated documents, a small BPE tokenizer and their llm.c "
                                   "shards (OUT/shards), for offline smoke runs of train and evaluate.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="folder to create: OUT/parquet, OUT/tokenizer.json, OUT/shards (the --data_dir)")
    p.add_argument("--docs", type=Range(int, ge=10), default=2000,
                   help="generated documents (the val and test splits take 1 in 502 each)")
    p.add_argument("--vocab_size", type=POSITIVE_INT, default=256,
                   help="BPE vocabulary (>= 257 byte-level symbols are kept)")
    p.add_argument("--seed", type=SEED, default=0, help="document generator seed")
    return p


@entry_point
def main(argv=None) -> int:
    from . import build_fwe10bt

    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    out = Path(args.out).expanduser().resolve()
    docs = make_documents(args.docs, seed=args.seed)
    write_fineweb_parquet(out / "parquet" / "fake.parquet", docs)
    tokenizer = train_tokenizer(docs, out / "tokenizer.json", vocab_size=args.vocab_size)
    rc = build_fwe10bt.main(["--input", str(out / "parquet"), "--out_dir", str(out / "shards"),
                             "--tokenizer", str(tokenizer), "--max_tokens", "0", "--workers", "1", "--no_progress"])
    if rc == 0:
        print(f"data ready: --data_dir {out / 'shards'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
