"""Batches of (x, y) token windows from memory-mapped shards.

Windows. A split's shards are one token stream of N tokens. Window i is tokens [i*T, i*T + T]: T+1
tokens, stride T, so x = window[:-1] and y = window[1:] (the next-token targets); windows may cross
shard boundaries. There are W = (N - 1) // T of them.

Order. Epoch e visits every window exactly once, in the seeded permutation Permutation(W, seed, e).
The epochs laid end to end form one global stream of windows; a training step takes the next
G = tokens_per_step // T windows of it. Within a step, window j (0 <= j < G) goes to
    rank      r = j // (A * B)
    micro-step m = (j // B) % A      (A = grad_accum_steps, B = micro_batch)
    row       b = j % B
i.e. the step's windows are cut first into world_size contiguous blocks, one per rank, then each block
into A micro-batches of B rows. Ranks never share a window, and the union over ranks of one step is the
same G windows whatever world_size and micro_batch are.

Interface. BatchLoader (one dataset) and MixtureLoader (data/mixture.py: a weighted mix) are both a
Loader: the step layout above, next_step, take_windows (the global stream as (source, window) pairs),
state_dict / load_state_dict. The training loop and data.inspect use only that.

State. BatchLoader's `state_dict()` is {"seed", "epoch", "windows_consumed"}: a position in the global stream
(windows_consumed counts windows of the current epoch), identical on every rank. A run resumed with
the same tokens_per_step, on any number of ranks and with any micro_batch, continues with exactly
the windows it would have seen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.permutation import Permutation
from data.shards import TokenStream, open_split

_PERM_BLOCK = 1 << 16


class Loader(ABC):
    """This rank's micro-batches of each global training step (the module docstring's layout). A subclass
    sets `streams` (the token streams its windows come from) and says which windows come next."""

    seq_len: int  # T
    micro_batch: int  # B
    rank: int
    world_size: int
    windows_per_step: int  # G
    grad_accum_steps: int  # A
    device: torch.device
    streams: list[TokenStream]

    def _set_layout(
        self, seq_len: int, tokens_per_step: int, micro_batch: int, rank: int, world_size: int, device
    ) -> None:
        self.windows_per_step, self.grad_accum_steps = step_layout(
            seq_len, tokens_per_step, micro_batch, rank, world_size
        )
        self.seq_len, self.micro_batch, self.rank, self.world_size = seq_len, micro_batch, rank, world_size
        self.device = torch.device(device)

    def next_step(self, micro_steps: Iterable[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's grad_accum_steps micro-batches of the next step: each (x, y), (micro_batch, seq_len) int64.
        `micro_steps`: only those micro-batches are read (the step is consumed whole either way)."""
        src, win = self.take_windows(self.windows_per_step)  # (G,) source and window of each window of the step
        srcs = rank_rows(src, self.rank, self.grad_accum_steps, self.micro_batch)
        wins = rank_rows(win, self.rank, self.grad_accum_steps, self.micro_batch)
        steps = range(len(srcs)) if micro_steps is None else micro_steps
        return [gather(self.streams, srcs[m], wins[m], self.seq_len, self.device) for m in steps]

    @abstractmethod
    def take_windows(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` (source index, window index) pairs of the global stream, each (count,) int64."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, sd: dict) -> None: ...


class BatchLoader(Loader):
    """One dataset's windows in a seeded permutation per epoch; see the module docstring for the order."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        seq_len: int,
        tokens_per_step: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        split: str = "train",
        vocab_size: int | None = None,
        nanogpt: bool = False,
    ):
        self._set_layout(seq_len, tokens_per_step, micro_batch, rank, world_size, device)
        windows_per_step = self.windows_per_step
        self.stream = open_split(data_dir, split, nanogpt=nanogpt, vocab_size=vocab_size)
        self.streams = [self.stream]
        self.num_windows = (len(self.stream) - 1) // seq_len  # W
        if self.num_windows < windows_per_step:
            raise DataError(
                f"the {split} split of {data_dir} has {len(self.stream):,} tokens = {self.num_windows} windows of "
                f"seq_len={seq_len}, fewer than the {windows_per_step} one step needs: use a smaller "
                f"tokens_per_step or seq_len, or more data"
            )
        self.seed, self.epoch, self.windows_consumed = seed, 0, 0
        self._start_epoch()

    def take_windows(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(count, dtype=np.int64), self._take(count)

    def state_dict(self) -> dict:
        return {"seed": int(self.seed), "epoch": int(self.epoch), "windows_consumed": int(self.windows_consumed)}

    def load_state_dict(self, sd: dict) -> None:
        keys = ("seed", "epoch", "windows_consumed")
        if not isinstance(sd, dict) or set(sd) != set(keys) or not all(isinstance(sd[k], int) for k in keys):
            raise DataError(f"loader state must be {{'seed', 'epoch', 'windows_consumed'}} ints, got {sd!r}")
        if not (0 <= sd["windows_consumed"] < self.num_windows) or sd["epoch"] < 0:
            raise DataError(
                f"loader state {sd} does not fit this split ({self.num_windows} windows of seq_len={self.seq_len}): "
                f"was it saved with another dataset or seq_len?"
            )
        self.seed, self.epoch, self.windows_consumed = sd["seed"], sd["epoch"], sd["windows_consumed"]
        self._start_epoch()

    def _take(self, count: int) -> np.ndarray:
        """The next `count` window indices of the global stream, crossing into the next epoch if needed."""
        taken = []
        while count:
            n = min(count, self.num_windows - self.windows_consumed)
            taken.append(self._permuted(self.windows_consumed, n))
            self.windows_consumed += n
            count -= n
            if self.windows_consumed == self.num_windows:
                self.epoch, self.windows_consumed = self.epoch + 1, 0
                self._start_epoch()
        return np.concatenate(taken)

    def _start_epoch(self) -> None:
        self._perm = Permutation(self.num_windows, self.seed, self.epoch)
        self._block_start, self._block = 0, np.empty(0, dtype=np.int64)

    def _permuted(self, start: int, n: int) -> np.ndarray:
        """Permutation positions [start, start + n) of the current epoch.

        Evaluated _PERM_BLOCK positions at a time: numpy's per-call overhead, not arithmetic, is the cost
        of a few windows, so one vectorized call serves many steps (a 512 KB cache).
        """
        offset = start - self._block_start
        if offset < 0 or offset + n > len(self._block):
            end = min(self.num_windows, start + max(n, _PERM_BLOCK))
            self._block_start, self._block, offset = start, self._perm[np.arange(start, end)], 0
        return self._block[offset : offset + n]


def step_layout(seq_len: int, tokens_per_step: int, micro_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """(G windows per global step, A grad_accum_steps), or one DataError naming the numbers to change."""
    _check_layout(rank, world_size, seq_len=seq_len, micro_batch=micro_batch)
    if tokens_per_step < 1 or tokens_per_step % seq_len:
        raise DataError(
            f"tokens_per_step={tokens_per_step} must be a positive multiple of seq_len={seq_len} "
            f"(one step is a whole number of windows of seq_len tokens)"
        )
    windows_per_step = tokens_per_step // seq_len
    per_pass = micro_batch * world_size
    if windows_per_step % per_pass:
        lower = max(per_pass, windows_per_step // per_pass * per_pass) * seq_len
        raise DataError(
            f"tokens_per_step={tokens_per_step} is {windows_per_step} windows of seq_len={seq_len}, which does "
            f"not divide into micro_batch={micro_batch} x world_size={world_size} = {per_pass} windows per "
            f"micro-step: set tokens_per_step to a multiple of seq_len*micro_batch*world_size = "
            f"{per_pass * seq_len} (e.g. {lower} or {lower + per_pass * seq_len}), or change micro_batch"
        )
    return windows_per_step, windows_per_step // per_pass


def rank_rows(step_items: np.ndarray, rank: int, grad_accum_steps: int, micro_batch: int) -> np.ndarray:
    """This rank's (A, B) block of a global step's G items (window j -> rank j // (A*B)); see the docstring."""
    per_rank = grad_accum_steps * micro_batch
    return step_items[rank * per_rank : (rank + 1) * per_rank].reshape(grad_accum_steps, micro_batch)


def val_batches(
    data_dir: str | Path,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    nanogpt: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split in order: batch k holds windows [k*B*world_size, (k+1)*B*world_size), rank r the
    r-th B of them. Every rank gets the same number of full batches (a tail that cannot fill one batch
    on every rank is dropped), so distributed evaluation can all-reduce per batch."""
    _check_layout(rank, world_size, seq_len=seq_len, batch_size=batch_size)
    stream = open_split(data_dir, "val", nanogpt=nanogpt, vocab_size=vocab_size)
    per_batch = batch_size * world_size
    n_batches = (len(stream) - 1) // seq_len // per_batch
    if n_batches == 0:
        raise DataError(
            f"the val split of {data_dir} has {len(stream):,} tokens, fewer than one batch of "
            f"batch_size={batch_size} x world_size={world_size} windows of seq_len={seq_len} (+1); "
            f"use a smaller batch_size or seq_len, or prepare with more --val-tokens"
        )
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    device = torch.device(device)
    src = np.zeros(batch_size, dtype=np.int64)
    return (
        gather([stream], src, k * per_batch + rank * batch_size + np.arange(batch_size), seq_len, device)
        for k in range(n_batches)
    )


def gather(
    streams: Sequence[TokenStream], src: np.ndarray, win: np.ndarray, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of shape (len(win), seq_len) int64 on `device`: row i is window win[i] of streams[src[i]]."""
    windows = np.empty((len(win), seq_len + 1), dtype=np.int64)  # (B, T + 1)
    for row, (s, w) in enumerate(zip(src.tolist(), win.tolist(), strict=True)):
        windows[row] = streams[s].read(w * seq_len, seq_len + 1)
    return _to_device(np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:]), device)


def _to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if device.type == "cuda":
        # Page-locked host memory lets the copy run asynchronously, overlapping the previous step's compute.
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    return xt.to(device), yt.to(device)


def _check_layout(rank: int, world_size: int, **sizes: int) -> None:
    for name, value in {**sizes, "world_size": world_size}.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, not {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank={rank!r} must be in [0, world_size={world_size})")
