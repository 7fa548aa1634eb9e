"""The OpenAI completions protocol on top of the batching engine, without the web framework.

Request schema (pydantic), validation against the model's limits, OpenAI's error body, and the
per-choice text assembly (detokenizing, stop strings, log-probs) that runs on the engine thread and
hands events to the request's asyncio loop. eval/serve/app.py wires it to HTTP routes.
"""

from __future__ import annotations

import asyncio
import json
import time

from eval.generate import TextStream
from eval.serve.batching import Engine, EngineDown, LogProb, QueueFull, Seq
from eval.stops import StopWriter, stop_rules

EOT = "<|endoftext|>"
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs; more than that is a 400


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    """OpenAI's error schema: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def request_model():
    """The completions request schema (pydantic; imported lazily so eval.serve --help needs no extra)."""

    from pydantic import BaseModel, ConfigDict, Field

    class CompletionRequest(BaseModel):
        # Unknown fields are an error, not silently ignored; types are not coerced ("5" is not 5).
        model_config = ConfigDict(extra="forbid", strict=True)
        model: str | None = None
        prompt: str | list[str] | list[int] | list[list[int]] = EOT
        max_tokens: int | None = Field(16, ge=0)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's): -1 or 0 = all tokens
        n: int = Field(1, ge=1)
        best_of: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict[str, bool] | None = None
        echo: bool = False
        logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict[str, float] | None = None
        suffix: str | None = None
        user: str | None = None
        ignore_eos: bool = False  # an extension (vLLM's): generate past <|endoftext|>, e.g. for benchmarks

    return CompletionRequest


def validation_message(err) -> tuple[str, str | None]:
    """The first pydantic error as one sentence naming the field."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not isinstance(x, int) or x) or None
    field = loc.split(".")[0] if loc else None
    if e["type"] == "extra_forbidden":
        return f"unknown field {field!r}; see the OpenAI completions API for the accepted fields", field
    return f"invalid value for {loc or 'the body'}: {e['msg']}", field


class Server:
    """What a request needs: the engine, the tokenizer, the limits. create_app() wires it to FastAPI."""

    def __init__(self, engine: Engine, enc, model_name: str, max_n: int | None = None, api_key: str | None = None):
        self.engine, self.enc, self.model_name, self.api_key = engine, enc, model_name, api_key
        self.max_n = max_n or engine.max_batch
        self.created = int(time.time())
        self.requests_total: dict[str, int] = {}  # by HTTP status
        self.Request = request_model()

    # ------------------------------------------------------------ parsing
    def parse(self, raw: bytes):
        from pydantic import ValidationError

        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = self.Request.model_validate(body)
        except ValidationError as e:
            msg, param = validation_message(e)
            raise ApiError(400, msg, param) from None
        return req

    def prompts(self, req) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list = [p]
        elif p and isinstance(p[0], int):
            texts = [p]
        else:
            texts = list(p)
        if not texts:
            raise ApiError(400, "prompt is an empty list; give a string or a list of strings", "prompt")
        out = []
        for t in texts:
            ids = self.enc.encode(t, allowed_special="all") if isinstance(t, str) else list(t)
            if not ids:
                raise ApiError(400, "a prompt is empty; give at least one token of text", "prompt")
            bad = [i for i in ids if not 0 <= i < self.engine.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.engine.vocab_size - 1})")
            out.append(ids)
        return out

    def check(self, req, prompts: list[list[int]]) -> int:
        """Limits a request must meet before it is queued; returns max_tokens."""
        unsupported = {
            "presence_penalty": req.presence_penalty != 0,
            "frequency_penalty": req.frequency_penalty != 0,
            "logit_bias": bool(req.logit_bias),
            "suffix": req.suffix is not None,
            "best_of": req.best_of is not None and req.best_of != req.n,
        }
        for name, used in unsupported.items():
            if used:
                raise ApiError(400, f"{name} is not supported by this server; leave it out", name)
        if req.n > self.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {self.max_n} choices per request", "n")
        total, room = req.n * len(prompts), self.engine.max_queue + self.engine.max_batch
        if total > room:  # would be refused even by an idle server: a 400, not a 429
            raise ApiError(400, f"{total} prompts x choices exceed what this server holds at once ({room})", "n")
        if req.model not in (None, self.model_name):
            raise ApiError(
                404, f"model {req.model!r} is not served here; GET /v1/models lists {self.model_name!r}", "model"
            )
        longest = max(len(p) for p in prompts)
        if longest >= self.engine.block_size and not (req.max_tokens == 0 and longest == self.engine.block_size):
            raise ApiError(
                400,
                f"the prompt is {longest} tokens but the model's context is {self.engine.block_size}; shorten it",
                "prompt",
            )
        room = self.engine.block_size - longest
        max_tokens = room if req.max_tokens is None else req.max_tokens
        if max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens ({max_tokens}) + the prompt ({longest} tokens) exceeds the model's context of "
                f"{self.engine.block_size} tokens; ask for at most {room}",
                "max_tokens",
            )
        return max_tokens

    # ---------------------------------------------------------- completion
    def start(self, req, loop: asyncio.AbstractEventLoop) -> tuple[list[Choice], asyncio.Queue]:
        """Queue every choice of the request; events come back on the returned asyncio queue."""
        prompts = self.prompts(req)
        max_tokens = self.check(req, prompts)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, f"stop has {len(stop)} entries; at most 4", "stop")
        stop_ids, stop_texts = stop_rules(self.enc, [*([] if req.ignore_eos else [EOT]), *stop])
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        top_p = req.top_p if req.top_p < 1 else None
        events: asyncio.Queue = asyncio.Queue()
        choices = []
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                index = i * req.n + j
                seed = None if req.seed is None else req.seed + j
                c = Choice(index, ids, self.enc, stop_texts, events, loop, req.logprobs)
                c.seq = Seq(
                    ids,
                    max_tokens,
                    temperature=req.temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=seed,
                    logprobs=req.logprobs,
                    prompt_logprobs=req.echo and req.logprobs is not None,
                    stop_ids=stop_ids,
                    on_token=c.on_token,
                    on_finish=c.on_finish,
                    on_prompt_logprobs=c.on_prompt_logprobs,
                )
                choices.append(c)
        try:
            self.engine.submit([c.seq for c in choices])
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", type_="rate_limit_error") from None
        except EngineDown as e:
            raise ApiError(503, f"{e}; see the server log and restart it", type_="server_error") from None
        return choices, events


class Choice:
    """One choice's text, built on the engine thread and handed to the request's event loop."""

    def __init__(self, index, prompt, enc, stop_texts, events, loop, logprobs):
        self.index, self.prompt, self.enc = index, prompt, enc
        self.events, self.loop = events, loop
        self.stream = TextStream(enc)
        self.writer = StopWriter(stop_texts, self._text)
        self.pending = ""
        self.want_logprobs = logprobs is not None
        self.lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0
        self.hit = False
        self.seq: Seq | None = None

    def _text(self, s: str) -> None:
        self.pending += s

    def _send(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def token_text(self, tok: int) -> str:
        """The token as text; a token that is not whole UTF-8 is "bytes:\\xNN..." as OpenAI writes it."""
        b = self.enc.decode_single_token_bytes(tok)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def _add_logprob(self, tok: int, lp: LogProb) -> dict:
        text = self.token_text(tok)
        entry = {
            "tokens": [text],
            "token_logprobs": [None if lp is None else lp[0]],
            "top_logprobs": [None if lp is None else {self.token_text(t): v for t, v in lp[1]}],
            "text_offset": [self.offset],
        }
        self.offset += len(text)
        return entry

    def on_prompt_logprobs(self, seq: Seq, lps: list[LogProb]) -> None:
        entries = [self._add_logprob(t, lp) for t, lp in zip(self.prompt, lps, strict=True)]
        self._send(("logprobs", self.index, entries))

    def on_token(self, seq: Seq, tok: int, lp: LogProb) -> bool:
        hit = self.hit = self.writer.feed(self.stream.push(tok))
        lps = [self._add_logprob(tok, lp)] if self.want_logprobs else []
        if self.pending or lps:
            self._send(("text", self.index, self.pending, lps))
            self.pending = ""
        return hit

    def on_finish(self, seq: Seq, reason: str) -> None:
        if reason == "abort":  # the engine thread died (its traceback is in the server log)
            self._send(("error", self.index, "the generation engine failed; see the server log"))
            return
        if not self.hit:  # a stop string already cut the text; otherwise the held-back text is due
            self.writer.feed(self.stream.flush())
            self.writer.close()
        self._send(("done", self.index, self.pending, "stop" if reason == "stop" else "length", len(seq.tokens)))
        self.pending = ""


def merge_logprobs(entries: list[dict]) -> dict | None:
    if not entries:
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        for k in out:
            out[k].extend(e[k])
    return out
