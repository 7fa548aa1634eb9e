"""The `hf:` source, offline: local directories laid out like hub dataset repositories (parquet shards, JSONL,
configs declared in README.md), read by datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True) through
the same code path as the hub, with --hf-config, --hf-split, --text-field and --max-documents."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import fresh_interpreter

from data.errors import DataError
from data.prepare import main, prepare
from data.shards import open_split, read_meta
from model.cli import run

README = """---
configs:
- config_name: web
  data_files:
  - split: train
    path: web/train-*.parquet
  - split: validation
    path: web/validation-*.parquet
---
# a local dataset repository
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hubrepo")  # a parquet repository with a config (one format per repo, as on the hub)
    (root / "README.md").write_text(README)
    (root / "web").mkdir()
    jsonl = tmp_path_factory.mktemp("jsonlrepo")  # a JSONL repository without a README: the default config
    (jsonl / "data").mkdir()
    docs = {
        "train": [f"web page {i}: " + "words " * (i % 7) for i in range(30)],
        "validation": ["held out 0", "held out 1"],
    }
    for i in range(3):  # three parquet shards of the train split, 10 rows each
        rows = docs["train"][i * 10 : (i + 1) * 10]
        pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}), root / "web" / f"train-{i:05d}.parquet")
    pq.write_table(pa.table({"text": docs["validation"]}), root / "web" / "validation-00000.parquet")
    code = [f"def f{i}():\n    return {i}\n" for i in range(12)]
    for i in range(2):
        rows = code[i * 6 : (i + 1) * 6]
        (jsonl / "data" / f"train-{i:05d}.jsonl").write_text("".join(json.dumps({"content": c}) + "\n" for c in rows))
    return root, docs, code, jsonl


def documents(out) -> list[str]:
    """The documents of a bytes-tokenized dataset: its val + train streams split at <|endoftext|> (256)."""
    meta = read_meta(out)
    tokens = np.concatenate(
        [open_split(out, sp).read(0, meta[f"{sp}_tokens"]) for sp in ("val", "train") if meta[f"{sp}_tokens"]]
    )
    docs, cur = [], []
    for t in tokens.tolist():
        if t == 256:
            if cur or docs:
                docs.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t)
    docs.append(bytes(cur).decode())
    return docs[1:] if docs and docs[0] == "" else docs


def test_parquet_shards_with_config_and_split(repo, tmp_path):
    root, docs, _, _ = repo
    out = tmp_path / "web"
    meta = prepare(out, source=f"hf:{root}", hf_config="web", tokenizer="bytes", val_tokens=0, progress=False)
    assert meta["documents"] == 30 and documents(out) == docs["train"], "all three shards, in file order"
    val = tmp_path / "val"
    prepare(
        val,
        source=f"hf:{root}",
        hf_config="web",
        hf_split="validation",
        tokenizer="bytes",
        val_tokens=0,
        progress=False,
    )
    assert documents(val) == docs["validation"]
    few = tmp_path / "few"
    assert (
        prepare(
            few, source=f"hf:{root}", hf_config="web", max_documents=4, tokenizer="bytes", val_tokens=0, progress=False
        )["documents"]
        == 4
    )
    assert documents(few) == docs["train"][:4]


def test_jsonl_config_with_text_field_from_the_command_line(repo, tmp_path):
    _, _, code, jsonl = repo
    out = tmp_path / "code"
    main(
        [
            "--source",
            f"hf:{jsonl}",
            "--hf-split",
            "train",
            "--text-field",
            "content",
            "--max-documents",
            "8",
            "--tokenizer",
            "bytes",
            "--val-tokens",
            "0",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert documents(out) == code[:8]


def test_hf_errors_are_one_line(repo, tmp_path, capsys):
    root, _, _, _ = repo
    with pytest.raises(DataError, match=r"cannot open hf:.* \(config 'nope'"):
        prepare(tmp_path / "a", source=f"hf:{root}", hf_config="nope", tokenizer="bytes", progress=False)
    with pytest.raises(DataError, match="no field 'content'"):
        prepare(
            tmp_path / "b",
            source=f"hf:{root}",
            hf_config="web",
            text_field="content",
            tokenizer="bytes",
            progress=False,
        )
    assert run(main, ["--source", "hf:someone/not-a-local-dir", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.slow  # worker processes
def test_files_are_tokenized_in_parallel_processes_with_the_same_output(repo, tmp_path, monkeypatch):
    """workers > 1 on a source of several files: one process per file (the first files by threads while they
    start), shards byte-identical to one stream's, --max-documents cutting inside a file included."""
    import data.encode_files
    import data.prepare

    monkeypatch.setattr(data.encode_files, "_PARALLEL_MIN_BYTES", 0)  # these files are tiny: use processes anyway
    monkeypatch.setattr(data.encode_files, "_SPOOL_READ_TOKENS", 7)  # spools routed in many pieces, cuts across them
    serial = data.prepare.encode_stream

    def only_one_worker(*args):
        assert args[3] == 1, "with workers > 1 the files go to processes, not to the one-stream path"
        return serial(*args)

    monkeypatch.setattr(data.prepare, "encode_stream", only_one_worker)
    root, docs, _, jsonl = repo
    # (source, files first tokenized by the main process while the workers start)
    cases = [
        (dict(source=f"hf:{root}", hf_config="web", max_documents=14), 1),  # cut in the second file, by a worker
        (dict(source=f"hf:{root}", hf_config="web", max_documents=4), 0),  # in the first file, by a worker
        (dict(source=str(jsonl / "data"), text_field="content", max_documents=7), 1),  # local files
    ]
    for i, (case, head_start) in enumerate(cases):
        monkeypatch.setattr(data.encode_files, "_HEAD_START_FILES", head_start)
        metas = [
            prepare(tmp_path / f"{i}-{w}", tokenizer="bytes", val_tokens=50, workers=w, progress=False, **case)
            for w in (1, 2)
        ]
        assert metas[0]["documents"] == metas[1]["documents"] == case.get("max_documents", 30)
        assert [s["sha256"] for s in metas[0]["shards"]] == [s["sha256"] for s in metas[1]["shards"]]
        assert not list((tmp_path / f"{i}-2").glob(".part-*")), "no spool file is left in the dataset"
    assert documents(tmp_path / "0-2") == docs["train"][:14]
    assert documents(tmp_path / "1-2") == docs["train"][:4]


# The RSS check of data/bench.py (peak RSS at 1x and at Nx the corpus), applied to an hf: source: fresh processes
# stream one parquet shard (8e6 characters) and all eight (64e6) of a hub-layout repository, and report their peak
# RSS (VmHWM) over what they had once imports and datasets' modules were warm (a first read of a 16-row split).
# Arrow allocates from the system allocator here: its default pools keep freed memory, which made the same read
# peak 18 MiB higher or lower from run to run. Streaming measured +18 MiB for one shard, +21..22 for eight. A read
# that held the text (a list of the documents, or a reader that loads a split before it yields: hub_documents
# returning iter(list(...)) fails this test) holds 56e6 bytes = 53 MiB more at 8x (an ASCII str takes a byte per
# character). The bound on the difference sits between them.
_RSS_CHARS = 64_000_000
_RSS_FILES = 8
_RSS_BOUND_MIB = 24
_RSS_README = """---
configs:
- config_name: all
  data_files:
  - {split: train, path: big/train-*.parquet}
  - {split: test, path: big/test-*.parquet}
- config_name: one
  data_files:
  - {split: train, path: big/train-00000.parquet}
  - {split: test, path: big/test-*.parquet}
---
"""
_RSS_CHILD = """
import json, sys
from data.bench import peak_rss_mib  # VmHWM: this process's own peak, not its parent's
from data.sources import exit_after_streaming, open_source

for doc in open_source("hf:" + sys.argv[1], hf_config=sys.argv[2], hf_split="test"):  # warm up
    pass
before, chars = peak_rss_mib(), 0
for doc in open_source("hf:" + sys.argv[1], hf_config=sys.argv[2]):
    chars += len(doc)
print(json.dumps({"chars": chars, "growth_mib": peak_rss_mib() - before}))
exit_after_streaming(0)  # as python -m data.prepare --source hf:... ends
"""


@pytest.mark.slow  # fresh processes stream 72 MB of text
def test_streaming_a_hub_repository_keeps_memory_flat(tmp_path):
    """hf: on a local repository of 8 parquet shards (64 MB of text, 31 MB on disk): streaming all of them raises
    peak RSS by less than 24 MiB more than streaming one, where holding the text would add 53 MiB or more."""
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "README.md").write_text(_RSS_README)
    (tmp_path / "big").mkdir()
    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(0)
    for i in range(_RSS_FILES):
        docs, chars = [], 0
        while chars < _RSS_CHARS // _RSS_FILES:
            docs.append("\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 30))))
            chars += len(docs[-1])
        table = pa.table({"text": docs})
        pq.write_table(table, tmp_path / "big" / f"train-{i:05d}.parquet", row_group_size=200)
        pq.write_table(table.slice(0, 2), tmp_path / "big" / f"test-{i:05d}.parquet")
    # USE_TORCH=0 as the CLI runs; a fresh interpreter: its peak RSS and its teardown are the subject
    env = {**fresh_interpreter(), "USE_TORCH": "0", "ARROW_DEFAULT_MEMORY_POOL": "system"}
    runs = {}
    # "all" three times: an Arrow worker that outlived the interpreter's teardown aborted about one such
    # run in three ("terminate called without an active exception", exit -6) before exit_after_streaming.
    for config in ("one", "all", "all", "all"):
        cmd = [sys.executable, "-c", _RSS_CHILD, str(tmp_path), config]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
        runs[config] = json.loads(proc.stdout.splitlines()[-1])
    assert runs["all"]["chars"] >= _RSS_CHARS > 7 * runs["one"]["chars"], "one shard, then all eight, were read"
    extra = runs["all"]["growth_mib"] - runs["one"]["growth_mib"]
    assert extra < _RSS_BOUND_MIB, f"8x the text took {extra:.0f} MiB more peak RSS than 1x ({runs}): not streamed"
