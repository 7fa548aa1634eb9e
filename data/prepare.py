"""`python -m data.prepare`: documents -> tokens -> llm.c shards + meta.json.

    python -m data.prepare --source pydoc --tokenizer bytes --out datasets/pydoc-bytes
    python -m data.prepare --source 'corpus/**/*.jsonl' --text-field content --tokenizer gpt2
    python -m data.prepare --source hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out datasets/edu

Documents are tokenized in parallel by a pool of threads (tiktoken releases the GIL while it encodes), or,
for a large source of several files (a sharded hub dataset), by a process per file (see _write_shards_parallel),
each one prefixed by <|endoftext|> as llm.c does, and streamed to disk: at most a few batches of
documents are in flight, so memory does not grow with the corpus. The first --val-tokens tokens become
the val shards (default: min(10,485,760, 10% of the corpus)), the rest the train shards.

Everything is written into a hidden temporary directory beside --out, meta.json last, and published
by model.files.atomic_dir: an interrupted run leaves no dataset behind, and an existing dataset is
replaced only with --force, in one atomic exchange of names once the new one is complete (where the
filesystem cannot exchange, a crash between its two renames is undone by the next prepare or read).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shlex
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from data.errors import DataError
from data.shards import MAX_SHARD_TOKENS, META_NAME, SHARD_RE, dtype_name, token_dtype
from data.sources import (
    HF_PREFIX,
    PYDOC,
    TXT_MODES,
    exit_after_streaming,
    local_files,
    open_source,
    part_documents,
    source_parts,
    source_slug,
)
from data.tokenizer import get_tokenizer, tokenizer_record
from data.writer import ShardWriter, SplitRouter
from model.cli import run
from model.files import atomic_dir, recover

DEFAULT_SHARD_TOKENS = 100_000_000
_BATCH_CHARS = 1 << 17  # characters per tokenization task: large enough to amortize the hand-off
_BATCH_DOCS = 1024
_SPOOL_NAME = "stream.spool"
_SPOOL_READ_TOKENS = 1 << 22  # tokens of a worker's spool routed at a time (8 MB of uint16)
_HEAD_START_FILES = None  # files the main process may tokenize while the workers start (None: no limit)
_PARALLEL_MIN_BYTES = 32 << 20  # a multi-file source this large is read by a process per file


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
    parallel = isinstance(source, str) and workers > 1 and txt_mode in TXT_MODES and _worth_processes(source)
    if parallel and not _remote_hub(source):  # (a remote one may yet be unreachable: no server for nothing)
        _start_worker_server()  # its imports run while this process loads the tokenizer and resolves the source
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
        if parts is not None:
            shards, n_docs = _write_shards_parallel(
                parts, tokenizer, tmp, source_slug(source), shard_tokens, val_tokens, workers, progress, max_documents
            )
        else:
            shards, n_docs = _write_shards(
                docs, enc, tmp, source_slug(source), shard_tokens, val_tokens, workers, progress
            )
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


def encode_documents(enc: tiktoken.Encoding, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The tokens of `texts`, each document prefixed by <|endoftext|> (llm.c's convention), as one array.

    Special-token text inside a document is encoded as ordinary text, so the only eot ids in a dataset
    are the delimiters.
    """
    encoded = [_encode_ordinary(enc, text) for text in texts]
    tokens = np.empty(len(texts) + sum(len(e) for e in encoded), dtype=dtype)  # (n_tokens,)
    pos = 0
    for e in encoded:
        tokens[pos] = enc.eot_token
        tokens[pos + 1 : pos + 1 + len(e)] = e
        pos += 1 + len(e)
    return tokens


def _encode_ordinary(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    # encode_to_numpy skips building a Python int per token; with nothing allowed or disallowed it is
    # encode_ordinary. Lone surrogates (from JSON escapes) are replaced as encode_ordinary does.
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, disallowed_special=())


def _write_shards(
    docs: Iterator[str],
    enc: tiktoken.Encoding,
    directory: Path,
    prefix: str,
    shard_tokens: int,
    val_tokens: int | None,
    workers: int,
    progress: bool,
) -> tuple[list[dict], int]:
    dtype = token_dtype(enc.n_vocab)
    router = SplitRouter(ShardWriter(directory, prefix, dtype, shard_tokens), val_tokens, directory / _SPOOL_NAME)
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress, smoothing=0.1)
    try:
        n_docs = _encode_into(router, docs, enc, workers, bar)
        shards = router.close()
    except BaseException:
        router.abort()
        raise
    finally:
        bar.close()
    return shards, n_docs


def _encode_into(router: SplitRouter, docs: Iterator[str], enc: tiktoken.Encoding, workers: int, bar: tqdm) -> int:
    """Tokenize `docs` on `workers` threads (tiktoken releases the GIL while it encodes) into `router`, in
    order; returns the number of documents."""
    dtype = token_dtype(enc.n_vocab)
    n_docs = 0
    # In order: futures are drained oldest first, so the token stream follows the document order; at most
    # 2 * workers batches wait, which bounds memory and keeps every thread busy.
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="tokenize") as pool:
        try:
            for batch in _batches(docs):
                pending.append((pool.submit(encode_documents, enc, batch, dtype), len(batch)))
                while len(pending) >= 2 * workers or (pending and pending[0][0].done()):
                    n_docs += _drain(pending, router, bar, n_docs)
            while pending:
                n_docs += _drain(pending, router, bar, n_docs)
        except BaseException:
            for future, _ in pending:
                future.cancel()
            raise
    return n_docs


def _write_shards_parallel(
    parts: list[tuple],
    tokenizer: str,
    directory: Path,
    prefix: str,
    shard_tokens: int,
    val_tokens: int | None,
    workers: int,
    progress: bool,
    max_documents: int | None,
) -> tuple[list[dict], int]:
    """_write_shards for a source of several files: a process per file reads and tokenizes it into a
    spool file (parsing rows is Python work that threads would serialize on the GIL); the spools are
    routed in file order, so the shards are byte-identical to one stream's. At most 2 * workers spools wait.

    Starting the processes takes seconds (the forkserver imports datasets, each worker loads the tokenizer):
    until they are ready, this process tokenizes the first files itself, by threads, so no core waits."""
    enc = get_tokenizer(tokenizer)
    dtype = token_dtype(enc.n_vocab)
    router = SplitRouter(ShardWriter(directory, prefix, dtype, shard_tokens), val_tokens, directory / _SPOOL_NAME)
    bar = tqdm(desc=f"tokenizing {len(parts)} files", unit="tok", unit_scale=True, disable=not progress, smoothing=0.1)
    todo = iter(enumerate(parts))
    pending: deque = deque()
    n_procs = min(workers, len(parts) - 1)
    n_docs = 0
    with ProcessPoolExecutor(n_procs, mp_context=_worker_context()) as pool:

        def submit(n: int) -> None:
            for i, part in itertools.islice(todo, n):
                spool = str(directory / f".part-{i:06d}.tok")
                pending.append(pool.submit(_tokenize_part, part, tokenizer, spool, max_documents))

        def start() -> None:  # pool.submit waits for a process to start: in a thread, so that this one works
            try:
                for future in [pool.submit(_warm_worker, tokenizer, enc) for _ in range(n_procs)]:
                    future.result()
            except BaseException as e:  # raised in the main thread below
                failed.append(e)
            finally:
                ready.set()

        ready, failed = threading.Event(), []
        starter = threading.Thread(target=start, name="start-workers", daemon=True)
        try:
            starter.start()
            head_start = itertools.islice(todo, _HEAD_START_FILES)  # (the rest stays in todo, for the workers)
            while not ready.is_set() and (max_documents is None or n_docs < max_documents):
                _, part = next(head_start, (None, None))
                if part is None:
                    break
                docs = part_documents(part)
                if max_documents is not None:
                    docs = itertools.islice(docs, max_documents - n_docs)
                n_docs += _encode_into(router, docs, enc, workers, bar)
            starter.join()
            if failed:
                raise failed[0]
            submit(2 * workers)
            while pending and (max_documents is None or n_docs < max_documents):
                spool, count = pending.popleft().result()
                submit(1)
                take = count if max_documents is None else min(count, max_documents - n_docs)
                n_tokens = _route_spool(router, Path(spool), dtype, enc.eot_token, take if take < count else None)
                Path(spool).unlink()
                n_docs += take
                bar.set_postfix_str(f"docs={n_docs:,}", refresh=False)
                bar.update(n_tokens)
            for future in pending:
                future.cancel()
            shards = router.close()
        except BaseException:
            starter.join()
            for future in pending:
                future.cancel()
            router.abort()
            raise
        finally:
            bar.close()
    for spool in directory.glob(".part-*.tok"):  # those of files after --max-documents was reached
        spool.unlink()
    return shards, n_docs


_WORKER_ENCODINGS: dict[str, tiktoken.Encoding] = {}  # in a worker process: spec -> the main process's encoding


def _warm_worker(tokenizer: str, enc: tiktoken.Encoding) -> None:
    """In a worker process, before its first file: keep the main process's encoding, sent pickled (its ranks,
    rebuilt by tiktoken), which is cheaper than parsing the .tiktoken file again (base64, line by line); a
    worker that gets no such task parses the file at its first file."""
    _WORKER_ENCODINGS[tokenizer] = enc


def _route_spool(router: SplitRouter, spool: Path, dtype: np.dtype, eot: int, cut_before_doc: int | None) -> int:
    """A worker's spool file into `router`, _SPOOL_READ_TOKENS at a time (a hub file can hold a billion tokens:
    never all in memory), up to the start of document `cut_before_doc` when given; returns the tokens routed."""
    if spool.stat().st_size == 0:
        return 0
    tokens = np.memmap(spool, dtype=dtype, mode="r")  # (n_tokens,): read by the page, not loaded
    end = len(tokens)
    if cut_before_doc is not None:  # every document starts with eot: cut at the (cut_before_doc + 1)-th eot
        seen = 0
        for start in range(0, len(tokens), _SPOOL_READ_TOKENS):
            eots = np.flatnonzero(tokens[start : start + _SPOOL_READ_TOKENS] == eot)
            if seen + len(eots) > cut_before_doc:
                end = start + int(eots[cut_before_doc - seen])
                break
            seen += len(eots)
    for start in range(0, end, _SPOOL_READ_TOKENS):
        router.write(np.asarray(tokens[start : min(start + _SPOOL_READ_TOKENS, end)]))
    del tokens  # unmapped before the caller deletes the file
    return end


def _worth_processes(source: str) -> bool:
    """Whether reading the files of `source` in processes pays: a remote hub dataset always; local files once
    there are several and they hold _PARALLEL_MIN_BYTES (below that, starting the processes costs more than
    it saves). Cheap (file sizes only) and never raises: a bad source is reported when it is opened."""
    if source == PYDOC:
        return False
    if _remote_hub(source):
        return True
    try:
        files = local_files(source.removeprefix(HF_PREFIX))  # a local hub repository: its data files
        return len(files) > 1 and sum(f.stat().st_size for f in files) >= _PARALLEL_MIN_BYTES
    except (DataError, OSError):
        return False


def _remote_hub(source: str) -> bool:
    return source.startswith(HF_PREFIX) and not Path(source.removeprefix(HF_PREFIX)).expanduser().is_dir()


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver, not fork: datasets and pyarrow may already run threads in this process; the server
    (started once per process) preloads these modules, so that a worker starts without importing them."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data._worker_env", "data.prepare", "data.sources", "datasets"])
    return ctx


def _start_worker_server() -> None:
    """Start the forkserver now, in the background (its preloading takes seconds), not at the first task."""
    from multiprocessing import forkserver

    _worker_context()
    forkserver.ensure_running()


def _tokenize_part(part: tuple, tokenizer: str, spool: str, max_documents: int | None) -> tuple[str, int]:
    """In a worker process: one file's documents -> tokens (eot-prefixed) in `spool`; (spool, documents)."""
    enc = _WORKER_ENCODINGS.get(tokenizer) or get_tokenizer(tokenizer)
    dtype = token_dtype(enc.n_vocab)
    docs = part_documents(part)
    if max_documents is not None:
        docs = itertools.islice(docs, max_documents)
    n = 0
    with open(spool, "wb") as f:
        for batch in _batches(docs):
            f.write(encode_documents(enc, batch, dtype).data)
            n += len(batch)
    return spool, n


def _drain(pending: deque, router: SplitRouter, bar: tqdm, n_docs: int) -> int:
    future, count = pending.popleft()
    tokens = future.result()
    router.write(tokens)
    bar.set_postfix_str(f"docs={n_docs + count:,}", refresh=False)
    bar.update(len(tokens))
    return count


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        if not isinstance(doc, str):
            raise DataError(f"documents must be str, got {type(doc).__name__}")
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


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
