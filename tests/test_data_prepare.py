"""data.prepare: round trips, meta.json, the val rule, sources, --force, interruption, the CLI."""

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data.writer
from data.errors import DataError
from data.prepare import main, prepare
from data.shards import HEADER_BYTES, open_split, read_meta
from data.tokenizer import get_tokenizer
from model.cli import run
from model.files import sha256_file

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "",  # an empty document is kept: just its delimiter
    "naïve café, 東京, emoji 🙂 and a\r\nwindows line ending",
    "A literal <|endoftext|> inside a document is text, not the delimiter.",
    "  leading and trailing whitespace \n\n",
] + [f"Document number {i}: " + "lorem ipsum dolor " * (i % 7) for i in range(60)]


def stream_tokens(data_dir) -> np.ndarray:
    """Every token of the dataset, val shards then train shards, as meta.json orders them."""
    meta = read_meta(data_dir)
    return np.concatenate([open_split(data_dir, split).read(0, meta[f"{split}_tokens"]) for split in ("val", "train")])


def decode_documents(data_dir) -> list[str]:
    meta = read_meta(data_dir)
    enc = get_tokenizer(meta["tokenizer"])
    tokens = stream_tokens(data_dir)
    starts = np.flatnonzero(tokens == meta["eot_id"])
    assert starts[0] == 0, "every document, the first included, starts with <|endoftext|>"
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)], strict=True)]


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_round_trip_and_meta(tmp_path, tokenizer):
    out = tmp_path / "ds"
    meta = prepare(out, source=DOCS, tokenizer=tokenizer, shard_tokens=500, val_tokens=250, progress=False)
    assert decode_documents(out) == DOCS
    assert meta == read_meta(out)
    enc = get_tokenizer(tokenizer)
    total = sum(len(enc.encode_ordinary(d)) + 1 for d in DOCS)
    assert (meta["val_tokens"], meta["train_tokens"]) == (250, total - 250)
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (enc.n_vocab, enc.eot_token, "uint16")
    assert meta["documents"] == len(DOCS) and meta["tokenizer"] == tokenizer
    assert [s["split"] for s in meta["shards"]] == ["val"] + ["train"] * (len(meta["shards"]) - 1)
    assert all(s["tokens"] == 500 for s in meta["shards"][1:-1])  # only the last of a split is short
    for shard in meta["shards"]:
        assert sha256_file(out / shard["name"]) == shard["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json"] + [s["name"] for s in meta["shards"]])
    assert not list(tmp_path.glob(".ds.*")), "no temporary directory is left behind"


def test_parallel_workers_give_the_same_bytes(tmp_path):
    docs = [f"doc {i} " + "abc " * (i % 50) for i in range(3000)]
    one = prepare(tmp_path / "one", source=docs, tokenizer="bytes", shard_tokens=40_000, workers=1, progress=False)
    four = prepare(tmp_path / "four", source=docs, tokenizer="bytes", shard_tokens=40_000, workers=4, progress=False)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in four["shards"]]
    assert len(one["shards"]) > 3


def test_default_val_is_ten_percent_or_the_cap(tmp_path, monkeypatch):
    docs = [f"doc {i} " + "xyz " * (i % 13) for i in range(400)]
    total = sum(len(d.encode()) + 1 for d in docs)
    meta = prepare(tmp_path / "a", source=docs, tokenizer="bytes", shard_tokens=1000, progress=False)
    assert meta["val_tokens"] == total // 10  # small corpus: 10%
    # A corpus over 10x the cap: val is the cap, decided mid-stream (the spool is replayed then).
    monkeypatch.setattr(data.writer, "DEFAULT_VAL_CAP", 200)
    meta = prepare(tmp_path / "b", source=docs, tokenizer="bytes", shard_tokens=1000, progress=False)
    assert (meta["val_tokens"], meta["train_tokens"]) == (200, total - 200)
    assert decode_documents(tmp_path / "b") == docs
    assert not (tmp_path / "b" / "stream.spool").exists()


def test_large_vocab_uses_llmc_uint32_variant(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)][:65400]
    tok = tmp_path / "big.tiktoken"
    tok.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    docs = ["\x00\x01 big vocabulary", "more text here"] * 10
    meta = prepare(tmp_path / "ds", source=docs, tokenizer=str(tok), shard_tokens=50, val_tokens=20, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65657
    assert meta["tokenizer"] == "big.tiktoken" and len(meta["tokenizer_sha256"]) == 64
    header = np.fromfile(tmp_path / "ds" / meta["shards"][0]["name"], dtype="<i4", count=3)
    assert header.tolist() == [20240801, 7, 20]
    assert stream_tokens(tmp_path / "ds").max() > 65535
    enc = get_tokenizer(str(tok))
    tokens = stream_tokens(tmp_path / "ds")
    assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + d for d in docs)


def test_local_file_sources(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("para one\nline two\n\n\n  \npara two\n")
    with open(src / "b.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"content": f"json line {i}", "id": i}) + "\n")
    (src / "c.json").write_text(json.dumps([{"content": "array 1"}, {"content": None}, {"content": "array 2"}]))
    pq.write_table(pa.table({"content": ["parquet 1", "parquet 2"], "n": [1, 2]}), src / "sub" / "d.parquet")
    (src / "ignored.csv").write_text("not a source\n")
    (src / ".hidden.txt").write_text("hidden files are skipped")

    prepare(
        tmp_path / "p", source=str(src), tokenizer="bytes", text_field="content", txt_mode="paragraph", progress=False
    )
    assert decode_documents(tmp_path / "p") == [
        "para one\nline two",
        "para two",
        "json line 0",
        "json line 1",
        "json line 2",
        "array 1",
        "array 2",  # null rows are skipped
        "parquet 1",
        "parquet 2",
    ]
    prepare(tmp_path / "f", source=str(src / "*.txt"), tokenizer="bytes", progress=False)
    assert decode_documents(tmp_path / "f") == ["para one\nline two\n\n\n  \npara two\n"]
    with pytest.raises(DataError, match="no field 'text' in .*b.jsonl.*--text-field"):
        prepare(tmp_path / "x", source=str(src / "b.jsonl"), tokenizer="bytes", progress=False)
    with pytest.raises(DataError, match=r"no field 'text' in .*d.parquet; its fields are \['content', 'n'\]"):
        prepare(tmp_path / "x", source=str(src / "sub"), tokenizer="bytes", progress=False)
    (src / "bad.jsonl").write_text('{"content": "fine"}\n{"content": broken\n')
    with pytest.raises(DataError, match="cannot read .*bad.jsonl: .*JSON parse error"):
        prepare(tmp_path / "x", source=str(src / "bad.jsonl"), text_field="content", tokenizer="bytes", progress=False)
    assert not (tmp_path / "x").exists()


def test_source_errors_are_clear_and_early(tmp_path):
    with pytest.raises(DataError, match="not a file, directory or glob that exists"):
        prepare(tmp_path / "x", source=str(tmp_path / "missing.jsonl"), tokenizer="bytes", progress=False)
    started = time.perf_counter()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):  # conftest makes the hub offline
        prepare(tmp_path / "x", source="hf:HuggingFaceFW/fineweb-edu", hf_config="sample-10BT", tokenizer="bytes")
    assert time.perf_counter() - started < 5
    with pytest.raises(DataError, match="no documents"):
        prepare(tmp_path / "x", source=[], tokenizer="bytes", progress=False)
    with pytest.raises(DataError, match="train split is empty"):
        prepare(tmp_path / "x", source=["tiny"], tokenizer="bytes", val_tokens=100, progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_force_replaces_only_a_dataset(tmp_path):
    out = tmp_path / "ds"
    prepare(out, source=["first version"] * 10, tokenizer="bytes", progress=False)
    with pytest.raises(DataError, match="already holds a dataset; pass --force"):
        prepare(out, source=["second version"] * 10, tokenizer="bytes", progress=False)
    prepare(out, source=["second version"] * 10, tokenizer="bytes", force=True, progress=False)
    assert decode_documents(out) == ["second version"] * 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a dataset.*choose another --out"):
        prepare(tmp_path / "mine", source=["x"] * 10, tokenizer="bytes", force=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def _interrupted(docs, after, seen_shards):
    """The documents, until Ctrl-C at document `after`; records how many shards existed by then."""
    for i, doc in enumerate(docs):
        if i == after:
            seen_shards.append(len(list(seen_shards[0].glob(".ds.tmp-*/*_train_*.bin"))))
            raise KeyboardInterrupt
        yield doc


def prepare_until_ctrl_c(out, docs, seen, force=False):
    """A multi-shard prepare that Ctrl-C stops at document 1500 (see _interrupted)."""
    prepare(
        out,
        source=_interrupted(docs, 1500, seen),
        tokenizer="bytes",
        shard_tokens=5000,
        val_tokens=1000,
        workers=1,
        force=force,
        progress=False,
    )


def test_interrupted_run_leaves_nothing_and_keeps_the_old_dataset(tmp_path):
    docs = [f"document {i} " * 20 for i in range(2000)]
    out = tmp_path / "ds"
    seen = [tmp_path]
    with pytest.raises(KeyboardInterrupt):
        prepare_until_ctrl_c(out, docs, seen)
    assert seen[1] > 10, "shards had been written when the run stopped"
    assert not out.exists() and not list(tmp_path.iterdir())
    prepare(out, source=["old"] * 10, tokenizer="bytes", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        prepare_until_ctrl_c(out, docs, seen, force=True)
    assert seen[2] > 10
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_killed_run_never_leaves_a_complete_looking_dataset(tmp_path):
    """SIGKILL mid-run (no cleanup possible): --out does not exist; the next run removes the leftovers."""
    script = f"""
import os, signal
from data.prepare import prepare
def docs():
    for i in range(100_000):
        if i == 3000:
            os.kill(os.getpid(), signal.SIGKILL)
        yield f"document {{i}} " * 20
prepare({str(tmp_path / "ds")!r}, source=docs(), tokenizer="bytes", shard_tokens=20_000, val_tokens=0, workers=1,
        progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "ds").exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".ds.tmp-") and not (leftover / "meta.json").exists()
    assert len(list(leftover.glob("*_train_*.bin"))) > 1  # shards were written, but only in the hidden dir
    with pytest.raises(DataError, match="truncated or corrupt shard: the header says 0 tokens"):
        open_split(leftover, "train")  # even read directly, the shard cut off mid-write reads as incomplete
    prepare(tmp_path / "ds", source=["fresh"] * 10, tokenizer="bytes", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


# A child that replaces tmp/ds with --force and SIGKILLs itself at one point of the publish: while the
# shards are written, right after the exchange of the two names, or between the two renames of the
# fallback (model.files moves the old dataset aside, then the new one in).
KILL_DURING_FORCE = """
import os, signal, sys
from pathlib import Path
from model import files
from data.prepare import prepare

point, out = sys.argv[1], Path(sys.argv[2])
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)

def docs():
    for i in range(3000):
        if point == "writing" and i == 2000:
            kill()
        yield f"new document {i} " * 5

if point == "after exchange":
    exchange = files._exchange
    files._exchange = lambda a, b: exchange(a, b) and kill()
if point == "between renames":
    files._exchange = lambda a, b: False
    replace = os.replace
    def os_replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the second rename: the new one into place
            kill()
        return replace(src, dst)
    os.replace = os_replace
prepare(out, source=docs(), tokenizer="bytes", shard_tokens=20_000, val_tokens=1000, workers=1, force=True,
        progress=False)
"""


@pytest.mark.parametrize("then", ["read", "prepare"])
@pytest.mark.parametrize("point", ["writing", "after exchange", "between renames"])
def test_force_killed_leaves_the_old_or_the_new_dataset(tmp_path, point, then):
    """SIGKILL of `prepare --force` at any point: the dataset is the old one or the new one, complete.
    The next read or prepare puts back a dataset the kill left aside (so a prepare without --force still
    refuses to replace it), and the next prepare leaves no leftovers."""
    from model import files

    probe = [tmp_path / "p1", tmp_path / "p2"]
    for p in probe:
        p.mkdir()
    if point == "after exchange" and not files._exchange(*probe):
        pytest.skip("this filesystem or OS cannot exchange two names atomically")
    for p in probe:
        p.rmdir()
    out = tmp_path / "ds"
    old, new = ["old document"] * 50, [f"new document {i} " * 5 for i in range(3000)]
    prepare(out, source=old, tokenizer="bytes", progress=False)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_FORCE, point, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    if point == "between renames":  # the moment the fallback is exposed: no dataset under its name
        assert not out.exists() and any(n.startswith(".ds.old-") for n in names), names
    if then == "prepare":
        with pytest.raises(DataError, match="already holds a dataset; pass --force"):
            prepare(out, source=["fresh"] * 10, tokenizer="bytes", progress=False)
    assert decode_documents(out) == (new if point == "after exchange" else old)
    assert not [n for n in tmp_path.iterdir() if ".old-" in n.name]
    prepare(out, source=["fresh"] * 10, tokenizer="bytes", force=True, progress=False)
    assert decode_documents(out) == ["fresh"] * 10
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_embedded_corpus_prepares_offline(tmp_path, tokenizer):
    from pydoc_data.topics import topics

    out = tmp_path / "pydoc"
    meta = prepare(out, source="pydoc", tokenizer=tokenizer, progress=False)
    assert meta["documents"] == len(topics) > 50
    assert meta["val_tokens"] == (meta["train_tokens"] + meta["val_tokens"]) // 10
    assert decode_documents(out) == [topics[k] for k in sorted(topics)]


def test_cli_end_to_end_and_user_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "data.prepare", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok = run("--source", "pydoc", "--tokenizer", "bytes", "--out", "ds", "--shard-tokens", "100_000")
    assert ok.returncode == 0, ok.stderr
    assert "documents" in ok.stderr and "tokens/s" in ok.stderr  # the summary
    meta = read_meta(tmp_path / "ds")
    assert meta["command"].startswith("python -m data.prepare --source pydoc")
    assert len(meta["shards"]) == -(-meta["val_tokens"] // 100_000) + -(-meta["train_tokens"] // 100_000)
    for args, message in [
        (("--tokenizer", "bytes", "--out", "ds"), "already holds a dataset; pass --force"),
        (("--source", "nope/*.jsonl", "--tokenizer", "bytes", "--out", "x"), "no .txt"),
        (("--tokenizer", "nonsense", "--out", "y"), "unknown tokenizer 'nonsense'"),
        (("--tokenizer", "bytes", "--out", "z", "--workers", "0"), "workers must be a positive integer"),
    ]:
        proc = run(*args)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_main_in_process_is_one_line_and_exit_2(tmp_path, capsys):
    args = ["--source", str(tmp_path / "missing"), "--tokenizer", "bytes", "--out", str(tmp_path / "o")]
    assert run(main, args, prog="data.prepare") == 2
    assert "data.prepare: error:" in capsys.readouterr().err
    # A dataset made in-process records how it was made.
    meta = prepare(tmp_path / "ds", source=["a", "b"] * 10, tokenizer="bytes", progress=False)
    assert meta["command"].startswith("data.prepare.prepare(")
    assert (tmp_path / "ds" / meta["shards"][0]["name"]).stat().st_size == HEADER_BYTES + 2 * meta["val_tokens"]
