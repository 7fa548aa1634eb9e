"""python -m eval.serve: an OpenAI-compatible HTTP server with continuous batching.

    python -m eval.serve --ckpt runs/debug                       # http://127.0.0.1:8000/v1
    python -m eval.serve --ckpt runs/debug --backend int8 --max-batch 32
    python -m eval.serve --backend onnx --onnx export/        # the decoder graph of python -m eval.export
    python -m eval.serve --ckpt runs/debug --host 0.0.0.0 --api-key "$KEY"

Endpoints: POST /v1/completions (OpenAI's legacy completions schema, streamed as server-sent
events when stream is true), GET /v1/models, GET /health, GET /metrics (Prometheus text).
POST /v1/chat/completions answers 400: our checkpoints are base models with no chat template.
Requests share the running batch (eval/serve/batching.py); the protocol is eval/serve/protocol.py, the
routes eval/serve/app.py. Needs the serve extra: pip install -e '.[serve]'.
The server binds to 127.0.0.1 unless --host says otherwise; --api-key requires
`Authorization: Bearer KEY` on every endpoint but /health. docs/serving.md has example requests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.cli import UsageError, run
from eval.serve.protocol import Server


def build(args: argparse.Namespace) -> Server:
    """Load the model, start the engine; the Server the app serves."""
    from eval.backends import load_backend
    from eval.sample import get_encoding
    from eval.serve.batching import Engine

    if args.backend == "onnx":
        from eval.serve.batching_onnx import OnnxEngine

        backend = load_backend("onnx", None, args.onnx, args.dtype, False, args.device)
        where = args.onnx
    else:
        backend = load_backend(args.backend, args.ckpt, None, args.dtype, False, args.device)
        where = args.ckpt
    enc = get_encoding(args.tokenizer or backend.tokenizer, where)
    if enc.n_vocab > backend.vocab_size:
        raise UsageError(f"tokenizer {enc.name!r} has {enc.n_vocab} tokens but the model only {backend.vocab_size}")
    if args.backend == "onnx":
        engine = OnnxEngine(backend, max_batch=args.max_batch, max_queue=args.max_queue).start()
    else:
        engine = Engine(backend.model, max_batch=args.max_batch, max_queue=args.max_queue).start()
    name = args.model_name or Path(where).resolve().name
    return Server(engine, enc, name, api_key=args.api_key)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--ckpt", help="run directory, checkpoint or model artifact (torch and int8 backends)")
    p.add_argument("--backend", default="torch", help="torch, int8 or onnx (default torch)")
    p.add_argument("--onnx", help="decoder .onnx file, or the directory eval.export wrote (onnx backend)")
    p.add_argument("--dtype", default="fp32", help="torch backend precision: fp32 or bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--tokenizer", help="override the tokenizer spec of the checkpoint's metadata")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint's directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting beyond that; more get 429")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (use it whenever --host is not local)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("the server needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    from eval.serve.app import create_app

    server = build(args)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        server.engine.stop()


if __name__ == "__main__":
    sys.exit(run(main))
