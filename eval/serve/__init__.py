"""The OpenAI-compatible HTTP server with continuous batching (`python -m eval.serve`).

__main__.py       `python -m eval.serve`: load a checkpoint or ONNX decoder, start the engine, serve
app.py            the FastAPI routes: /v1/completions, /v1/models, /health, /metrics
protocol.py       the OpenAI schema: requests in, choices and server-sent events out
batching.py       the engine: requests join and leave one running batch of KV-cache rows (torch)
batching_onnx.py  the same engine on the exported ONNX decoder
bench.py          `python -m eval.serve.bench`: tokens/s and latency against the number of clients
"""
