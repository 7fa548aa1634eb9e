"""Liveness: the heartbeat file an outside scheduler reads, and the hang watchdog (docs/training.md, "Hangs").

Heartbeat: rank 0 replaces RUN/heartbeat.json at every log step (and at start-up) with {"step", "time",
"world_size", "max_steps", "pid", "host"}; a run whose heartbeat "time" is older than a few log
intervals is not making progress.

Watchdog (train.step_timeout_s): a daemon thread on every rank. When no step (nor evaluation, sampling or
save) has completed for the timeout, it writes this rank's Python stacks (faulthandler, every thread), its
last completed step and the collective its main thread waits in (if any) to RUN/hang/rank_NNNNN.txt, and
on CUDA the NCCL flight recorder's dump (RUN/hang/nccl_trace_rank_NNNNN.pkl; written when
TORCH_NCCL_TRACE_BUFFER_SIZE > 0; this call is not exercised by the CPU tests). It waits a grace period
for the other ranks' files; rank 0 then logs one line naming the ranks that did not arrive (no file, an
older last step than the others, or outside the collective that the others of the newest step wait in);
every rank exits with EXIT_HANG, so that torchrun (--max-restarts) or the scheduler can restart the job.
`auto` arms the watchdog after WARMUP_STEPS steps at max(AUTO_FLOOR_S, AUTO_FACTOR x the slowest step
seen so far).

Fault injection, for the hang test only: GPTRAIN_HANG=STEP:RANK makes every rank join one extra
all-reduce in step STEP (after the backward, before the optimizer step), and RANK sleep for an hour
before it joins: the other ranks wait inside the collective, as they would for a rank that died or
deadlocked, and their stacks name it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HANG_ENV = "GPTRAIN_HANG"
EXIT_HANG = 3
WARMUP_STEPS = 5  # compile and the allocator settle in the first steps (torchtitan warms up as many)
AUTO_FACTOR = 10.0
AUTO_FLOOR_S = 300.0
HEARTBEAT = "heartbeat.json"
HANG_DIR = "hang"


def write_heartbeat(run_dir: Path, step: int, world_size: int, max_steps: int) -> None:
    """Rank 0: replace RUN/heartbeat.json (a rename, so a reader never sees half a file)."""
    record = {
        "step": step,
        "time": time.time(),
        "world_size": world_size,
        "max_steps": max_steps,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    tmp = run_dir / f".{HEARTBEAT}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, run_dir / HEARTBEAT)


def maybe_hang(rank: int, step: int, collective) -> None:
    """The hang test's hook (module docstring); collective(): one all-reduce over every rank."""
    spec = os.environ.get(HANG_ENV)
    if not spec or spec.partition(":")[0] != str(step):
        return
    if spec == f"{step}:{rank}":
        time.sleep(3600)
    collective()


def parse_timeout(value: str) -> float | None:
    """train.step_timeout_s: seconds (0 = off: None), or -1.0 for auto."""
    if value == "auto":
        return -1.0
    return float(value) or None


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout: str, log=print):
        self.dir, self.rank, self.world_size, self.log = Path(run_dir) / HANG_DIR, rank, world_size, log
        seconds = parse_timeout(timeout)
        self.auto = seconds == -1.0
        self.timeout = None if self.auto else seconds
        self.step, self.steps_seen, self.slowest = 0, 0, 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if seconds is not None:
            self.thread = threading.Thread(target=self._watch, name="gptrain-watchdog", daemon=True)
            self.thread.start()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()  # the loop ended (or raised): nothing more to watch
        if self.thread is not None:
            self.thread.join()

    def beat(self, step: int | None = None) -> None:
        """A step (or an evaluation / save) completed: restart the clock."""
        now = time.monotonic()
        with self.lock:
            if step is not None and step != self.step:
                self.steps_seen += 1
                if self.steps_seen > 1:  # the first step includes compilation and warm-up
                    self.slowest = max(self.slowest, now - self.last)
                self.step = step
                if self.auto and self.steps_seen >= WARMUP_STEPS:
                    self.timeout = max(AUTO_FLOOR_S, AUTO_FACTOR * self.slowest)
            self.last = now

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            with self.lock:
                timeout, idle, step = self.timeout, time.monotonic() - self.last, self.step
            if timeout is not None and step > 0 and idle > timeout:
                self._fire(timeout, step)

    def _fire(self, timeout: float, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank_{self.rank:05d}.txt"
        waiting = _collective_frame(threading.main_thread())
        with open(path, "w") as f:
            f.write(
                f"rank {self.rank} pid {os.getpid()} host {socket.gethostname()} last_step {step} "
                f"waiting_in {waiting or '-'}\n"
            )
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        self._nccl_dump()
        grace = min(30.0, max(5.0, timeout / 4))
        deadline = time.monotonic() + grace
        steps = {}
        while time.monotonic() < deadline:
            steps = _dumped_steps(self.dir, self.world_size)
            if len(steps) == self.world_size:
                break
            time.sleep(0.2)
        if self.rank == 0:
            late = _late_ranks(steps, self.world_size, step)
            self.log(
                f"hang: no step completed in {timeout:.0f} s (train.step_timeout_s) after step {step}; "
                f"ranks that did not arrive: {late or 'none (all stuck in the same step)'}; "
                f"stacks in {self.dir}; exiting with {EXIT_HANG}"
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_HANG)  # the main thread is stuck: only a hard exit ends the process

    def _nccl_dump(self) -> None:
        """On CUDA: the NCCL flight recorder's dump (torch's private API; guarded, untested on the CPU)."""
        try:
            import torch

            if not torch.cuda.is_available():
                return
            from torch._C._distributed_c10d import _dump_nccl_trace

            (self.dir / f"nccl_trace_rank_{self.rank:05d}.pkl").write_bytes(_dump_nccl_trace())
        except Exception as e:  # noqa: BLE001 -- a missing recorder must not hide the stacks
            self.log(f"rank {self.rank}: no NCCL flight recorder dump ({type(e).__name__}: {e})")


def _collective_frame(thread: threading.Thread) -> str | None:
    """The torch.distributed collective `thread` is inside (e.g. all_reduce), or None."""
    frame = sys._current_frames().get(thread.ident)
    inner = None
    while frame is not None:  # innermost first: keep the outermost collective frame (the one the caller called)
        if frame.f_code.co_filename.endswith("distributed_c10d.py"):
            inner = frame.f_code.co_name
        frame = frame.f_back
    return inner


def _dumped_steps(hang_dir: Path, world_size: int) -> dict[int, tuple[int, bool]]:
    """{rank: (last completed step, inside a collective)} of the ranks whose stack file is readable."""
    out = {}
    for r in range(world_size):
        try:
            words = (hang_dir / f"rank_{r:05d}.txt").read_text().split("\n", 1)[0].split()
            out[r] = (int(words[words.index("last_step") + 1]), words[words.index("waiting_in") + 1] != "-")
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return out


def _late_ranks(steps: dict[int, tuple[int, bool]], world_size: int, step: int) -> list[int]:
    """The ranks that did not arrive: no stack file, an older last step than the newest, or, at the
    newest step, outside the collective that other ranks of that step wait in."""
    newest = max((s for s, _ in steps.values()), default=step)
    waiting = any(w for s, w in steps.values() if s == newest)
    return [r for r in range(world_size) if r not in steps or steps[r][0] < newest or (waiting and not steps[r][1])]
