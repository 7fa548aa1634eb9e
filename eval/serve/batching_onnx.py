"""Continuous batching on the exported ONNX decoder (python -m eval.serve --backend onnx).

OnnxRows is the RowDecoder (model/generation.py) of the decoder graph (model/onnx_export.py): the
engine drives it with the same step as the torch model's. The graph takes one past of P slots for the
whole batch and a position per row; a row of length L sits right-aligned in it, its first P - L slots
masked as left padding. So rows of different lengths share a step: the presents of one step are the
next step's pasts as they are (OrtValues, no copy). Only a join or a leave rebuilds the past in numpy:
a new row, prefilled alone, is left-padded to P (or the batch to its length), a leaving row is
replaced by the last one and the columns no remaining row uses are dropped from the left.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eval.backends import OnnxBackend
from eval.serve.batching import Engine


class OnnxRows:
    def __init__(self, backend: OnnxBackend):
        backend._need_decoder()
        self.backend = backend
        self.block_size, self.vocab_size = backend.block_size, backend.vocab_size
        self.past: list = []  # 2L arrays (n, Hkv, P, D): numpy after a join / leave, OrtValues after a step
        self.docs = np.zeros(0, dtype=np.int64)  # (n,) each row's document (doc_mask graphs; else unused)

    def _numpy_past(self) -> list[np.ndarray]:
        return [p if isinstance(p, np.ndarray) else p.numpy() for p in self.past]

    def open_rows(self, rows: int) -> None:
        """The past grows and shrinks with the running rows: nothing to reserve."""

    def prefill_row(self, row: int, prompt: Sequence[int], all_positions: bool = False) -> torch.Tensor:
        be = self.backend
        assert row == len(self.docs), "rows are packed: a prefill takes the first free row"
        logits, presents, doc = be.run(np.array([list(prompt)]), np.zeros(1), be.empty_past(1), np.zeros(1))
        new = [p.numpy() for p in presents]  # (1, Hkv, T, D)
        if row == 0:
            self.past = new
        else:
            past = self._numpy_past()
            width = max(past[0].shape[2], new[0].shape[2])

            def left_pad(a: np.ndarray) -> np.ndarray:
                return np.pad(a, ((0, 0), (0, 0), (width - a.shape[2], 0), (0, 0))) if a.shape[2] < width else a

            self.past = [np.concatenate([left_pad(a), left_pad(b)]) for a, b in zip(past, new, strict=True)]
        self.docs = np.concatenate([self.docs, np.zeros(1, dtype=np.int64) if doc is None else doc])
        out = torch.from_numpy(logits[0])  # (T, V)
        return out if all_positions else out[-1:]

    def decode(self, tokens: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
        """slot (n,): each row's length, which is its position (rows are right-aligned, unpadded)."""
        assert slot is not None, "the server's rows each stand at their own position"
        logits, self.past, doc = self.backend.run(tokens.numpy(), slot.numpy(), self.past, self.docs)
        if doc is not None:
            self.docs = doc
        return torch.from_numpy(logits[:, -1])  # (n, V)

    def drop_row(self, row: int, lengths: Sequence[int]) -> None:
        last = len(lengths) - 1
        if last == 0:
            self.past, self.docs = [], np.zeros(0, dtype=np.int64)
            return
        order = list(range(last))  # the rows that stay, in their new order: the last takes row's place
        if row != last:
            order[row] = last
        unused = self._numpy_past()[0].shape[2] - max(lengths[j] for j in order)  # columns no row reaches
        self.past = [a[order][:, :, unused:] for a in self._numpy_past()]
        self.docs = self.docs[order]


class OnnxEngine(Engine):
    def __init__(self, backend: OnnxBackend, max_batch: int = 16, max_queue: int = 256, prefills_per_step: int = 4):
        super().__init__(OnnxRows(backend), max_batch, max_queue, prefills_per_step)
