"""A source of several files (a sharded hub dataset, a folder of JSONL) -> tokens, by a process per file.

Parsing rows is Python work that threads would serialize on the GIL, so each worker process reads one file
and tokenizes it (data/encode.py's encode_documents) into a spool file; the spools are routed in file
order, so the shards are byte-identical to one stream's (data/encode.py's encode_stream). data.prepare picks this path
for a remote hub dataset, and for local files once they hold _PARALLEL_MIN_BYTES (_worth_processes).
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from data.encode import batches, encode_documents, encode_into
from data.errors import DataError
from data.shards import token_dtype
from data.sources import HF_PREFIX, PYDOC, local_files, part_documents
from data.tokenizer import get_tokenizer
from data.writer import SplitRouter

_SPOOL_READ_TOKENS = 1 << 22  # tokens of a worker's spool routed at a time (8 MB of uint16)
_HEAD_START_FILES = None  # files the main process may tokenize while the workers start (None: no limit)
_PARALLEL_MIN_BYTES = 32 << 20  # a multi-file source this large is read by a process per file


def encode_files(
    router: SplitRouter,
    directory: Path,
    parts: list[tuple],
    tokenizer: str,
    workers: int,
    progress: bool,
    max_documents: int | None,
) -> int:
    """The files of a source (`parts`) into `router`; returns the number of documents. A process per file
    reads and tokenizes it into a spool file in `directory` (parsing rows is Python work that threads
    would serialize on the GIL); the spools are routed in file order, so the shards are byte-identical to
    one stream's. At most 2 * workers spools wait.

    Starting the processes takes seconds (the forkserver imports datasets, each worker loads the tokenizer):
    until they are ready, this process tokenizes the first files itself, by threads, so no core waits."""
    enc = get_tokenizer(tokenizer)
    dtype = token_dtype(enc.n_vocab)
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
                n_docs += encode_into(router, docs, enc, workers, bar)
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
        except BaseException:
            starter.join()
            for future in pending:
                future.cancel()
            raise
        finally:
            bar.close()
    for spool in directory.glob(".part-*.tok"):  # those of files after --max-documents was reached
        spool.unlink()
    return n_docs


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


def worth_processes(source: str) -> bool:
    """Whether reading the files of `source` in processes pays: a remote hub dataset always; local files once
    there are several and they hold _PARALLEL_MIN_BYTES (below that, starting the processes costs more than
    it saves). Cheap (file sizes only) and never raises: a bad source is reported when it is opened."""
    if source == PYDOC:
        return False
    if remote_hub(source):
        return True
    try:
        files = local_files(source.removeprefix(HF_PREFIX))  # a local hub repository: its data files
        return len(files) > 1 and sum(f.stat().st_size for f in files) >= _PARALLEL_MIN_BYTES
    except (DataError, OSError):
        return False


def remote_hub(source: str) -> bool:
    return source.startswith(HF_PREFIX) and not Path(source.removeprefix(HF_PREFIX)).expanduser().is_dir()


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver, not fork: datasets and pyarrow may already run threads in this process; the server
    (started once per process) preloads these modules, so that a worker starts without importing them."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data._worker_env", "data.encode_files", "data.sources", "datasets"])
    return ctx


def start_worker_server() -> None:
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
        for batch in batches(docs):
            f.write(encode_documents(enc, batch, dtype).data)
            n += len(batch)
    return spool, n
