"""Weighted mixtures of prepared datasets: one global stream of windows drawn from several sources.

Which source. Window g of the global stream (g = 0, 1, 2, ...; step s takes windows [s*G, (s+1)*G) as
in data/loader.py) comes from the source picked by
    u(g) = (g * 0x9E3779B97F4A7C15 + splitmix64(seed)) mod 2^64      (a Weyl sequence: Fibonacci hashing,
                                                                      Knuth TAOCP vol. 3, 6.4)
against the cumulative weights of the sources still drawing at g (as 64-bit integer thresholds). The
golden-ratio Weyl sequence is equidistributed with low discrepancy, so over any run of windows the share
of each source is its weight to within a few windows, and the sources are interleaved evenly: every rank's
block of a step holds the mix too. Pure integer arithmetic, so the same g gives the same source on every
machine. Weights may change at given steps (`schedule`, e.g. an annealing phase), and a source with an
`epochs_cap` stops drawing after that many passes over its windows; the others then share its weight.

Within a source. The k-th window a source gives is position k mod W of its epoch k // W, in that source's
own seeded Permutation (data/permutation.py), exactly as BatchLoader walks one dataset.

State. The position in the global stream (windows consumed) and the seed. The per-source counts (hence
epochs) are a function of it: load_state_dict recomputes them by replaying the source choice (vectorized)
and checks them against the saved ones, which catches a resume with
another mix. Resuming on another number of ranks or micro_batch sees the same windows, as with one dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.loader import Loader
from data.permutation import Permutation, _splitmix64
from data.shards import open_split, read_meta

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_REPLAY_CHUNK = 1 << 20
_TOKENIZER_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "eot_id")


@dataclass(frozen=True)
class MixSource:
    """One entry of data.mix: a prepared dataset directory, its weight, a name and an optional epochs cap."""

    dir: str
    weight: float
    name: str
    epochs_cap: float | None = None


def parse_mix(entries: list[dict], schedule: list[dict] | None = None) -> tuple[list[MixSource], list[tuple]]:
    """data.mix and data.mix_schedule (YAML lists) -> (sources, phases [(start_step, weights), ...]).

    A schedule entry is {step: N, weights: [w per source, in mix order] or {name: w, ...}}: from step N on,
    those weights. Raises DataError naming the entry for anything malformed."""
    if not isinstance(entries, list) or not entries:
        raise DataError("data.mix must be a non-empty list of {dir: DATASET, weight: W, name?: N, epochs_cap?: E}")
    sources = []
    for i, e in enumerate(entries):
        where = f"data.mix[{i}]"
        if not isinstance(e, dict) or "dir" not in e or "weight" not in e:
            raise DataError(f"{where} must be a mapping with dir and weight (and optional name, epochs_cap); got {e!r}")
        unknown = set(e) - {"dir", "weight", "name", "epochs_cap"}
        if unknown:
            raise DataError(f"{where} has unknown keys {sorted(unknown)}; allowed: dir, weight, name, epochs_cap")
        weight, cap = e["weight"], e.get("epochs_cap")
        if not _number(weight) or weight < 0:
            raise DataError(f"{where}.weight must be a number >= 0, got {weight!r}")
        if cap is not None and (not _number(cap) or cap <= 0):
            raise DataError(f"{where}.epochs_cap must be a number > 0 (passes over the source) or null, got {cap!r}")
        name = str(e.get("name") or Path(str(e["dir"])).name)
        if not name or "/" in name:
            raise DataError(f"{where}.name must be a non-empty name without '/', got {name!r}")
        sources.append(MixSource(str(e["dir"]), float(weight), name, None if cap is None else float(cap)))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.mix has repeated names {names}: give each entry a distinct name:")
    phases = [(0, _weights([s.weight for s in sources], names, "data.mix"))]
    for i, entry in enumerate(schedule or []):
        where = f"data.mix_schedule[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"step", "weights"}:
            raise DataError(f"{where} must be {{step: N, weights: [...] or {{name: w}}}}, got {entry!r}")
        step = entry["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step <= phases[-1][0]:
            raise DataError(
                f"{where}.step must be an integer above the previous phase's ({phases[-1][0]}), got {step!r}"
            )
        phases.append((step, _weights(entry["weights"], names, where)))
    return sources, phases


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _weights(w, names: list[str], where: str) -> np.ndarray:
    if isinstance(w, dict):
        if set(w) != set(names):
            raise DataError(f"{where}.weights must name every source {names}, got {sorted(w)}")
        w = [w[n] for n in names]
    if not isinstance(w, list) or len(w) != len(names) or not all(_number(v) and v >= 0 for v in w):
        raise DataError(f"{where}: weights must be {len(names)} numbers >= 0 (one per source {names}), got {w!r}")
    if sum(w) <= 0:
        raise DataError(f"{where}: the weights sum to 0; give at least one source a positive weight")
    return np.asarray(w, dtype=np.float64) / sum(w)


def mix_meta(sources: list[MixSource]) -> dict:
    """The sources' meta.json records merged: one tokenizer for all (else one DataError listing them),
    token counts summed, and per-source records under "mix"."""
    metas = [read_meta(s.dir) for s in sources]
    first = metas[0]
    differ = [
        (s, m) for s, m in zip(sources, metas, strict=True) if any(m.get(k) != first.get(k) for k in _TOKENIZER_KEYS)
    ]
    if differ:
        listing = "; ".join(
            f"{s.name} ({s.dir}): tokenizer {m['tokenizer']!r}, vocab {m['vocab_size']}"
            for s, m in zip(sources, metas, strict=True)
        )
        raise DataError(
            f"every dataset of data.mix must share one tokenizer, but they differ: {listing}. Prepare them "
            f"again with the same --tokenizer"
        )
    merged = {k: first.get(k) for k in _TOKENIZER_KEYS}
    merged.update(
        dtype=first["dtype"],
        train_tokens=sum(m["train_tokens"] for m in metas),
        val_tokens=sum(m["val_tokens"] for m in metas),
        mix=[
            {"name": s.name, "dir": s.dir, "weight": s.weight, "meta": m} for s, m in zip(sources, metas, strict=True)
        ],
    )
    return merged


class SourceChooser:
    """Which source each window of the global stream comes from, and the running count per source.

    `windows` (the per-source windows of an epoch) sizes the epochs caps. Pure given (sources, phases,
    windows_per_step, seed): assign(start, n) must be called on consecutive ranges from 0 (or after
    replay(position))."""

    def __init__(self, sources, phases, windows: list[int], windows_per_step: int, seed: int):
        self.names = [s.name for s in sources]
        self.windows = np.asarray(windows, dtype=np.int64)
        self.caps = np.array(
            [
                np.iinfo(np.int64).max if s.epochs_cap is None else max(1, int(s.epochs_cap * w))
                for s, w in zip(sources, windows, strict=True)
            ],
            dtype=np.int64,
        )
        self.phase_starts = [p[0] * windows_per_step for p in phases]  # in windows
        self.phase_weights = [p[1] for p in phases]
        self.offset = np.uint64(_splitmix64(seed))
        self.position, self.counts = 0, np.zeros(len(sources), dtype=np.int64)

    def assign(self, n: int) -> np.ndarray:
        """The sources of the next n windows (int64, (n,)); advances position and counts."""
        out = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            g = self.position
            phase = np.searchsorted(self.phase_starts, g, side="right") - 1
            m = n - done
            if phase + 1 < len(self.phase_starts):
                m = min(m, self.phase_starts[phase + 1] - g)
            weights = np.where(self.counts < self.caps, self.phase_weights[phase], 0.0)
            if weights.sum() <= 0:
                step_hint = "" if not self.phase_starts else " (or a later data.mix_schedule phase)"
                raise DataError(
                    f"at window {g:,} of the mix every source with a positive weight has reached its epochs_cap "
                    f"(windows drawn: {dict(zip(self.names, self.counts.tolist(), strict=True))}): raise epochs_cap, "
                    f"give an uncapped source weight{step_hint}, or train for fewer steps"
                )
            cum = np.cumsum(weights / weights.sum())[:-1]
            thresholds = np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cum], dtype=np.uint64)
            u = np.arange(g, g + m, dtype=np.uint64) * _GOLDEN + self.offset  # wraps mod 2^64 by design
            src = np.searchsorted(thresholds, u, side="right").astype(np.int64)
            for i in np.flatnonzero(self.caps < np.iinfo(np.int64).max):
                room = self.caps[i] - self.counts[i]
                hits = np.flatnonzero(src == i)
                if 0 < room < len(hits):  # the cap is reached inside this range: stop just after it
                    m = min(m, int(hits[room - 1]) + 1)
            src = src[:m]
            out[done : done + m] = src
            self.counts += np.bincount(src, minlength=len(self.names))
            self.position += m
            done += m
        return out

    def replay(self, position: int) -> None:
        """Counts at `position`, recomputed from the start (they are a function of it)."""
        self.position, self.counts[:] = 0, 0
        while self.position < position:
            self.assign(min(_REPLAY_CHUNK, position - self.position))


class MixtureLoader(Loader):
    """A Loader over a mixture (data/loader.py's step layout): this rank's micro-batches of each global step,
    each row from the source the module docstring picks."""

    def __init__(
        self,
        sources: list[MixSource],
        phases: list[tuple] | None = None,
        *,
        seq_len: int,
        tokens_per_step: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
    ):
        self._set_layout(seq_len, tokens_per_step, micro_batch, rank, world_size, device)
        self.sources = list(sources)
        self.phases = phases or [(0, np.asarray([s.weight for s in sources]) / sum(s.weight for s in sources))]
        self.meta = mix_meta(self.sources)
        self.streams = [open_split(s.dir, "train", vocab_size=vocab_size) for s in self.sources]
        self.num_windows = [(len(st) - 1) // seq_len for st in self.streams]
        for s, w in zip(self.sources, self.num_windows, strict=True):
            if w < 1:
                raise DataError(
                    f"the train split of {s.dir} ({s.name}) is shorter than one window of seq_len={seq_len}"
                )
        self.seed = seed
        self._reset_chooser()

    def _reset_chooser(self) -> None:
        self.chooser = SourceChooser(self.sources, self.phases, self.num_windows, self.windows_per_step, self.seed)
        # A distinct permutation seed per source (by position in the mix), each from the run's seed.
        self._perm_seeds = [_splitmix64(self.seed) ^ (i + 1) for i in range(len(self.sources))]

    @property
    def windows_consumed(self) -> int:
        return self.chooser.position

    def take_windows(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` (source index, window index) pairs of the global stream (for inspection)."""
        return self._take(count)

    def _take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        before = self.chooser.counts.copy()
        src = self.chooser.assign(count)
        win = np.empty(count, dtype=np.int64)
        for i in np.unique(src):
            rows = np.flatnonzero(src == i)
            k = before[i] + np.arange(len(rows))  # the k-th window this source gives
            n = self.num_windows[i]
            epochs, pos = k // n, k % n
            for e in np.unique(epochs):
                sel = epochs == e
                win[rows[sel]] = Permutation(n, self._perm_seeds[i], int(e))[pos[sel]]
        return src, win

    def source_stats(self) -> dict[str, dict]:
        """Per source: windows drawn so far, completed epochs, and the share of the stream so far."""
        total = max(1, self.chooser.position)
        return {
            s.name: {"windows": int(c), "epoch": int(c // n), "share": float(c / total)}
            for s, c, n in zip(self.sources, self.chooser.counts, self.num_windows, strict=True)
        }

    def state_dict(self) -> dict:
        stats = self.source_stats()
        return {
            "seed": int(self.seed),
            "windows_consumed": int(self.chooser.position),
            "sources": {name: {"windows": v["windows"], "epoch": v["epoch"]} for name, v in stats.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or set(sd) != {"seed", "windows_consumed", "sources"}:
            raise DataError(
                f"loader state {sd!r} is not a mixture's ({{'seed', 'windows_consumed', 'sources'}}): the checkpoint "
                f"was written by a run on data.dir, not data.mix; start over (train.resume=never) or use its data"
            )
        if not isinstance(sd["seed"], int) or not isinstance(sd["windows_consumed"], int) or sd["windows_consumed"] < 0:
            raise DataError(f"mixture loader state must hold int seed and windows_consumed >= 0, got {sd!r}")
        self.seed = sd["seed"]
        self._reset_chooser()
        self.chooser.replay(sd["windows_consumed"])
        saved = {n: v.get("windows") if isinstance(v, dict) else v for n, v in dict(sd["sources"]).items()}
        now = {n: v["windows"] for n, v in self.source_stats().items()}
        if saved != now:
            raise DataError(
                f"the checkpoint's mix drew {saved} windows per source by window {sd['windows_consumed']:,}, but "
                f"this data.mix gives {now}: the sources, weights, mix_schedule or epochs_cap changed since it was "
                f"saved. Resume with the same mix (change weights at a step with data.mix_schedule) or start over"
            )
