"""Token shards in the llm.c / modded-nanogpt ``.bin`` format, and a memory-mapped stream over them.

A shard is a 256 x int32 little-endian header followed by the tokens:

    header[0] = magic, header[1] = version, header[2] = number of tokens
    uint16 tokens:  magic 20240520, version 1   (llm.c's GPT-2 shards)
    uint32 tokens:  magic 20240801, version 7   (llm.c's Llama-3 shards, for vocabularies > 65,535)

so shards written here load in llm.c / modded-nanogpt and theirs load here.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from krause.training.atomic import atomic_file

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMATS = {  # dtype name -> (magic, version)
    "uint16": (20240520, 1),
    "uint32": (20240801, 7),
}
_BY_HEADER = {v: k for k, v in FORMATS.items()}


class ShardError(ValueError):
    """A shard file that is not a valid ``.bin`` token shard."""


def dtype_for_vocab(vocab_size: int, requested: str | None = None) -> str:
    """The token dtype for a vocabulary: uint16 up to 65,536 ids, else uint32.
    ``requested`` forces one, and is refused when the vocabulary does not fit it."""
    if requested is None:
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in FORMATS:
        raise ValueError(f"--dtype must be one of {sorted(FORMATS)}, got {requested!r}")
    if vocab_size > np.iinfo(requested).max + 1:
        raise ValueError(f"--dtype {requested}: the tokenizer's vocabulary of {vocab_size:,} ids does not fit "
                         f"{requested} (max id {np.iinfo(requested).max:,})")
    return requested


def write_shard(path, tokens: np.ndarray, dtype: str) -> Path:
    """Writes ``tokens`` as a shard (atomically: a temporary file renamed into place)."""
    path = Path(path)
    magic, version = FORMATS[dtype]
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids outside the {dtype} range cannot be written to {path}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, tokens.size
    with atomic_file(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
    return path


def read_header(path) -> tuple[str, int]:
    """(dtype, number of tokens) of a shard; ShardError for a bad header or a truncated body."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    fmt = _BY_HEADER.get((int(header[0]), int(header[1])))
    if fmt is None:
        raise ShardError(f"{path}: bad shard header (magic {int(header[0])}, version {int(header[1])}); expected "
                         + " or ".join(f"{m}/{v} ({d})" for d, (m, v) in FORMATS.items()))
    count = int(header[2])
    expected = HEADER_BYTES + count * np.dtype(fmt).itemsize
    if count < 0 or size != expected:
        raise ShardError(f"{path}: header says {count:,} {fmt} tokens ({expected:,} bytes) but the file has "
                         f"{size:,} bytes (truncated or corrupt)")
    return fmt, count


def load_shard(path) -> np.ndarray:
    """The tokens of a shard, memory-mapped read-only (nothing is read until used)."""
    fmt, count = read_header(path)
    return np.memmap(path, dtype=np.dtype(fmt).newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(count,))


def split_shards(data_dir, split: str) -> list[Path]:
    """The shards of a split in a build directory, in order (``*_{split}_*.bin``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data_dir {data_dir} is not a directory")
    shards = sorted(data_dir.glob(f"*_{split}_*.bin"))
    if not shards:
        raise ValueError(f"--data_dir {data_dir} has no {split} shards (*_{split}_*.bin)")
    return shards


class TokenStream:
    """The concatenated tokens of some shards, memory-mapped, read by absolute offset."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("TokenStream needs at least one shard")
        self.shards = [load_shard(p) for p in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def check_vocab(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """ShardError naming the first shard holding a token id >= vocab_size (one linear scan, in
        chunks: a bad id must stop the run when the data opens, not at the embedding mid-training)."""
        for path, tokens in zip(self.paths, self.shards):
            for start in range(0, len(tokens), chunk):
                part = np.asarray(tokens[start:start + chunk])
                if part.size and int(part.max()) >= vocab_size:
                    at = start + int(np.argmax(part >= vocab_size))
                    raise ShardError(f"{path}: token id {int(tokens[at])} at position {at:,} is outside the "
                                     f"vocabulary of {vocab_size:,} ids (a shard of another tokenizer? "
                                     "rebuild the data or pass a larger --vocab_size)")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        out, pos = [], start
        while pos < start + length:
            i = bisect.bisect_right(self.starts, pos) - 1
            end = min(start + length, self.starts[i + 1])
            out.append(np.asarray(self.shards[i][pos - self.starts[i]:end - self.starts[i]], dtype=np.int64))
            pos = end
        return np.concatenate(out) if len(out) > 1 else out[0]


class WindowSampler:
    """Training sequences as consecutive (block + 1)-token windows of a ``TokenStream``.

    Window w starts at token ``(w mod windows_per_epoch) * block``: the stream is read in
    order and wraps around at its end. Step s of a run with ``global_batch`` sequences per
    step uses windows ``s * global_batch .. + global_batch - 1``, split into contiguous
    per-rank, per-micro-batch slices, so the data of a step does not depend on the world
    size or the accumulation, and the next window index is the whole position to resume.
    """

    def __init__(self, stream: TokenStream, block_size: int):
        self.stream, self.block_size = stream, block_size
        self.windows_per_epoch = (len(stream) - 1) // block_size
        if self.windows_per_epoch < 1:
            raise ValueError(f"--block_size {block_size}: the stream has only {len(stream)} tokens")

    def windows(self, first: int, count: int) -> np.ndarray:
        """(count, block + 1) int64: windows first .. first + count - 1."""
        t = self.block_size
        return np.stack([self.stream.read((w % self.windows_per_epoch) * t, t + 1) for w in range(first, first + count)])
