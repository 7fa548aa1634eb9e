"""`python -m data.bench`: the data pipeline's numbers (printed, never asserted).

1. prepare throughput: `data.prepare` from a JSONL corpus on disk to shards (reading, tokenizing on all
   cores, writing, hashing) against tiktoken's raw `encode_ordinary_batch` on all cores over the same
   documents already in memory. Goal: >= 80% of it.
2. prepare memory: peak RSS of a prepare process at 1x and 10x the corpus. Goal: 10x <= 1.2 x 1x.
3. parallel prepare of a sharded hub dataset: the 10x corpus as ten parquet shards of a local directory laid out
   like a hub dataset repository (data/train-0000i-of-00010.parquet), prepared from `hf:DIR` by a process per
   file (the path a sharded hub dataset takes), against the same baseline. Goal: >= 80% of it.
4. loader: microseconds per micro-batch of BatchLoader.next_step and val_batches.

The corpus is generated: paragraphs of Python's reference documentation (the embedded corpus),
shuffled with a fixed seed into documents of 1-30 paragraphs, until it reaches --mb megabytes.
Each prepare runs in a fresh process, so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data.machine import describe_cpu

_CHILD = "--child-prepare"


def documents(megabytes: float, seed: int) -> list[str]:
    """About `megabytes` MB of text as documents of 1-30 shuffled paragraphs of the embedded corpus."""
    from pydoc_data.topics import topics

    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    docs, written = [], 0
    while written < megabytes * 1e6:
        docs.append("\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 30))))
        written += len(docs[-1])
    return docs


def write_jsonl(path: Path, docs: list[str]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in docs)


def write_parquet(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)


def run_prepare_child(source: str, out: str, tokenizer: str, workers: int | None, per_file: bool) -> None:
    """In a fresh process: prepare once, print seconds, tokens and this process's peak RSS as JSON.

    per_file: a process per file whatever the source's size (prepare picks that path from 32 MB on disk)."""
    os.environ.setdefault("USE_TORCH", "0")  # as the CLI does: datasets need not import torch
    import datasets  # noqa: F401  (imported before the clock starts: a one-off cost, not throughput)

    import data.encode_files
    from data.prepare import prepare

    if per_file:
        data.encode_files._PARALLEL_MIN_BYTES = 0

    started, cpu = time.perf_counter(), tree_cpu_seconds()
    meta = prepare(out, source=source, tokenizer=tokenizer, workers=workers, progress=False)
    seconds, cpu = time.perf_counter() - started, tree_cpu_seconds() - cpu
    tokens = meta["train_tokens"] + meta["val_tokens"]
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "peak_mib": peak_rss_mib()}))


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, of its children it waited for, and of its live children
    with the children they waited for: prepare's per-file workers are forked and reaped by a forkserver, a
    child of this process. A rate per CPU second moves less with the load of a shared machine than a
    wall-clock rate, which the other jobs' share of the cores decides. Linux (/proc); elsewhere this process
    and its waited-for children."""
    total = sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except OSError:  # a process that ended meanwhile
            continue
        if int(fields[1]) == os.getpid():
            total += sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return total


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: Linux's VmHWM, which starts afresh at exec. Not ru_maxrss: Linux carries
    it over from the forked parent's image, so a child's would read at least its parent's (this bench's) RSS."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


def _prepare_in_child(source: str | Path, out: Path, tokenizer: str, workers: int | None, per_file=False) -> dict:
    cmd = [sys.executable, "-m", "data.bench", _CHILD, str(source), str(out), tokenizer, str(workers or 0)]
    cmd.append(str(int(per_file)))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"data.bench: prepare failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _baseline(docs: list[str], tokenizer: str, threads: int) -> dict:
    from data.tokenizer import get_tokenizer

    enc = get_tokenizer(tokenizer)
    enc.encode_ordinary_batch(docs[:200], num_threads=threads)  # warm the thread pool and caches
    started, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=threads))
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu, "tokens": tokens}


def _loader_us(data_dir: Path, seq_len: int, micro_batch: int, steps: int) -> tuple[float, float]:
    from data.loader import BatchLoader, val_batches

    loader = BatchLoader(data_dir, seq_len=seq_len, tokens_per_step=seq_len * micro_batch * 4, micro_batch=micro_batch)
    loader.next_step()
    started = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    train_us = (time.perf_counter() - started) / (steps * loader.grad_accum_steps) * 1e6
    started, n = time.perf_counter(), 0
    for _ in val_batches(data_dir, seq_len=seq_len, batch_size=micro_batch, max_batches=steps):
        n += 1
    return train_us, (time.perf_counter() - started) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == _CHILD:
        source, out, tokenizer, workers, per_file = argv[1:]
        run_prepare_child(source, out, tokenizer, int(workers) or None, per_file == "1")
        return
    parser = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="size of the 1x corpus in MB of text")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--workers", type=int, default=None, help="prepare threads (default: all cores)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="work here instead of a temporary directory")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        (tmp / "x1").mkdir()
        (tmp / "x10").mkdir()
        (tmp / "hub" / "data").mkdir(parents=True)
        for i in range(10):  # 10x: ten different shuffles of the same paragraphs, as JSONL and as parquet
            docs = documents(args.mb, seed=i)
            write_jsonl(tmp / "x10" / f"part-{i:02d}.jsonl", docs)
            write_parquet(tmp / "hub" / "data" / f"train-{i:05d}-of-00010.parquet", docs)
            if i == 0:
                write_jsonl(tmp / "x1" / "part-00.jsonl", docs)
                one_docs = docs
        print(
            f"corpus: {args.mb:g} MB of text, {len(one_docs):,} documents (1x); 10 such files (10x), as JSONL and "
            f"as parquet (hub); {describe_cpu()}; {cores} cores used; load average {os.getloadavg()[0]:.2f}"
        )

        # The machine may be shared: tiktoken's rate is measured before and after each prepare, and each
        # prepare is compared with the mean of the two, the rate of the machine as it was around it.
        runs = {}
        first = _baseline(one_docs, args.tokenizer, cores)
        base, cpu_rates = _rate(first), [first["tokens"] / first["cpu_seconds"]]
        for name, source, per_file in (
            ("1x", tmp / "x1", False),
            ("10x", tmp / "x10", False),
            # a process per file even below prepare's 32 MB threshold, so that a small --mb measures that path
            ("hub", f"hf:{tmp / 'hub'}", True),
        ):
            runs[name] = _prepare_in_child(source, tmp / f"ds-{name}", args.tokenizer, args.workers, per_file)
            measured = _baseline(one_docs, args.tokenizer, cores)
            after = _rate(measured)
            cpu_rates.append(measured["tokens"] / measured["cpu_seconds"])
            runs[name].update(bases=(base, after), base_rate=(base + after) / 2, load=os.getloadavg()[0])
            base = after
        del one_docs, docs
        train_us, val_us = _loader_us(tmp / "ds-10x", args.seq_len, args.micro_batch, steps=200)

    _report(args, cores, runs, sum(cpu_rates) / len(cpu_rates), train_us, val_us)


def _rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def _report(args, cores: int, runs: dict, base_cpu_rate: float, train_us: float, val_us: float) -> None:
    one, ten, hub = runs["1x"], runs["10x"], runs["hub"]
    # t = startup + tokens / rate: two sizes separate the one-off cost (tokenizer load, opening the source)
    # from the streaming rate that decides how long a real corpus takes.
    marginal = (ten["tokens"] - one["tokens"]) / (ten["seconds"] - one["seconds"])
    startup = one["seconds"] - one["tokens"] / marginal
    bases = [b for r in runs.values() for b in r["bases"]]
    print(f"tokenizer {args.tokenizer}: 1x = {one['tokens']:,} tokens, 10x = {ten['tokens']:,} tokens")
    print(
        f"tiktoken encode_ordinary_batch, {cores} threads, in memory: {min(bases) / 1e6:.2f}..{max(bases) / 1e6:.2f} "
        f"M tokens/s (measured between the rows; each row is compared with the mean of the two around it)"
    )
    rows = [
        ("data.prepare 1x, disk -> shards", one["tokens"] / one["seconds"], one, ""),
        ("data.prepare 10x, disk -> shards", ten["tokens"] / ten["seconds"], ten, ""),
        ("data.prepare marginal (10x - 1x)", marginal, ten, f" (+ {startup:.2f} s start-up per run)"),
        ("data.prepare hf: 10x as 10 parquet files, process per file", hub["tokens"] / hub["seconds"], hub, ""),
    ]
    for name, rate, run, extra in rows:
        print(
            f"{name:<58} {rate / 1e6:6.2f} M tokens/s = {rate / run['base_rate']:4.0%} of tiktoken "
            f"(load {run['load']:.1f}){extra}"
        )
    print(f"per CPU second (all processes; less moved by the load): tiktoken {base_cpu_rate / 1e6:.2f} M tokens")
    for name, run in runs.items():
        cpu_rate = run["tokens"] / run["cpu_seconds"]
        print(
            f"  data.prepare {name:<4} {cpu_rate / 1e6:6.2f} M tokens per CPU second = {cpu_rate / base_cpu_rate:4.0%}"
        )
    ratio = ten["peak_mib"] / one["peak_mib"]
    mib1, mib10 = one["peak_mib"], ten["peak_mib"]
    print(f"peak RSS of data.prepare: 1x {mib1:.0f} MiB, 10x {mib10:.0f} MiB (10x/1x = {ratio:.2f})")
    print(
        f"loader (B={args.micro_batch}, T={args.seq_len}): BatchLoader.next_step {train_us:.0f} us per micro-batch, "
        f"val_batches {val_us:.0f} us per batch"
    )


if __name__ == "__main__":
    main()
