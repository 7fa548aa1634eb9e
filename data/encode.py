"""Documents -> tokens, in order, by a pool of threads (tiktoken releases the GIL while it encodes).

Each document is prefixed by <|endoftext|> as llm.c does, and the tokens go to a SplitRouter (data/writer.py)
as they come: at most 2 * workers batches of documents are in flight, so memory does not grow with the corpus.
data.prepare uses this for one stream of documents (encode_stream); data/encode_files.py (a process per file) uses
encode_documents and batches in its workers and encode_into for the files it tokenizes itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tiktoken
from tqdm import tqdm

from data.errors import DataError
from data.shards import token_dtype
from data.writer import SplitRouter

BATCH_CHARS = 1 << 17  # characters per tokenization task: large enough to amortize the hand-off
BATCH_DOCS = 1024


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


def encode_stream(
    router: SplitRouter, docs: Iterator[str], enc: tiktoken.Encoding, workers: int, progress: bool
) -> int:
    """One stream of documents into `router`, tokenized by `workers` threads; returns the number of documents."""
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress, smoothing=0.1)
    try:
        return encode_into(router, docs, enc, workers, bar)
    finally:
        bar.close()


def encode_into(router: SplitRouter, docs: Iterator[str], enc: tiktoken.Encoding, workers: int, bar: tqdm) -> int:
    """Tokenize `docs` on `workers` threads (tiktoken releases the GIL while it encodes) into `router`, in
    order; returns the number of documents."""
    dtype = token_dtype(enc.n_vocab)
    n_docs = 0
    # In order: futures are drained oldest first, so the token stream follows the document order; at most
    # 2 * workers batches wait, which bounds memory and keeps every thread busy.
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="tokenize") as pool:
        try:
            for batch in batches(docs):
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


def _drain(pending: deque, router: SplitRouter, bar: tqdm, n_docs: int) -> int:
    future, count = pending.popleft()
    tokens = future.result()
    router.write(tokens)
    bar.set_postfix_str(f"docs={n_docs + count:,}", refresh=False)
    bar.update(len(tokens))
    return count


def batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        if not isinstance(doc, str):
            raise DataError(f"documents must be str, got {type(doc).__name__}")
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
