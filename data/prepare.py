"""`python -m data.prepare`: documents -> tokens -> llm.c shards + meta.json.

    python -m data.prepare --source pydoc --tokenizer bytes --out datasets/pydoc-bytes
    python -m data.prepare --source 'corpus/**/*.jsonl' --text-field content --tokenizer gpt2
    python -m data.prepare --source hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out datasets/edu

Documents are tokenized in parallel by a pool of threads (data/encode.py), or, for a large source of
several files (a sharded hub dataset), by a process per file (data/encode_files.py), each one prefixed by
<|endoftext|> as llm.c does, and streamed to disk: at most a few batches of documents are in flight, so
memory does not grow with the corpus. The first --val-tokens tokens become the val shards (default:
min(10,485,760, 10% of the corpus)), the rest the train shards.

Everything is written into a hidden temporary directory beside --out, meta.json last, and published
by model.files.atomic_dir: an interrupted run leaves no dataset behind, and an existing dataset is
replaced only with --force, in one atomic exchange of names once the new one is complete (where the
filesystem cannot exchange, a crash between its two renames is undone by the next prepare or read).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from data.encode import encode_stream
from data.encode_files import encode_files, remote_hub, start_worker_server, worth_processes
from data.errors import DataError
from data.shards import MAX_SHARD_TOKENS, META_NAME, SHARD_RE, dtype_name, token_dtype
from data.sources import (
    HF_PREFIX,
    PYDOC,
    TXT_MODES,
    exit_after_streaming,
    open_source,
    source_parts,
    source_slug,
)
from data.tokenizer import get_tokenizer, tokenizer_record
from data.writer import ShardWriter, SplitRouter
from model.cli import run
from model.files import atomic_dir, recover

DEFAULT_SHARD_TOKENS = 100_000_000
_SPOOL_NAME = "stream.spool"  # SplitRouter's spool: tokens wait there until the default val size is known


def prepare(
    out: str | Path,
    *,
    source: str | Iterable[str] = PYDOC,
    tokenizer: str = "gpt2",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int | None = None,
    workers: int | None = None,
    force: bool = False,
    text_field: str = "text",
    txt_mode: str = "file",
    hf_config: str | None = None,
    hf_split: str = "train",
    max_documents: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Tokenize `source` (a --source string, or any iterable of str) into a dataset at `out`.

    Returns the meta dict also written to `out/meta.json`. Raises DataError for anything the caller
    can fix (unknown tokenizer, missing files, existing output without `force`, empty corpus).
    """
    workers = _cpu_count() if workers is None else workers
    _check_positive(shard_tokens=shard_tokens, workers=workers)
    _check_positive(max_documents=max_documents, allow_none=True)
    if shard_tokens > MAX_SHARD_TOKENS:
        raise DataError(f"shard_tokens is at most {MAX_SHARD_TOKENS:,} (the header's count is an int32)")
    if val_tokens is not None and val_tokens < 0:
        raise DataError(f"val_tokens must be >= 0, not {val_tokens}")
    out = Path(out)
    recover(out)  # a dataset that a killed --force had moved aside goes back before it is looked at
    _check_out(out, force)
    # a source of several files is read and tokenized by processes, one file each
    parallel = isinstance(source, str) and workers > 1 and txt_mode in TXT_MODES and worth_processes(source)
    if parallel and not remote_hub(source):  # (a remote one may yet be unreachable: no server for nothing)
        start_worker_server()  # its imports run while this process loads the tokenizer and resolves the source
    enc = get_tokenizer(tokenizer)
    spec, spec_sha = tokenizer_record(tokenizer)
    parts = None
    if parallel:
        parts = source_parts(source, text_field=text_field, txt_mode=txt_mode, hf_config=hf_config, hf_split=hf_split)
    if parts is not None:
        docs = None
    elif isinstance(source, str):
        docs = open_source(source, text_field=text_field, txt_mode=txt_mode, hf_config=hf_config, hf_split=hf_split)
    else:
        docs = iter(source)
    if docs is not None and max_documents is not None:
        docs = itertools.islice(docs, max_documents)

    started = time.perf_counter()
    with atomic_dir(out, overwrite=True) as tmp:  # _check_out allowed replacing what is there
        writer = ShardWriter(tmp, source_slug(source), token_dtype(enc.n_vocab), shard_tokens)
        router = SplitRouter(writer, val_tokens, tmp / _SPOOL_NAME)
        try:
            if parts is not None:
                n_docs = encode_files(router, tmp, parts, tokenizer, workers, progress, max_documents)
            else:
                n_docs = encode_stream(router, docs, enc, workers, progress)
            shards = router.close()
        except BaseException:
            router.abort()
            raise
        train = sum(s["tokens"] for s in shards if s["split"] == "train")
        val = sum(s["tokens"] for s in shards if s["split"] == "val")
        if n_docs == 0:
            raise DataError(f"source {source!r} has no documents")
        if train == 0:
            raise DataError(
                f"the train split is empty: the corpus has {val:,} tokens, all taken by val; lower --val-tokens"
            )
        meta = {
            "format": "llm.c",
            "tokenizer": spec,
            "tokenizer_sha256": spec_sha,
            "vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token,
            "dtype": dtype_name(token_dtype(enc.n_vocab)),
            "shards": shards,
            "documents": n_docs,
            "train_tokens": train,
            "val_tokens": val,
            "shard_tokens": shard_tokens,
            "source": source if isinstance(source, str) else "<iterable>",
            "text_field": text_field,
            "command": command or _call_repr(out, source, tokenizer, shard_tokens, val_tokens, max_documents),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if progress:
        seconds = time.perf_counter() - started
        n_train = sum(s["split"] == "train" for s in shards)
        print(
            f"{n_docs:,} documents, {train + val:,} tokens ({train:,} train in {n_train} shards, {val:,} val in "
            f"{len(shards) - n_train} shards) -> {out} in {seconds:.1f}s ({(train + val) / seconds:,.0f} tokens/s)",
            file=sys.stderr,
        )
    return meta


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise DataError(f"{out} already holds a dataset; pass --force to replace it, or choose another --out")
    entries = list(out.iterdir())
    if not all(p.is_file() and (p.name == META_NAME or SHARD_RE.match(p.name)) for p in entries):
        raise DataError(
            f"{out} holds files that are not a dataset ({', '.join(sorted(p.name for p in entries)[:5])}...); "
            f"--force only replaces datasets made by data.prepare: choose another --out"
        )


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_positive(allow_none: bool = False, **values: int | None) -> None:
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, not {value!r}")


def _call_repr(out, source, tokenizer, shard_tokens, val_tokens, max_documents) -> str:
    src = source if isinstance(source, str) else "<iterable>"
    return (
        f"data.prepare.prepare({str(out)!r}, source={src!r}, tokenizer={tokenizer!r}, shard_tokens={shard_tokens}, "
        f"val_tokens={val_tokens}, max_documents={max_documents})"
    )


def default_out(source: str, tokenizer: str) -> Path:
    """datasets/SOURCE-TOKENIZER, e.g. datasets/pydoc-bytes."""
    return Path("datasets") / f"{source_slug(source)}-{source_slug(Path(tokenizer).name.removesuffix('.tiktoken'))}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize documents into llm.c token shards (uint16/uint32) plus meta.json.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("source")
    src.add_argument(
        "--source",
        default=PYDOC,
        help=f"`{PYDOC}` (embedded Python docs, default), a .txt/.jsonl/"
        f".json/.parquet file, directory or glob, or {HF_PREFIX}NAME (Hugging Face hub, streamed)",
    )
    src.add_argument(
        "--text-field",
        default="text",
        help="field holding the text in jsonl/json/parquet/hub rows (default: %(default)s)",
    )
    src.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="file",
        help="a .txt file is one document, or one per blank-line-separated block",
    )
    src.add_argument("--hf-config", default=None, help="hub dataset config (subset), e.g. sample-10BT")
    src.add_argument("--hf-split", default="train", help="hub dataset split (default: %(default)s)")
    src.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    dst = parser.add_argument_group("output")
    dst.add_argument(
        "--tokenizer",
        default="gpt2",
        help="bytes, a tiktoken name (gpt2, cl100k_base, ...) or a .tiktoken file (default: %(default)s)",
    )
    dst.add_argument("--out", type=Path, default=None, help="dataset directory (default: datasets/SOURCE-TOKENIZER)")
    dst.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default: %(default)s)"
    )
    dst.add_argument(
        "--val-tokens",
        type=int,
        default=None,
        help="tokens at the start of the stream that form val (default: min(10485760, 10%% of corpus))",
    )
    dst.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    dst.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    dst.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        out = args.out or default_out(args.source, args.tokenizer)
        prepare(
            out,
            source=args.source,
            tokenizer=args.tokenizer,
            shard_tokens=args.shard_tokens,
            val_tokens=args.val_tokens,
            workers=args.workers,
            force=args.force,
            text_field=args.text_field,
            txt_mode=args.txt_mode,
            hf_config=args.hf_config,
            hf_split=args.hf_split,
            max_documents=args.max_documents,
            progress=not args.quiet,
            command=shlex.join(["python", "-m", "data.prepare", *argv]),
        )
    except OSError as e:  # disk full, permission denied: also the user's to fix
        raise DataError(str(e)) from None


if __name__ == "__main__":
    # Only for this process (not for callers of main() in theirs): it never hands tensors to datasets, whose
    # first streaming dataset would otherwise import torch (seconds of start-up) to look for DataLoader
    # workers; and datasets logs read errors before raising them, which we report once, ourselves.
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    code = run(main, prog="data.prepare", interrupted="data.prepare: interrupted; nothing was written")
    if any(a.removeprefix("--source=").startswith(HF_PREFIX) for a in sys.argv[1:]):
        exit_after_streaming(code)  # the shards and meta.json are written; see exit_after_streaming
    sys.exit(code)
