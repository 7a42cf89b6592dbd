"""FineWeb-Edu parquet files -> a shuffled, split, tokenised sample in llm.c ``.bin`` shards.

    python -m language_models_100m.build_fwe10bt --input /data/fineweb-edu/sample/10BT \\
        --out_dir /data/fwe10bt [--tokenizer gpt2] [--max_tokens 10e9] [--workers 16]

Documents (rows with a ``text`` column) are ordered by one random permutation (seed 3407)
of all rows of all input files (files sorted by name). Going through that order, documents
are taken until the sum of their ``token_count`` column (FineWeb-Edu's GPT-2 counts)
reaches ``--max_tokens``; without that column every document is taken. The document at
shuffled position p goes to val when p % 502 == 500, to test when p % 502 == 501, else to
train (500:1:1, whole documents). Each document becomes [EOS] + its tokens (llm.c's
layout: EOS separates documents), and each split is written in shuffled order.

Two streaming passes keep memory bounded by one shard: (1) read the parquet files in
record batches, tokenise them in ``--workers`` processes, and append each document to the
bucket of its future shard under ``<out_dir>/tmp`` (an input file is marked done when all
its pieces are on disk); (2) per shard, load its bucket, order the documents and write the
shard. Rerunning the same command resumes: finished input files and shards are skipped.
``manifest.json`` lists the shards, their token and document counts and the settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import shutil
from pathlib import Path

import numpy as np

from krause.training.entry import OneLineParser, entry_point
from krause.training.errors import UsageError
from krause.training.ranges import NONNEGATIVE_FLOAT, POSITIVE_INT, SEED, check_namespace

from .shards import FORMATS, dtype_for_vocab, read_header, write_shard

SPLITS = ("train", "val", "test")
SPLIT_PERIOD = 502  # 500 train : 1 val : 1 test
DEFAULT_SEED = 3407


class BuildError(ValueError):
    """Bad input to the build: one line naming the argument or file."""


# ------------------------------------------------------------------ tokenizer
def load_tokenizer(spec: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file, a directory, or a hub name (e.g. gpt2).
    Special tokens written in a document's text are tokenised as plain text."""
    from tokenizers import Tokenizer

    path = Path(spec).expanduser()
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    elif path.is_dir() and (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec).backend_tokenizer
        except Exception as e:  # noqa: BLE001 - any loading failure is a bad --tokenizer
            raise BuildError(f"--tokenizer {spec!r}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    tok.encode_special_tokens = True
    return tok


_TOKENIZER = None


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec)


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int64) for e in _TOKENIZER.encode_batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------ plan
def split_of(position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(split id 0/1/2, index within the split) of shuffled positions."""
    period, r = np.divmod(position, SPLIT_PERIOD)
    split = np.where(r < 500, 0, np.where(r == 500, 1, 2))
    index = np.where(split == 0, period * 500 + r, period)
    return split, index


def list_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files.extend(sorted(p.rglob("*.parquet")))
        elif p.is_file():
            files.append(p)
        else:
            raise BuildError(f"--input {item}: no such file or directory")
    if not files:
        raise BuildError(f"--input {' '.join(inputs)}: no .parquet files")
    return sorted(set(files))


def make_plan(files: list[Path], seed: int, max_tokens: float | None, shard_tokens: int, docs_per_shard: int) -> dict:
    """Which rows are taken, where they go, and the shard of each (all from metadata and token_count)."""
    import pyarrow.parquet as pq

    rows, has_counts = [], True
    for f in files:
        try:
            schema = pq.read_schema(f)
            rows.append(pq.ParquetFile(f).metadata.num_rows)
        except Exception as e:  # noqa: BLE001
            raise BuildError(f"--input {f}: not a readable parquet file ({e})") from None
        if "text" not in schema.names:
            raise BuildError(f"--input {f}: no 'text' column (columns: {', '.join(schema.names)})")
        has_counts &= "token_count" in schema.names
    total = int(sum(rows))
    if total == 0:
        raise BuildError("--input: the parquet files have no rows")
    perm = np.random.default_rng(seed).permutation(total)  # shuffled position -> global row
    counts = None
    if has_counts:
        counts = np.concatenate([pq.read_table(f, columns=["token_count"])["token_count"].to_numpy() for f in files])
        counts = counts.astype(np.int64)
    taken = total
    if max_tokens is not None:
        if counts is None:
            raise BuildError("--max_tokens needs a 'token_count' column in every input file")
        cum = np.cumsum(counts[perm])
        taken = int(min(total, np.searchsorted(cum, max_tokens) + 1))
    position_of_row = np.full(total, -1, dtype=np.int64)
    position_of_row[perm[:taken]] = np.arange(taken)
    # Shard of each taken document: split documents in order, ~shard_tokens (by token_count) per shard.
    split, index = split_of(np.arange(taken))
    shard = np.zeros(taken, dtype=np.int64)
    for s in range(3):
        sel = split == s
        if counts is not None:
            cum = np.cumsum(counts[perm[:taken]][sel])
            shard[sel] = (cum - 1) // shard_tokens if cum.size else 0
        else:
            shard[sel] = index[sel] // docs_per_shard
    return {"files": files, "rows": rows, "position_of_row": position_of_row, "split": split, "shard": shard,
            "taken": taken, "total_rows": total,
            "est_tokens": int(counts[perm[:taken]].sum()) if counts is not None else None}


# ------------------------------------------------------------------ pass 1
def _file_dir(tmp: Path, i: int) -> Path:
    return tmp / f"file_{i:06d}"


def scatter_file(i: int, path: Path, row_offset: int, plan: dict, tmp: Path, pool, batch_rows: int, bar) -> None:
    """Tokenises the taken rows of one input file into bucket pieces under tmp/file_i (marked DONE)."""
    import pyarrow.parquet as pq

    out = _file_dir(tmp, i)
    if (out / "DONE").exists():
        return
    shutil.rmtree(out, ignore_errors=True)  # a partial earlier attempt
    out.mkdir(parents=True)
    eos = plan["eos"]

    def batches():
        offset = row_offset
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["text"]):
            pos = plan["position_of_row"][offset:offset + batch.num_rows]
            offset += batch.num_rows
            keep = np.nonzero(pos >= 0)[0]
            if keep.size:
                texts = batch.column("text").to_pylist()
                yield pos[keep], [texts[j] if texts[j] is not None else "" for j in keep]

    pending = []
    for pos, texts in batches():
        pending.append((pos, pool.apply_async(_tokenize, (texts,)) if pool is not None else _tokenize(texts)))
        if len(pending) > 4:
            _write_pieces(out, *_resolve(pending.pop(0)), plan, eos, bar)
    while pending:
        _write_pieces(out, *_resolve(pending.pop(0)), plan, eos, bar)
    (out / "DONE").write_text("")


def _resolve(item):
    pos, result = item
    return pos, (result.get() if hasattr(result, "get") else result)


def _write_pieces(out: Path, positions: np.ndarray, docs: list[np.ndarray], plan: dict, eos: int, bar) -> None:
    dtype = plan["dtype"]
    groups: dict[tuple[int, int], list[int]] = {}
    for j, p in enumerate(positions):
        groups.setdefault((int(plan["split"][p]), int(plan["shard"][p])), []).append(j)
    n_tokens = 0
    for (s, b), members in groups.items():
        stem = out / f"{SPLITS[s]}_{b:06d}"
        lengths = np.array([docs[j].size + 1 for j in members], dtype=np.int64)
        tokens = np.concatenate([np.concatenate([[eos], docs[j]]) for j in members])
        if tokens.max(initial=0) > np.iinfo(dtype).max:
            raise BuildError(f"--tokenizer produced id {int(tokens.max())}, outside --dtype {dtype}")
        with open(stem.with_suffix(".tok"), "ab") as f:
            f.write(tokens.astype(dtype).tobytes())
        with open(stem.with_suffix(".idx"), "ab") as f:
            f.write(np.stack([positions[members], lengths], axis=1).astype(np.int64).tobytes())
        n_tokens += int(tokens.size)
    if bar is not None:
        bar.update(n_tokens)


# ------------------------------------------------------------------ pass 2
def gather_shard(tmp: Path, n_files: int, split: str, b: int, dtype: str) -> tuple[np.ndarray, int]:
    """The tokens of one shard in shuffled order, from every file's piece; (tokens, documents)."""
    positions, lengths, chunks = [], [], []
    for i in range(n_files):
        stem = _file_dir(tmp, i) / f"{split}_{b:06d}"
        if not stem.with_suffix(".idx").exists():
            continue
        idx = np.fromfile(stem.with_suffix(".idx"), dtype=np.int64).reshape(-1, 2)
        positions.append(idx[:, 0])
        lengths.append(idx[:, 1])
        chunks.append(np.fromfile(stem.with_suffix(".tok"), dtype=dtype))
    pos, lens, toks = np.concatenate(positions), np.concatenate(lengths), np.concatenate(chunks)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    order = np.argsort(pos, kind="stable")
    out = np.concatenate([toks[starts[j]:starts[j] + lens[j]] for j in order])
    return out, int(len(order))


def build(args) -> dict:
    from tqdm.auto import tqdm

    files = list_inputs(args.input)
    out_dir = Path(args.out_dir).expanduser().resolve()
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for_vocab(vocab, args.dtype)
    eos = tokenizer.token_to_id(args.eos_token)
    if eos is None:
        raise BuildError(f"--eos_token {args.eos_token!r} is not in the tokenizer's vocabulary")
    settings = {"inputs": [str(f) for f in files], "tokenizer": args.tokenizer, "vocab_size": vocab, "dtype": dtype,
                "eos_token": args.eos_token, "eos_id": eos, "seed": args.seed, "max_tokens": args.max_tokens,
                "shard_tokens": args.shard_tokens, "docs_per_shard": args.docs_per_shard, "prefix": args.prefix}
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / "build_settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            changed = [k for k in settings if previous.get(k) != settings[k]]
            raise BuildError(f"--out_dir {out_dir} holds a build with other settings ({', '.join(changed)}); "
                             "use a new --out_dir")
    else:
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")

    plan = make_plan(files, args.seed, args.max_tokens, args.shard_tokens, args.docs_per_shard)
    plan.update(eos=eos, dtype=dtype)
    tmp = out_dir / "tmp"
    offsets = np.concatenate([[0], np.cumsum(plan["rows"])]).astype(np.int64)
    print(f"{len(files)} parquet file(s), {plan['total_rows']:,} documents, taking {plan['taken']:,} "
          f"(~{plan['est_tokens'] or 0:,} GPT-2 tokens by token_count); {dtype} shards in {out_dir}", flush=True)
    bar = tqdm(total=plan["est_tokens"], unit="tok", unit_scale=True, desc="tokenise", disable=args.no_progress)
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer,)) if args.workers > 1 else None
    if pool is None:
        _init_worker(args.tokenizer)
    try:
        for i, f in enumerate(files):
            scatter_file(i, f, int(offsets[i]), plan, tmp, pool, args.batch_rows, bar)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()

    shards = []
    for s, split in enumerate(SPLITS):
        ids = np.unique(plan["shard"][plan["split"] == s])
        for b in ids:
            path = out_dir / f"{args.prefix}_{split}_{int(b):06d}.bin"
            done = path.with_name(path.name + ".docs")
            if path.exists() and done.exists():
                _, count = read_header(path)
                shards.append({"file": path.name, "split": split, "tokens": count, "documents": int(done.read_text())})
                continue
            tokens, n_docs = gather_shard(tmp, len(files), split, int(b), dtype)
            write_shard(path, tokens, dtype)
            done.write_text(str(n_docs))
            shards.append({"file": path.name, "split": split, "tokens": int(tokens.size), "documents": n_docs})
    manifest = {"format": {"dtype": dtype, "magic": FORMATS[dtype][0], "version": FORMATS[dtype][1], "header_ints": 256},
                **settings, "documents_total": plan["total_rows"], "documents_taken": plan["taken"],
                "tokens": {split: sum(x["tokens"] for x in shards if x["split"] == split) for split in SPLITS},
                "shards": shards}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print("tokens: " + ", ".join(f"{k} {v:,}" for k, v in manifest["tokens"].items()), flush=True)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m language_models_100m.build_fwe10bt", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="parquet files or directories (searched recursively)")
    p.add_argument("--out_dir", required=True, help="where the shards, manifest.json and the temporary buckets go")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer.json file, tokenizer directory or hub name")
    p.add_argument("--eos_token", default="<|endoftext|>", help="token written before every document")
    p.add_argument("--dtype", default=None, choices=sorted(FORMATS), help="token dtype (default: by vocabulary size)")
    p.add_argument("--max_tokens", type=NONNEGATIVE_FLOAT, default=10e9, help="token_count budget of the sample; 0: every document")
    p.add_argument("--seed", type=SEED, default=DEFAULT_SEED, help="shuffle seed")
    p.add_argument("--shard_tokens", type=POSITIVE_INT, default=100_000_000, help="tokens per shard (by token_count)")
    p.add_argument("--docs_per_shard", type=POSITIVE_INT, default=100_000, help="documents per shard without token_count")
    p.add_argument("--prefix", default="fwe10bt", help="shard names: PREFIX_{train,val,test}_NNNNNN.bin")
    p.add_argument("--workers", type=POSITIVE_INT, default=max(1, (mp.cpu_count() or 2) - 1), help="tokeniser processes")
    p.add_argument("--batch_rows", type=POSITIVE_INT, default=1024, help="parquet rows per tokenisation task")
    p.add_argument("--keep_tmp", action="store_true", help="keep the per-file buckets after the shards are written")
    p.add_argument("--no_progress", action="store_true")
    return p


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = check_namespace(parser.parse_args(argv), parser)
    args.max_tokens = args.max_tokens or None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.prefix) or ".." in args.prefix:
        raise UsageError(f"--prefix must be a plain file-name stem (letters, digits, '_', '-', '.'), "
                     f"so the shards stay inside --out_dir; got {args.prefix!r}")
    build(args)  # BuildError, ShardError, a --dtype the vocabulary does not fit: one line, exit 2 (entry_point)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
