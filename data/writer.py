"""Streams a token stream into llm.c shards: the first `val_tokens` tokens to val, the rest to train.

Memory stays bounded whatever the corpus size: tokens go to disk as they come, a shard's header is
written when the shard closes (its count is 0 until then, so an unfinished shard never reads as
complete), and the only buffer is the spool used while the default val size is still unknown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.shards import make_header
from model.files import sha256_file

DEFAULT_VAL_CAP = 10_485_760  # llm.c's fineweb val size: enough for a stable loss, small next to train
VAL_FRACTION_DIVISOR = 10  # by default val is at most 10% of the corpus, so a small corpus still trains
_SPOOL_CHUNK_BYTES = 1 << 20  # a multiple of every token size; small, so replaying adds little to RSS


class ShardWriter:
    """Appends tokens to numbered shards PREFIX_SPLIT_INDEX.bin, closing each at `shard_tokens` tokens."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.prefix, self.dtype, self.shard_tokens = (
            Path(directory),
            prefix,
            np.dtype(dtype),
            shard_tokens,
        )
        self.shards: list[dict] = []  # {"name", "split", "tokens", "sha256"} of every closed shard
        self._file = None
        self._split: str | None = None
        self._count = 0

    def write(self, split: str, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self._split != split:
                self._close_shard()
                self._open_shard(split)
            room = self.shard_tokens - self._count
            head, tokens = tokens[:room], tokens[room:]
            self._file.write(np.ascontiguousarray(head, dtype=self.dtype).data)  # a buffer view: no copy
            self._count += len(head)
            if self._count == self.shard_tokens:
                self._close_shard()

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Close the open shard as it is (header count 0: it reads as incomplete); the caller deletes it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_shard(self, split: str) -> None:
        # One index across splits (val_000000, train_000001, ...), as llm.c numbers its shards.
        path = self.directory / f"{self.prefix}_{split}_{len(self.shards):06d}.bin"
        self._file = open(path, "wb")
        self._file.write(make_header(0, self.dtype).tobytes())  # placeholder until the count is known
        self._split, self._count = split, 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(make_header(self._count, self.dtype).tobytes())
        self._file.close()
        path = Path(self._file.name)
        self.shards.append(
            {"name": path.name, "split": self._split, "tokens": self._count, "sha256": sha256_file(path)}
        )
        self._file = None


class SplitRouter:
    """Sends the first `val_tokens` tokens of the stream to val shards and the rest to train shards.

    With `val_tokens=None` the val size is min(DEFAULT_VAL_CAP, total // 10), which depends on a total
    not known while streaming. Until it is known, tokens wait in a spool file on disk (never more than
    DEFAULT_VAL_CAP * 10 tokens): once the stream reaches that many tokens (val is then the cap) or ends,
    the spool is replayed into shards and later tokens go straight through.
    """

    def __init__(self, writer: ShardWriter, val_tokens: int | None, spool_path: Path):
        self.writer, self.val_tokens = writer, val_tokens
        self.total = 0  # tokens received
        self._routed = 0  # tokens passed on to the writer
        self._spool_path = Path(spool_path)
        self._spool = open(self._spool_path, "w+b") if val_tokens is None else None

    def write(self, tokens: np.ndarray) -> None:
        self.total += len(tokens)
        if self._spool is None:
            self._route(tokens)
            return
        self._spool.write(tokens.data)
        if self.total >= DEFAULT_VAL_CAP * VAL_FRACTION_DIVISOR:
            self._decide(DEFAULT_VAL_CAP)

    def close(self) -> list[dict]:
        if self._spool is not None:
            self._decide(min(DEFAULT_VAL_CAP, self.total // VAL_FRACTION_DIVISOR))
        return self.writer.close()

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.writer.abort()

    def _route(self, tokens: np.ndarray) -> None:
        n_val = min(len(tokens), max(0, self.val_tokens - self._routed))
        if n_val:
            self.writer.write("val", tokens[:n_val])
        if n_val < len(tokens):
            self.writer.write("train", tokens[n_val:])
        self._routed += len(tokens)

    def _decide(self, val_tokens: int) -> None:
        self.val_tokens = val_tokens
        spool, self._spool = self._spool, None
        spool.seek(0)
        while chunk := spool.read(_SPOOL_CHUNK_BYTES):
            self._route(np.frombuffer(chunk, dtype=self.writer.dtype))
        spool.close()
        self._spool_path.unlink()
