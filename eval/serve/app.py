"""The FastAPI app of eval.serve: /v1/completions (JSON or server-sent events), /v1/chat/completions
(400 for base models), /v1/models, /health, /metrics, optional Bearer key. Needs the serve extra."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from eval.serve.protocol import ApiError, Choice, Server, error_body, merge_logprobs

DISCONNECT_POLL_S = 0.5  # how often a JSON request checks that its client is still there


class BearerAuth:
    """Requires `Authorization: Bearer KEY` on every path but /health. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware reports a streaming request as disconnected once its body was read."""

    def __init__(self, app, key: str, fail):
        self.app, self.expected, self.fail = app, f"Bearer {key}".encode(), fail

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                msg = "missing or wrong API key: send Authorization: Bearer KEY"
                await self.fail(401, msg, type_="authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server):
    """The FastAPI app around a started engine."""
    app = FastAPI(title="gptrain", docs_url=None, redoc_url=None)
    engine = server.engine

    def fail(status: int, message: str, param=None, type_="invalid_request_error") -> JSONResponse:
        server.requests_total[str(status)] = server.requests_total.get(str(status), 0) + 1
        return JSONResponse(error_body(message, type_, param), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return fail(400, f"invalid request: {exc.errors()[0].get('msg')}")

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return fail(404, f"no endpoint {request.method} {request.url.path}; see GET /v1/models", type_="not_found")

    @app.exception_handler(405)
    async def _method(request, exc):
        return fail(405, f"{request.url.path} does not accept {request.method}")

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # a bug: logged with its traceback by uvicorn; the client gets a 500 body
        return fail(500, f"internal error ({type(exc).__name__}); see the server log", type_="server_error")

    if server.api_key:
        app.add_middleware(BearerAuth, key=server.api_key, fail=fail)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "detail": repr(engine.error)}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_length}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "gptrain",
                    "max_model_len": engine.block_size,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(server), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return fail(
            400,
            f"model {server.model_name!r} is a base model with no chat template, so it has no chat format; "
            "send the text to POST /v1/completions instead",
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        loop = asyncio.get_running_loop()
        try:
            req = server.parse(await request.body())
            choices, events = server.start(req, loop)
        except ApiError as e:
            return fail(e.status, e.message, e.param, e.type)
        server.requests_total["200"] = server.requests_total.get("200", 0) + 1
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name}
        prompt_tokens = sum(len(c.prompt) for c in choices)
        echo = [server.enc.decode(c.prompt, errors="replace") if req.echo else "" for c in choices]
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            gen = stream_events(choices, events, head, echo, prompt_tokens, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, finish, lps = list(echo), [None] * len(choices), [[] for _ in choices]
        completion_tokens, left = 0, len(choices)
        check_at = loop.time() + DISCONNECT_POLL_S
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    ev = None
                if loop.time() >= check_at:  # on a timer: tokens arriving must not hide a client that left
                    if await request.is_disconnected():
                        return None
                    check_at = loop.time() + DISCONNECT_POLL_S
                if ev is None:
                    continue
                if ev[0] == "logprobs":
                    lps[ev[1]].extend(ev[2])
                elif ev[0] == "text":
                    texts[ev[1]] += ev[2]
                    lps[ev[1]].extend(ev[3])
                elif ev[0] == "error":
                    return fail(500, ev[2], type_="server_error")
                else:
                    _, i, text, reason, n_tokens = ev
                    texts[i] += text
                    finish[i], left = reason, left - 1
                    completion_tokens += n_tokens
        finally:
            for c in choices:
                c.seq.cancel()  # a disconnected client's rows leave at the next step; finished ones are gone
        return {
            **head,
            "choices": [
                {
                    "text": texts[i],
                    "index": i,
                    "logprobs": merge_logprobs(lps[i]) if req.logprobs is not None else None,
                    "finish_reason": finish[i],
                }
                for i in range(len(choices))
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def stream_events(
    choices: list[Choice], events: asyncio.Queue, head: dict, echo: list[str], prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per choice with its finish_reason,
    a usage chunk when asked, then `data: [DONE]`. Closing the generator (the client left) cancels."""

    def chunk(i: int, text: str, reason=None, lps=None) -> str:
        c = {"text": text, "index": i, "logprobs": merge_logprobs(lps or []), "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [c]})}\n\n"

    left, completion_tokens = len(choices), 0
    try:
        for i, text in enumerate(echo):
            if text:
                yield chunk(i, text)
        while left:
            ev = await events.get()
            if ev[0] == "logprobs":
                yield chunk(ev[1], "", lps=ev[2])
            elif ev[0] == "text":
                yield chunk(ev[1], ev[2], lps=ev[3])
            elif ev[0] == "error":  # the status line is long gone: the error goes in the stream, as vLLM does
                yield f"data: {json.dumps(error_body(ev[2], 'server_error'))}\n\n"
                break
            else:
                _, i, text, reason, n_tokens = ev
                yield chunk(i, text, reason)
                left -= 1
                completion_tokens += n_tokens
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_tokens, completion_tokens)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            c.seq.cancel()


def prometheus(server: Server) -> str:
    e = server.engine
    lines = [
        "# HELP gptrain_requests_total HTTP completion requests by status code.",
        "# TYPE gptrain_requests_total counter",
        *(f'gptrain_requests_total{{code="{k}"}} {v}' for k, v in sorted(server.requests_total.items())),
        "# TYPE gptrain_sequences_total counter",
        f"gptrain_sequences_total {e.sequences_total}",
        "# TYPE gptrain_prompt_tokens_total counter",
        f"gptrain_prompt_tokens_total {e.prompt_tokens_total}",
        "# TYPE gptrain_generated_tokens_total counter",
        f"gptrain_generated_tokens_total {e.generated_tokens_total}",
        "# HELP gptrain_queue_length Sequences waiting for a batch row.",
        "# TYPE gptrain_queue_length gauge",
        f"gptrain_queue_length {e.queue_length}",
        "# HELP gptrain_batch_occupancy Running sequences / --max-batch, now.",
        "# TYPE gptrain_batch_occupancy gauge",
        f"gptrain_batch_occupancy {e.running / e.max_batch}",
        "# HELP gptrain_decode_steps_total Decode steps; gptrain_decode_rows_total / this = mean batch size.",
        "# TYPE gptrain_decode_steps_total counter",
        f"gptrain_decode_steps_total {e.steps_total}",
        "# TYPE gptrain_decode_rows_total counter",
        f"gptrain_decode_rows_total {e.occupancy_sum}",
        "# HELP gptrain_time_to_first_token_seconds From queueing a sequence to its first token.",
        "# TYPE gptrain_time_to_first_token_seconds summary",
        f"gptrain_time_to_first_token_seconds_sum {e.ttft_sum}",
        f"gptrain_time_to_first_token_seconds_count {e.ttft_count}",
    ]
    return "\n".join(lines) + "\n"
