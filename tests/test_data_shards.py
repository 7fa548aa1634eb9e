"""The shard format: llm.c's published layout both ways, nanoGPT's raw .bin, and corrupt files."""

import json

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.loader import BatchLoader
from data.prepare import prepare
from data.shards import HEADER_BYTES, open_shard, open_split, read_header, read_meta, verify_dataset


def write_llmc(path, tokens, magic=20240520, version=1, dtype="<u2"):
    """A token file exactly as llm.c's dev/data/data_common.py write_datafile lays it out."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


DOCS = ["First document.", "Second one, a bit longer than the first.", "Third: ünïcödé 🙂"] * 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "ds"
    prepare(out, source=DOCS, tokenizer="bytes", shard_tokens=700, val_tokens=300, progress=False)
    return out


def test_our_headers_are_llmc_headers(dataset):
    meta = read_meta(dataset)
    assert len(meta["shards"]) >= 3
    for shard in meta["shards"]:
        raw = (dataset / shard["name"]).read_bytes()
        header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
        assert (header[0], header[1], header[2]) == (20240520, 1, shard["tokens"])
        assert not header[3:].any()
        assert len(raw) == HEADER_BYTES + 2 * shard["tokens"]
    assert [s["split"] for s in meta["shards"]][0] == "val"
    assert meta["shards"][0]["name"].endswith("_val_000000.bin")
    assert meta["shards"][1]["name"].endswith("_train_000001.bin")
    verify_dataset(dataset)


def test_reads_a_published_llmc_layout_without_meta(tmp_path):
    rng = np.random.default_rng(0)
    val, train1, train2 = (rng.integers(0, 50257, n) for n in (300, 1000, 777))
    write_llmc(tmp_path / "fineweb_val_000000.bin", val)
    write_llmc(tmp_path / "fineweb_train_000001.bin", train1)
    write_llmc(tmp_path / "fineweb_train_000002.bin", train2)
    meta = read_meta(tmp_path)
    assert meta["synthesized"] and meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert (meta["train_tokens"], meta["val_tokens"]) == (1777, 300)
    stream = open_split(tmp_path, "train")
    assert np.array_equal(stream.read(0, 1777), np.concatenate([train1, train2]))
    assert np.array_equal(stream.read(990, 20), np.concatenate([train1[990:], train2[:10]]))  # crosses shards
    assert np.array_equal(open_split(tmp_path, "val").read(0, 300), val)
    ((x, y),) = BatchLoader(tmp_path, seq_len=100, tokens_per_step=400, micro_batch=4).next_step()
    assert x.shape == (4, 100) and torch.equal(x[:, 1:], y[:, :-1])


def test_uint32_variant(tmp_path):
    tokens = np.array([0, 70000, 128255, 5], dtype=np.int64)
    write_llmc(tmp_path / "x_train_000000.bin", tokens, magic=20240801, version=7, dtype="<u4")
    assert read_header(tmp_path / "x_train_000000.bin") == (np.dtype("<u4"), 4)
    assert open_shard(tmp_path / "x_train_000000.bin").tolist() == tokens.tolist()
    with pytest.raises(DataError, match="uint32 llm.c shards but no meta.json"):
        read_meta(tmp_path)


def test_nanogpt_raw_bin(tmp_path):
    train = np.arange(5000, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    np.arange(800, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match="nanogpt=True"):
        open_split(tmp_path, "train")  # headerless files are only read when asked
    meta = read_meta(tmp_path, nanogpt=True)
    assert (meta["train_tokens"], meta["val_tokens"], meta["dtype"]) == (5000, 800, "uint16")
    loader = BatchLoader(tmp_path, seq_len=64, tokens_per_step=64 * 8, micro_batch=8, nanogpt=True)
    ((x, y),) = loader.next_step()
    assert np.array_equal(y.numpy(), x.numpy() + 1)  # arange tokens: y is x shifted by one
    assert set(x[:, 0].tolist()) <= set(range(0, 5000, 64))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    from data.shards import open_nanogpt_bin

    with pytest.raises(DataError, match="odd.bin.*truncated"):
        open_nanogpt_bin(tmp_path / "odd.bin")


def _copy(dataset, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target, read_meta(target)["shards"][1]["name"]


def test_truncated_shard(dataset, tmp_path):
    ds, name = _copy(dataset, tmp_path)
    raw = (ds / name).read_bytes()
    (ds / name).write_bytes(raw[:-7])
    with pytest.raises(DataError, match=f"{name}: truncated or corrupt shard"):
        BatchLoader(ds, seq_len=8, tokens_per_step=32, micro_batch=4)
    (ds / name).write_bytes(raw[:100])
    with pytest.raises(DataError, match=f"{name}: truncated shard: 100 bytes"):
        open_split(ds, "train")


def test_wrong_magic_and_version(dataset, tmp_path):
    ds, name = _copy(dataset, tmp_path)
    raw = bytearray((ds / name).read_bytes())
    bad = raw.copy()
    bad[0:4] = np.array([12345], dtype="<i4").tobytes()
    (ds / name).write_bytes(bad)
    with pytest.raises(DataError, match=f"{name}: not a token shard \\(magic 12345"):
        open_split(ds, "train")
    bad = raw.copy()
    bad[4:8] = np.array([7], dtype="<i4").tobytes()
    (ds / name).write_bytes(bad)
    with pytest.raises(DataError, match=f"{name}: corrupt shard header: version 7"):
        open_split(ds, "train")


def test_corrupt_count_content_and_meta(dataset, tmp_path):
    ds, name = _copy(dataset, tmp_path)
    raw = bytearray((ds / name).read_bytes())
    raw[8:12] = np.array([5], dtype="<i4").tobytes()  # header count no longer matches the size
    (ds / name).write_bytes(raw)
    with pytest.raises(DataError, match=f"{name}: truncated or corrupt shard: the header says 5 tokens"):
        open_split(ds, "train")
    # A valid shard of another length in its place: caught by meta.json's token counts.
    write_llmc(ds / name, np.arange(10))
    with pytest.raises(DataError, match=f"{name}: holds 10 tokens but meta.json says"):
        open_split(ds, "train")
    # Flipped token bytes keep header and size: caught by the sha256 check.
    ds2, name2 = _copy(dataset, tmp_path / "b")
    raw = bytearray((ds2 / name2).read_bytes())
    raw[HEADER_BYTES + 10] ^= 0xFF
    (ds2 / name2).write_bytes(raw)
    with pytest.raises(DataError, match=f"{name2}: sha256 differs"):
        verify_dataset(ds2)
    (ds2 / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json: unreadable"):
        read_meta(ds2)


def test_meta_dtype_and_vocab_checks(dataset, tmp_path):
    ds, name = _copy(dataset, tmp_path)
    with pytest.raises(DataError, match="ids up to 256.*vocab_size is 100"):
        BatchLoader(ds, seq_len=8, tokens_per_step=32, micro_batch=4, vocab_size=100)
    meta = json.loads((ds / "meta.json").read_text())
    meta["dtype"] = "uint32"
    (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="holds uint16 tokens but meta.json says uint32"):
        open_split(ds, "train")


def test_missing_dataset_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match="does not exist; make it with python -m data.prepare"):
        read_meta(tmp_path / "nope")
    with pytest.raises(DataError, match="no meta.json and no"):
        open_split(tmp_path, "train")


def test_reading_a_dataset_being_prepared_leaves_the_preparation_alone(tmp_path):
    """A read of a dataset that does not exist yet (training started while data.prepare still runs)
    must not touch data.prepare's hidden directory."""
    building = tmp_path / ".ds.tmp-host-123"
    building.mkdir()
    (building / "x_train_000000.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "ds")
    assert (building / "x_train_000000.bin").is_file()
