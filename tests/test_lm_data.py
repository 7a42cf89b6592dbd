"""language_models_100m data: llm.c shards, the FineWeb-Edu build (shuffle, split, tokenise), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from language_models_100m import build_fwe10bt
from language_models_100m.fake_data import make_documents, train_tokenizer, write_fineweb_parquet
from language_models_100m.shards import ShardError, TokenStream, WindowSampler, load_shard, read_header, write_shard

N_DOCS = 1200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fwe")
    docs = make_documents(N_DOCS, seed=1)
    write_fineweb_parquet(root / "in" / "a.parquet", docs[:700])
    write_fineweb_parquet(root / "in" / "b.parquet", docs[700:])
    tok = train_tokenizer(docs, root / "tok.json")
    return root, docs, tok


def run_build(corpus, out, *extra):
    root, _, tok = corpus
    return build_fwe10bt.main(["--input", str(root / "in"), "--out_dir", str(out), "--tokenizer", str(tok),
                               "--workers", "1", "--no_progress", "--shard_tokens", "8000", *extra])


def expected_split(docs, seed):
    """The documents of each split in order, from the documented rule (independent of the build code)."""
    perm = np.random.default_rng(seed).permutation(len(docs))
    out = {"train": [], "val": [], "test": []}
    for p, row in enumerate(perm):
        r = p % 502
        out["train" if r < 500 else ("val" if r == 500 else "test")].append(docs[row])
    return out


def decode_split(out_dir, split, tok_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    tokens = np.concatenate([np.asarray(load_shard(p)) for p in sorted(out_dir.glob(f"*_{split}_*.bin"))])
    assert tokens[0] == eos  # llm.c layout: EOS before every document
    cuts = np.nonzero(tokens == eos)[0].tolist() + [tokens.size]
    return [tok.decode(tokens[a + 1:b].tolist(), skip_special_tokens=False) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    assert run_build(corpus, out, "--max_tokens", "0", "--keep_tmp") == 0
    return out


def test_shards_decode_back_to_the_documents_in_shuffled_order(corpus, built):
    _, docs, tok = corpus
    expected = expected_split(docs, 3407)
    assert len(expected["val"]) == len(expected["test"]) == 2
    for split in ("train", "val", "test"):
        assert decode_split(built, split, tok) == expected[split], split
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == {"dtype": "uint16", "magic": 20240520, "version": 1, "header_ints": 256}
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 1  # several shards, in order
    assert sum(s["documents"] for s in manifest["shards"]) == N_DOCS
    for s in manifest["shards"]:
        assert read_header(built / s["file"]) == ("uint16", s["tokens"])


def test_split_is_deterministic_per_seed(corpus, built, tmp_path):
    assert run_build(corpus, tmp_path / "same", "--max_tokens", "0") == 0
    for shard in sorted(built.glob("*.bin")):
        assert (tmp_path / "same" / shard.name).read_bytes() == shard.read_bytes()
    assert run_build(corpus, tmp_path / "other", "--max_tokens", "0", "--seed", "1") == 0
    _, docs, tok = corpus
    assert decode_split(tmp_path / "other", "val", tok) == expected_split(docs, 1)["val"]
    assert decode_split(tmp_path / "other", "val", tok) != decode_split(built, "val", tok)


def test_build_resumes_after_an_interruption(corpus, built, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(built, out)
    first = sorted(out.glob("*_train_*.bin"))
    first[1].unlink()                                      # a shard never written
    (out / "tmp" / "file_000001" / "DONE").unlink()         # an input file cut off mid-way
    (out / "tmp" / "file_000001" / "train_000000.tok").write_bytes(b"\x00\x01")  # with a partial piece
    assert run_build(corpus, out, "--max_tokens", "0") == 0
    for shard in sorted(built.glob("*.bin")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert not (out / "tmp").exists()
    # Other settings in the same directory are refused, nothing overwritten.
    assert run_build(corpus, out, "--max_tokens", "0", "--seed", "5") == 2


def test_max_tokens_takes_shuffled_documents_up_to_the_token_count_budget(corpus, tmp_path):
    import pyarrow.parquet as pq

    root, docs, _ = corpus
    assert run_build(corpus, tmp_path, "--max_tokens", "3000") == 0
    counts = np.concatenate([pq.read_table(f)["token_count"].to_numpy() for f in sorted((root / "in").glob("*"))])
    perm = np.random.default_rng(3407).permutation(len(docs))
    cum = np.cumsum(counts[perm])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    taken = manifest["documents_taken"]
    assert cum[taken - 1] >= 3000 > cum[taken - 2]
    assert sum(s["documents"] for s in manifest["shards"]) == taken


def test_a_shard_from_an_independent_llmc_writer_loads(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(tmp_path / "llmc_train_000000.bin", "wb") as f:   # as llm.c's write_datafile does
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    assert np.array_equal(load_shard(tmp_path / "llmc_train_000000.bin"), tokens)
    # ... and ours reads back with a plain numpy reader, as llm.c / modded-nanogpt read them.
    write_shard(tmp_path / "ours.bin", tokens, "uint16")
    raw = (tmp_path / "ours.bin").read_bytes()
    head = np.frombuffer(raw[:1024], dtype=np.int32)
    assert (head[0], head[1], head[2]) == (20240520, 1, 1000)
    assert np.array_equal(np.frombuffer(raw[1024:], dtype=np.uint16), tokens)
    big = np.array([0, 70000, 123456])
    write_shard(tmp_path / "big.bin", big, "uint32")
    assert read_header(tmp_path / "big.bin") == ("uint32", 3)
    assert np.frombuffer((tmp_path / "big.bin").read_bytes()[:8], dtype=np.int32).tolist() == [20240801, 7]
    assert np.array_equal(load_shard(tmp_path / "big.bin"), big)


def test_stream_reads_across_shards_and_windows_wrap(tmp_path):
    write_shard(tmp_path / "x_train_000000.bin", np.arange(10), "uint16")
    write_shard(tmp_path / "x_train_000001.bin", np.arange(10, 25), "uint16")
    stream = TokenStream(sorted(tmp_path.glob("*.bin")))
    assert len(stream) == 25 and stream.read(8, 5).tolist() == [8, 9, 10, 11, 12]
    sampler = WindowSampler(stream, 4)  # (25 - 1) // 4 = 6 windows per pass
    assert sampler.windows(5, 2).tolist() == [[20, 21, 22, 23, 24], [0, 1, 2, 3, 4]]


def test_bad_shards_are_named_in_one_line(tmp_path):
    good = write_shard(tmp_path / "g.bin", np.arange(100), "uint16")
    data = bytearray(good.read_bytes())
    bad_magic = tmp_path / "magic.bin"
    bad_magic.write_bytes(b"\x01\x02\x03\x04" + bytes(data[4:]))
    with pytest.raises(ShardError, match="bad shard header"):
        load_shard(bad_magic)
    truncated = tmp_path / "short.bin"
    truncated.write_bytes(bytes(data[:-10]))
    with pytest.raises(ShardError, match="truncated"):
        load_shard(truncated)
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(ShardError, match="shorter than"):
        read_header(tmp_path / "tiny.bin")


def test_bad_build_input_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    root, docs, tok = corpus
    write_fineweb_parquet(tmp_path / "notext" / "x.parquet", docs[:10], drop_text=True)
    assert build_fwe10bt.main(["--input", str(tmp_path / "notext"), "--out_dir", str(tmp_path / "o1"),
                               "--tokenizer", str(tok), "--workers", "1", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no 'text' column" in err and len(err.splitlines()) == 1
    # A vocabulary of 70,000 ids does not fit uint16 shards.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "<|endoftext|>": 70_001}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    assert build_fwe10bt.main(["--input", str(root / "in"), "--out_dir", str(tmp_path / "o2"), "--tokenizer",
                               str(tmp_path / "big.json"), "--dtype", "uint16", "--workers", "1",
                               "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit uint16" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2").exists()  # refused before anything was written


@pytest.mark.parametrize("prefix", ["../escaped", "a/b", "/abs", ".hidden", "x..y"])
def test_prefix_that_would_leave_out_dir_is_refused(corpus, tmp_path, capsys, prefix):
    root, _, tok = corpus
    assert build_fwe10bt.main(["--input", str(root / "in"), "--out_dir", str(tmp_path / "out"), "--tokenizer",
                               str(tok), "--prefix", prefix, "--workers", "1", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prefix must be a plain file-name stem" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def test_fake_data_command_builds_a_trainable_data_dir(tmp_path, capsys):
    from language_models_100m import fake_data
    from language_models_100m.shards import load_shard

    assert fake_data.main([str(tmp_path / "fake"), "--docs", "600"]) == 0
    shards = tmp_path / "fake" / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokens"]["train"] > 0 and manifest["tokens"]["val"] > 0
    assert len(load_shard(next(shards.glob("*_train_*.bin")))) == manifest["tokens"]["train"]
    assert f"--data_dir {shards}" in capsys.readouterr().out
    assert fake_data.main([str(tmp_path / "bad"), "--docs", "3"]) == 2
    assert "--docs: must be an integer >= 10" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
