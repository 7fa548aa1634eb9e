"""Continuous batching on the GPT's KV cache: sequences join and leave the running batch between steps.

Every running sequence owns one row of a decoder (model.generation's RowDecoder: the GPT's
CachedDecoder, or the ONNX decoder of eval/serve/batching_onnx.py) with room for `max_batch` rows of
the full context. Each loop of the engine thread first prefills the sequences that are waiting (one
at a time, into free rows: a new request never waits for the running ones to finish), then runs the
one decode step of model/generation.py (decode_next) for all running rows at once, each at its own
slot (the positions and masks of model.gpt.cache_layout, the ones `generate` uses). Rows are kept
packed in [0, n): when a sequence leaves, the last row's cache moves into its place, so a step works
on slices of the cache, never on a gathered copy.

The decode step always takes the same path whatever the batch holds (a per-row mask over the
written part of the cache), and a prefill always runs one sequence alone, so what a greedy request
gets does not depend on its neighbours (tests/test_serve.py checks 16 concurrent == each alone).
Sampling is per sequence: its own temperature / top-k / top-p and its own seeded generator.

Engine is the scheduler only: which sequences join, step and leave; the decoder runs the model.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from eval.cli import UsageError
from model.generation import CachedDecoder, RowDecoder, Sampling, choose, decode_next

# on_token(seq, token, logprob) -> True when the sequence is finished (a stop string in its text).
# logprob is None unless the sequence asked for logprobs: (chosen log-prob, [(token, log-prob)] top-k).
LogProb = tuple[float, list[tuple[int, float]]] | None
OnToken = Callable[["Seq", int, LogProb], bool | None]
OnFinish = Callable[["Seq", str], None]


class QueueFull(Exception):
    """More sequences are waiting than the engine's max_queue; the server answers 429."""


class EngineDown(Exception):
    """The engine thread has stopped (a bug, logged with its traceback); the server answers 503."""


class Seq:
    """One sequence to generate (one choice of a request). The callbacks run on the engine thread."""

    _ids = itertools.count()

    def __init__(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        stop_ids: Sequence[int] = (),
        on_token: OnToken | None = None,
        on_finish: OnFinish | None = None,
        on_prompt_logprobs: Callable[[Seq, list[LogProb]], None] | None = None,
    ):
        self.id = next(Seq._ids)
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.stop_ids = frozenset(stop_ids)
        self.on_token, self.on_finish, self.on_prompt_logprobs = on_token, on_finish, on_prompt_logprobs
        self.sampling = Sampling.seeded(temperature, top_k, top_p, seed)
        self.tokens: list[int] = []  # generated so far
        self.pos = 0  # cache index of the next token to feed
        self.next_token = -1
        self.cancelled = False  # set from another thread: the sequence leaves at the next step
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The scheduler and its thread. submit() from any thread; results arrive through each Seq's callbacks."""

    def __init__(
        self,
        model: torch.nn.Module | RowDecoder,
        max_batch: int = 16,
        max_queue: int = 256,
        prefills_per_step: int = 4,
    ):
        """model: a GPT (run by a CachedDecoder), or any RowDecoder."""
        if max_batch < 1 or max_queue < 0:
            raise UsageError(f"--max-batch must be >= 1 and --max-queue >= 0 (got {max_batch}, {max_queue})")
        self.decoder = CachedDecoder(model.eval()) if isinstance(model, torch.nn.Module) else model
        self.decoder.open_rows(max_batch)
        self.block_size, self.vocab_size = self.decoder.block_size, self.decoder.vocab_size
        self.max_batch, self.max_queue = max_batch, max_queue
        # Several waiting prompts are prefilled per step when rows are free, but not all: a burst of
        # new requests delays the running ones by a bounded amount.
        self.prefills_per_step = prefills_per_step
        self.rows: list[Seq] = []  # rows[i] owns cache row i
        self.waiting: deque[Seq] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # metrics (read by /metrics without a lock: plain ints and floats)
        self.sequences_total = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.steps_total = 0
        self.occupancy_sum = 0  # running rows summed over decode steps
        self.ttft_sum, self.ttft_count = 0.0, 0

    # ------------------------------------------------------------- threads
    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._run, name="gptrain-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue all of `seqs` or none (QueueFull): at most max_queue sequences wait beyond the free rows."""
        with self.cond:
            if self.stopping or not self.alive:
                raise EngineDown(f"the generation engine is not running ({self.error!r})")
            free = self.max_batch - len(self.rows)
            if len(self.waiting) + len(seqs) > self.max_queue + free:
                raise QueueFull(
                    f"{len(self.rows)} sequences are running and {len(self.waiting)} waiting "
                    f"(--max-batch {self.max_batch}, --max-queue {self.max_queue})"
                )
            self.waiting.extend(seqs)
            self.cond.notify_all()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        while not self.stopping and not self.waiting and not self.rows:
                            self.cond.wait()
                        if self.stopping:
                            break
                    self.step()
        except BaseException as e:  # a bug: /health reports it, and every waiting request is ended
            self.error = e
            raise
        finally:
            for s in [*self.rows, *self.waiting]:
                self._finish(s, "abort")
            self.rows.clear()
            self.waiting.clear()

    # ---------------------------------------------------------------- steps
    def step(self) -> None:
        """Admit waiting sequences into free rows (prefill), then one decode step for every running row."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled:
                self._leave(i, "cancelled")
        with self.cond:  # a cancelled waiting sequence leaves the queue now, not once a row is free
            gone = [s for s in self.waiting if s.cancelled]
            if gone:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for seq in gone:
            self._finish(seq, "cancelled")
        admitted = 0
        while admitted < self.prefills_per_step and len(self.rows) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._prefill(seq)
            admitted += 1
        if self.rows:
            self._decode()

    def _prefill(self, seq: Seq) -> None:
        T = len(seq.prompt)
        if T == 0 or T + seq.max_tokens > self.block_size:  # the server checks first; this is a bug guard
            raise ValueError(f"sequence of {T} + {seq.max_tokens} tokens does not fit {self.block_size}")
        row = len(self.rows)
        logits = self.decoder.prefill_row(row, seq.prompt, seq.prompt_logprobs)  # (T or 1, V): t predicts t + 1
        self.sequences_total += 1
        self.prompt_tokens_total += T
        if seq.prompt_logprobs:
            lps: list[LogProb] = [None]
            lps += [log_prob(logits[t], seq.prompt[t + 1], seq.logprobs or 0) for t in range(T - 1)]
            if seq.on_prompt_logprobs is not None:
                seq.on_prompt_logprobs(seq, lps)
        seq.pos = T
        self.rows.append(seq)  # seq takes the row its prefill wrote
        if seq.max_tokens == 0:
            self._leave(row, "length")
            return
        last = logits[-1:].cpu()  # (1, V)
        if self._emit(seq, int(choose(last, seq.sampling)[0]), last[0]):
            self._leave(row, seq.finish_reason)

    def _decode(self) -> None:
        n = len(self.rows)
        tokens = torch.tensor([s.next_token for s in self.rows])  # (n,)
        slot = torch.tensor([s.pos for s in self.rows])  # (n,): each row at its own length
        nxt, logits = decode_next(self.decoder, tokens, [s.sampling for s in self.rows], slot)  # (n,), (n, V)
        self.steps_total += 1
        self.occupancy_sum += n
        for s in self.rows:
            s.pos += 1
        done = [
            i for i, (s, tok) in enumerate(zip(self.rows, nxt.tolist(), strict=True)) if self._emit(s, tok, logits[i])
        ]
        for i in reversed(done):
            self._leave(i, self.rows[i].finish_reason)

    def _emit(self, seq: Seq, tok: int, logits: torch.Tensor) -> bool:
        """Report seq's next token tok, chosen from logits (V,); True when seq is finished."""
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.ttft_sum += seq.first_token_at - seq.submitted
            self.ttft_count += 1
        if tok in seq.stop_ids:
            seq.finish_reason = "stop"
            return True
        seq.tokens.append(tok)
        seq.next_token = tok
        self.generated_tokens_total += 1
        lp = log_prob(logits, tok, seq.logprobs) if seq.logprobs is not None else None
        if seq.on_token is not None and seq.on_token(seq, tok, lp):
            seq.finish_reason = "stop"
            return True
        if len(seq.tokens) >= seq.max_tokens:
            seq.finish_reason = "length"
            return True
        return False

    def _leave(self, i: int, reason: str | None) -> None:
        seq = self.rows[i]
        self.decoder.drop_row(i, [s.pos for s in self.rows])
        self.rows[i] = self.rows[-1]
        self.rows.pop()
        self._finish(seq, reason or "stop")

    def _finish(self, seq: Seq, reason: str) -> None:
        seq.finish_reason = reason
        if seq.on_finish is not None:
            seq.on_finish(seq, reason)


def log_prob(logits: torch.Tensor, token: int, top: int) -> LogProb:
    """(log-prob of token, the `top` most likely tokens with theirs) under the model's distribution."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(lp, top) if top > 0 else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return float(lp[token]), pairs
