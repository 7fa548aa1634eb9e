"""python -m eval.serve.bench: what continuous batching buys, printed (docs/serving.md's table comes from here).

    python -m eval.serve.bench                                   # demo model and gpt2, 1 / 4 / 16 clients
    python -m eval.serve.bench --models demo --clients 1,16 --max-tokens 32
    python -m eval.serve.bench --models ckpt --ckpt runs/debug

For each model an in-process server (eval.serve's app and engine, on a free 127.0.0.1 port) is driven
by C concurrent clients, each sending --requests completions one after the other (greedy, a
--prompt-len token prompt, exactly --max-tokens new tokens: ignore_eos). Printed per C: aggregate
generated tokens/s over the wall time, p50 / p99 request latency, mean decode batch; then the ratio
of the largest C's tokens/s to one client's (the serving goal: >= 4x at 16 clients on CPU, docs/serving.md).
Models with random weights are fine for speed. This prints numbers; no test times anything.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time

import torch

from data.machine import describe_cpu
from eval.bench import DEMO
from eval.cli import UsageError, run
from model import GPT, ModelConfig


def build_model(name: str, ckpt: str | None) -> tuple[GPT, str]:
    """(model, tokenizer spec)."""
    if name == "ckpt":
        if not ckpt:
            raise UsageError("--models ckpt needs --ckpt")
        from model.io import load_model

        model, meta = load_model(ckpt)
        return model.eval(), meta.get("tokenizer") or "bytes"
    torch.manual_seed(0)
    if name == "demo":
        return GPT(ModelConfig(**DEMO)).eval(), "bytes"
    if name == "gpt2":
        return GPT(ModelConfig.from_preset("gpt2")).eval(), "gpt2"
    raise UsageError(f"unknown model {name!r}; choose demo, gpt2 or ckpt")


class LiveServer:
    """uvicorn in a thread on a socket bound to 127.0.0.1:0."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        while not self.uv.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join()
        self.sock.close()


async def drive(url: str, clients: int, requests: int, body: dict) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, generated tokens) for `clients` concurrent request loops."""
    import httpx

    latencies: list[float] = []
    tokens = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for _ in range(requests):
            t = time.perf_counter()
            r = await c.post("/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:
        await c.post("/v1/completions", json={**body, "max_tokens": 2})  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, tokens


def bench(name: str, args) -> None:
    from data.tokenizer import get_tokenizer
    from eval.backends import decode_layout
    from eval.serve.app import create_app
    from eval.serve.batching import Engine
    from eval.serve.protocol import Server

    model, spec = build_model(name, args.ckpt)
    decode_layout(model)  # as eval.serve's torch backend stores its weights
    cfg = model.config
    if args.prompt_len + args.max_tokens > cfg.block_size:
        raise UsageError(f"--prompt-len + --max-tokens exceeds {name}'s context of {cfg.block_size}")
    engine = Engine(model, max_batch=max(args.clients), max_queue=4 * max(args.clients)).start()
    server = Server(engine, get_tokenizer(spec), name)
    prompt = torch.randint(0, min(cfg.vocab_size, 256), (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    body = {"prompt": prompt.tolist(), "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    print(
        f"\n{name}: {model.num_params() / 1e6:.1f}M params, prompt {args.prompt_len} tokens, "
        f"{args.max_tokens} new tokens per request, {args.requests} requests per client, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'clients':>8} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'mean batch':>11}")
    rates = {}
    try:
        with LiveServer(create_app(server)) as live:
            for c in args.clients:
                steps, rows = engine.steps_total, engine.occupancy_sum
                wall, lat, tokens = asyncio.run(drive(live.url, c, args.requests, body))
                rates[c] = tokens / wall
                q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
                batch = (engine.occupancy_sum - rows) / max(1, engine.steps_total - steps)
                print(f"{c:>8} {rates[c]:>9.1f} {q[49]:>8.2f} {q[98]:>8.2f} {batch:>11.1f}")
    finally:
        engine.stop()
    lo, hi = min(args.clients), max(args.clients)
    if lo != hi:
        ratio = rates[hi] / rates[lo]
        verdict = "goal met" if hi >= 16 and ratio >= 4 else "goal (>= 4x at 16 clients) not met"
        print(f"{hi} vs {lo} client(s): {ratio:.1f}x aggregate tokens/s ({verdict})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.serve.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--models", default="demo,gpt2", help="comma-separated: demo, gpt2, ckpt")
    p.add_argument("--ckpt", help="checkpoint for --models ckpt")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",")})
    except ValueError:
        raise UsageError(f"--clients takes comma-separated integers, got {args.clients!r}") from None
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1 or args.prompt_len < 1:
        raise UsageError("--clients, --requests, --max-tokens and --prompt-len must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {describe_cpu()}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        bench(name.strip(), args)


if __name__ == "__main__":
    sys.exit(run(main))
