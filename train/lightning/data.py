"""GPTDataModule: a prepared dataset (data.dir) or mixture (data.mix) in gptrain's batch order.

The training batches are data/torch_data.py's StreamDataset over the loader train/loop.py's Data builds
(BatchLoader or MixtureLoader, this rank's part of every global batch), one micro-batch per Lightning
batch; the val batches are Data.val_sets'. The module's state (in every Lightning checkpoint) is the
loader's position after the checkpoint's optimizer step, so a resumed run reads the batches the
uninterrupted one would have read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import lightning as L
from torch.utils.data import DataLoader

from data.torch_data import StreamDataset
from train.loop import Data


class Replay:
    """An iterable that starts over on every pass (Lightning validates more than once; val_batches'
    generator runs once)."""

    def __init__(self, make: Callable[[], Iterator], length: int):
        self.make, self.length = make, length

    def __iter__(self) -> Iterator:
        return iter(self.make())

    def __len__(self) -> int:
        return self.length


class GPTDataModule(L.LightningDataModule):
    def __init__(self, data: Data, vocab_size: int, grad_accum_steps: int):
        super().__init__()
        self.data, self.vocab_size, self.grad_accum_steps = data, vocab_size, grad_accum_steps
        self.start: dict | None = None  # the loader state the run starts from (None: the beginning)
        self.start_step = 0  # the optimizer step of that state
        self.stream: StreamDataset | None = None

    def train_dataloader(self) -> DataLoader:
        make = functools.partial(self.data.train_loader, self.vocab_size)
        self.stream = StreamDataset(make, {"loader": self.start, "micro_batches": 0})
        return DataLoader(self.stream, batch_size=None)

    def val_dataloader(self) -> list[Replay]:
        out = []
        for i, (_, _, batches) in enumerate(self.data.val_sets(self.vocab_size)):
            n = sum(1 for _ in batches)
            out.append(Replay(lambda i=i: self.data.val_sets(self.vocab_size)[i][2], n))
        return out

    def state_dict(self) -> dict:
        """The loader after this step (a checkpoint is taken between optimizer steps)."""
        step = self.trainer.global_step
        if self.stream is None:
            return {"loader": self.start, "step": step}
        done = (step - self.start_step) * self.grad_accum_steps  # micro-batches read since the start
        return {"loader": self.stream.advanced(done)["loader"], "step": step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.start, self.start_step = state_dict["loader"], int(state_dict["step"])
