"""torch.utils.data views of prepared datasets, for loops other than train/ (Lightning, Accelerate, a notebook).

    WindowDataset(dir, split, seq_len)      map-style: len() windows, ds[i] -> (x, y), each (seq_len,) int64;
                                            window i is tokens [i*T, i*T + T] as in data/loader.py
    StreamDataset(make_loader)              iterable: one rank's micro-batches of the global stream, in
                                            BatchLoader's (or MixtureLoader's) order, (micro_batch, T) each
    StreamDataLoader(stream, num_workers=k) a DataLoader over it (batch_size=None) with state_dict() /
                                            load_state_dict(), the torchdata StatefulDataLoader convention

Workers. Micro-batch n of the stream (n = step * grad_accum_steps + micro-step, counted from where the
dataset starts) is read by worker n % k; DataLoader hands batches out round-robin over its workers in that
same order, so any num_workers yields exactly the loader's sequence. Each worker walks the step indices
itself (no tokens are read for another worker's micro-batches), from the dataset's start state.

State. StreamDataLoader counts the micro-batches it has handed to the caller; state_dict() is the loader's
state at the last whole step before them plus the micro-batches taken of the next one. What workers have
prefetched beyond that is not counted, so a resumed loader starts exactly after the last batch the caller
saw. At step boundaries the "loader" entry is BatchLoader.state_dict() itself (train/ checkpoints hold it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from data.errors import DataError
from data.shards import open_split


class WindowDataset(Dataset):
    """The windows of one split: ds[i] = (x, y), x = tokens [i*T, i*T + T), y = x shifted by one."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, seq_len: int, vocab_size: int | None = None):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len must be a positive integer, not {seq_len!r}")
        self.data_dir, self.split, self.seq_len, self.vocab_size = str(data_dir), split, seq_len, vocab_size
        self._stream = open_split(self.data_dir, split, vocab_size=vocab_size)  # checked now, in the caller
        self._len = (len(self._stream) - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._len <= i < self._len:
            raise IndexError(f"window {i} outside {self._len} windows")
        i %= self._len
        if self._stream is None:  # in a worker started with spawn: memmaps are reopened, not pickled
            self._stream = open_split(self.data_dir, self.split, vocab_size=self.vocab_size)
        w = torch.from_numpy(self._stream.read(i * self.seq_len, self.seq_len + 1).astype(np.int64))
        return w[:-1], w[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}


class StreamDataset(IterableDataset):
    """One rank's micro-batches, step after step, as `make_loader()` (a BatchLoader or MixtureLoader,
    e.g. functools.partial(BatchLoader, dir, seq_len=..., ...)) yields them; endless, like the stream."""

    def __init__(self, make_loader: Callable, state: dict | None = None):
        self.make_loader = make_loader
        self.load_state_dict(state or {"loader": None, "micro_batches": 0})

    def state_dict(self) -> dict:
        """Where iteration starts: {"loader": a loader state or None (the beginning), "micro_batches": n}."""
        return {"loader": self._start, "micro_batches": self._skip}

    def load_state_dict(self, sd: dict) -> None:
        if (
            not isinstance(sd, dict)
            or set(sd) != {"loader", "micro_batches"}
            or not isinstance(sd["micro_batches"], int)
        ):
            raise DataError(f"stream state must be {{'loader': state or None, 'micro_batches': int}}, got {sd!r}")
        self._start, self._skip = sd["loader"], sd["micro_batches"]

    def advanced(self, micro_batches: int) -> dict:
        """The state `micro_batches` past this dataset's start: the loader at the last whole step, plus the rest."""
        loader = self._open()
        n = self._skip + micro_batches
        for _ in range(n // loader.grad_accum_steps):
            loader.next_step(micro_steps=())
        return {"loader": loader.state_dict(), "micro_batches": n % loader.grad_accum_steps}

    def _open(self):
        loader = self.make_loader()
        if self._start is not None:
            loader.load_state_dict(self._start)
        return loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        k, w = (1, 0) if info is None else (info.num_workers, info.id)
        loader = self._open()
        A = loader.grad_accum_steps
        for _ in range(self._skip // A):
            loader.next_step(micro_steps=())
        n = self._skip // A * A  # the index of the first micro-batch of the current step
        while True:
            mine = [m for m in range(A) if n + m >= self._skip and (n + m - self._skip) % k == w]
            yield from loader.next_step(micro_steps=mine)
            n += A


class StreamDataLoader(DataLoader):
    """DataLoader(stream, batch_size=None, **kwargs) that knows how many batches its caller has taken."""

    def __init__(self, dataset: StreamDataset, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.taken = 0

    def __iter__(self):
        if self.taken:  # a new pass continues after the batches the caller took from the previous one
            self.load_state_dict(self.state_dict())
        for batch in super().__iter__():
            self.taken += 1
            yield batch

    def state_dict(self) -> dict:
        return self.dataset.advanced(self.taken)

    def load_state_dict(self, sd: dict) -> None:
        self.dataset.load_state_dict(sd)
        self.taken = 0
