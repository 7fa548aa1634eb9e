"""Continuous batching on the exported ONNX decoder (python -m eval.serve --backend onnx).

The decoder graph (model/onnx_export.py) takes one past of P slots for the whole batch and a
position per row; a row of length L sits right-aligned in it, its first P - L slots masked as left
padding. So rows of different lengths share a step: the presents of one step are the next step's
pasts as they are (OrtValues, no copy). Only a join or a leave rebuilds the past in numpy: a new
row, prefilled alone, is left-padded to P (or the batch to its length), a leaving row is cut out
and the columns no remaining row uses are dropped from the left.
"""

from __future__ import annotations

import numpy as np
import torch

from eval.backends import OnnxBackend
from eval.serve.batching import Engine, Seq


class OnnxEngine(Engine):
    def __init__(self, backend: OnnxBackend, max_batch: int = 16, max_queue: int = 256, prefills_per_step: int = 4):
        backend._need_decoder()
        self._setup(backend.block_size, backend.vocab_size, max_batch, max_queue, prefills_per_step)
        self.backend = backend
        self.past: list = []  # 2L arrays (n, Hkv, P, D): numpy after a join / leave, OrtValues after a step
        self.docs = np.zeros(0, dtype=np.int64)  # (n,) each row's document (doc_mask graphs; else unused)
        self.pending: list[np.ndarray] = []  # the last prefill's presents (1, Hkv, T, D)
        self.pending_doc = np.zeros(1, dtype=np.int64)

    def _numpy_past(self) -> list[np.ndarray]:
        return [p if isinstance(p, np.ndarray) else p.numpy() for p in self.past]

    def _forward_prefill(self, prompt: list[int], all_positions: bool) -> torch.Tensor:
        be = self.backend
        logits, presents, doc = be.run(np.array([prompt]), np.zeros(1), be.empty_past(1), np.zeros(1))
        self.pending = [p.numpy() for p in presents]
        self.pending_doc = np.zeros(1, dtype=np.int64) if doc is None else doc
        out = torch.from_numpy(logits[0])  # (T, V)
        return out if all_positions else out[-1:]

    def _admit(self, seq: Seq) -> None:
        new = self.pending
        if not self.rows:
            self.past = new
        else:
            past = self._numpy_past()
            P, T = past[0].shape[2], new[0].shape[2]
            width = max(P, T)

            def left_pad(a: np.ndarray, to: int) -> np.ndarray:
                return np.pad(a, ((0, 0), (0, 0), (to - a.shape[2], 0), (0, 0))) if a.shape[2] < to else a

            self.past = [
                np.concatenate([left_pad(a, width), left_pad(b, width)]) for a, b in zip(past, new, strict=True)
            ]
        self.docs = np.concatenate([self.docs, self.pending_doc])
        self.rows.append(seq)

    def _forward_decode(self) -> torch.Tensor:
        tokens = np.array([[s.next_token] for s in self.rows])
        position = np.array([s.pos for s in self.rows])
        logits, self.past, doc = self.backend.run(tokens, position, self.past, self.docs)
        if doc is not None:
            self.docs = doc
        return torch.from_numpy(logits[:, -1])  # (n, V)

    def _drop_row(self, i: int) -> None:
        del self.rows[i]
        self.docs = np.delete(self.docs, i)
        if not self.rows:
            self.past = []
            return
        past = self._numpy_past()
        unused = past[0].shape[2] - max(s.pos for s in self.rows)  # left columns no remaining row reaches
        self.past = [np.delete(a, i, axis=0)[:, :, unused:] for a in past]
