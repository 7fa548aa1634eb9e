"""eval.serve / eval.batching: a live server on a free 127.0.0.1 port, driven by the real openai client.

The model is a tiny random modern-family artifact (bytes tokenizer); every expected text comes from
the no-cache greedy reference (eval.generate.generate_no_cache), not from the server itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import require_extra

require_extra("fastapi", "serve")
require_extra("uvicorn", "serve")
openai = require_extra("openai", "serve")
httpx = require_extra("httpx", "serve")

from _eval_fixtures import REPO, tiny_random  # noqa: E402

from data.tokenizer import get_tokenizer  # noqa: E402
from eval.batching import Engine, Seq  # noqa: E402
from eval.generate import generate_no_cache  # noqa: E402
from eval.openai_protocol import Server  # noqa: E402
from eval.serve_app import create_app  # noqa: E402
from model.io import load_model  # noqa: E402

BLOCK = 128
ENC = get_tokenizer("bytes")
EOT_ID = ENC.eot_token


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    art = tiny_random(tmp_path_factory.mktemp("serve") / "m", family="modern", block_size=BLOCK, seed=3)
    m, _ = load_model(art)
    return m


@pytest.fixture(scope="module")
def live(model):
    """(base_url, Server): uvicorn in a thread on a socket bound to 127.0.0.1:0, stopped after the module."""
    import uvicorn

    server = Server(Engine(model, max_batch=16, max_queue=64).start(), ENC, "tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    t = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    for _ in range(200):  # bounded wait for start-up
        if uv.started:
            break
        time.sleep(0.05)
    assert uv.started
    yield f"http://127.0.0.1:{port}", server
    uv.should_exit = True
    t.join(timeout=10)
    server.engine.stop()
    sock.close()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", timeout=60, max_retries=0)


def reference(model, text: str, n: int) -> str:
    """Greedy continuation by the no-cache reference, cut at <|endoftext|>, as text."""
    toks = generate_no_cache(lambda x: model(x), ENC.encode(text), n, BLOCK)
    if EOT_ID in toks:
        toks = toks[: toks.index(EOT_ID)]
    return ENC.decode(toks, errors="replace")


def test_completion_matches_reference(client, model):
    r = client.completions.create(model="tiny", prompt="def main(", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    (c,) = r.choices
    assert c.index == 0 and c.text == reference(model, "def main(", 24)
    assert c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len("def main(")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 24
    echoed = client.completions.create(model="tiny", prompt="def main(", max_tokens=24, temperature=0, echo=True)
    assert echoed.choices[0].text == "def main(" + c.text


def test_streaming_sse(client, live, model):
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == reference(model, "Hello", 20)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    body = {"prompt": "Hello", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live[0] + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 5


def test_stop_strings(client, model):
    full = reference(model, "x", 40)
    pairs = [i for i in range(3, len(full) - 2) if full[i : i + 2].isascii() and full[i : i + 2].isprintable()]
    assert pairs, f"the random model's continuation {full!r} has no printable pair to stop on"
    stop = full[pairs[0] : pairs[0] + 2]
    r = client.completions.create(model="tiny", prompt="x", max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="x", max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.index(stop)]


def test_n_and_seed(client):
    def ask(seed):
        r = client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=12, n=3, temperature=1.0, seed=seed)
        return [(c.index, c.text) for c in r.choices]

    a, b, c = ask(7), ask(7), ask(8)
    assert [i for i, _ in a] == list(range(6))
    assert a == b  # same seed, same texts
    assert a != c
    assert len({t for _, t in a[:3]}) > 1  # the choices of one prompt differ from each other


def test_concurrent_greedy_equals_alone(live):
    url, server = live
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 30))) for _ in range(16)]

    async def one(aclient, p):
        r = await aclient.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0)
        return r.choices[0].text

    async def run(ps):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in ps))

    alone = [asyncio.run(run([p]))[0] for p in prompts]
    steps, rows = server.engine.steps_total, server.engine.occupancy_sum
    assert asyncio.run(run(prompts)) == alone
    assert (server.engine.occupancy_sum - rows) / (server.engine.steps_total - steps) > 2  # they did share steps


def test_engine_joins_between_steps(model):
    """A short request that arrives while a long one runs finishes first (it did not wait for a free batch)."""
    eng = Engine(model, max_batch=4).start()
    try:
        long_started, done = threading.Event(), {}
        finished = threading.Event()

        def on_tok(s, tok, lp):
            if len(s.tokens) == 3:
                long_started.set()

        def on_fin(s, reason):
            done[s.id] = (reason, len(s.tokens))
            if a.id in done and b.id in done:
                finished.set()

        a = Seq([1, 2, 3], BLOCK - 3, temperature=0.5, seed=1, on_token=on_tok, on_finish=on_fin)
        b = Seq(  # no stop ids: neither ends before its max_tokens
            [4, 5],
            3,
            temperature=0.5,
            seed=2,
            on_finish=lambda s, r: (done.setdefault("b_at", len(a.tokens)), on_fin(s, r)),
        )
        eng.submit([a])
        assert long_started.wait(30)
        eng.submit([b])
        assert finished.wait(60)
        assert done[b.id] == ("length", 3) and done[a.id] == ("length", BLOCK - 3)
        assert done["b_at"] < BLOCK - 3  # b finished while a was still decoding
    finally:
        eng.stop()


def slow_steps(monkeypatch, engine, seconds=0.005):
    """Slow each decode step so a test can act while a request is still running (not a timing test)."""
    real = engine._decode

    def slow():
        time.sleep(seconds)
        real()

    monkeypatch.setattr(engine, "_decode", slow)


def wait_idle(server, limit=200) -> None:
    for _ in range(limit):
        if server.engine.running == 0 and server.engine.queue_length == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the engine still has running sequences")


def test_disconnect_frees_slot(live, monkeypatch):
    url, server = live
    slow_steps(monkeypatch, server.engine)
    before = server.engine.generated_tokens_total
    body = {"prompt": "x", "max_tokens": BLOCK - 2, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()  # held: a dropped iterator closes the connection
        next(lines)
        assert server.engine.running == 1
    wait_idle(server)
    assert server.engine.generated_tokens_total - before < BLOCK - 2  # it stopped early: the row was freed


def test_queue_full_is_429(live, monkeypatch):
    url, server = live
    slow_steps(monkeypatch, server.engine)
    monkeypatch.setattr(server.engine, "max_batch", 1)
    monkeypatch.setattr(server.engine, "max_queue", 0)
    body = {"prompt": "x", "max_tokens": BLOCK - 2, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()  # held: a dropped iterator closes the connection
        next(lines)
        r = httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "retry" in err["message"]
    wait_idle(server)
    monkeypatch.undo()
    assert httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=30).status_code == 200


BAD_BODIES = [
    b"{not json",
    b"",
    b"\xff\xfe",
    b"[1, 2]",
    b'"a string"',
    b"null",
    json.dumps({"prompt": "a", "max_tokens": "5"}).encode(),
    json.dumps({"prompt": "a", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "a", "max_tokens": -1}).encode(),
    json.dumps({"prompt": "a", "max_tokens": 10**6}).encode(),
    json.dumps({"prompt": "a" * (BLOCK + 5)}).encode(),
    json.dumps({"prompt": "a", "n": 10**9}).encode(),
    json.dumps({"prompt": "a", "n": 0}).encode(),
    json.dumps({"prompt": "a", "top_p": 0}).encode(),
    json.dumps({"prompt": "a", "logprobs": 99}).encode(),
    json.dumps({"prompt": "a", "frobnicate": True}).encode(),
    json.dumps({"prompt": []}).encode(),
    json.dumps({"prompt": [""]}).encode(),
    json.dumps({"prompt": [10**12]}).encode(),
    json.dumps({"prompt": [[-1]]}).encode(),
    json.dumps({"prompt": {"a": 1}}).encode(),
    json.dumps({"prompt": "a", "stop": 5}).encode(),
    json.dumps({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}).encode(),
    json.dumps({"prompt": "a", "stream": "yes"}).encode(),
    json.dumps({"prompt": "a", "presence_penalty": 1.0}).encode(),
    json.dumps({"prompt": "a", "seed": 1.5}).encode(),
]


def test_malformed_input_fuzz(live):
    url, _ = live
    rng = random.Random(1)
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "logprobs"]
    values = [None, -1, 0, 1e308, "x", [], {}, [[]], True, "\u0000", 2**70, [1, "a"]]
    mutated = [
        json.dumps({"prompt": "a", **{rng.choice(fields): rng.choice(values) for _ in range(3)}}).encode()
        for _ in range(40)
    ]
    with httpx.Client(base_url=url, timeout=30) as c:
        for body in BAD_BODIES:
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, body
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["message"]
        for body in mutated:  # any answer but a server error; the server must live on
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code in (200, 400), (body, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["message"]
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_openai_errors_and_chat(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a" * (BLOCK + 1), max_tokens=2)
    assert "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a", max_tokens=1)


def test_logprobs_and_echo_scoring(client, model):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and abs(max(top.values()) - chosen) < 1e-5  # greedy picks the top token
    # lm-eval's loglikelihood request: echo the prompt with its log-probs, generate nothing.
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "hello" and lp.tokens == list("hello") and lp.token_logprobs[0] is None
    ids = torch.tensor([ENC.encode("hello")])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids)[0].float(), -1)
    expect = [float(ref[t, ids[0, t + 1]]) for t in range(4)]
    assert lp.token_logprobs[1:] == pytest.approx(expect, abs=1e-5)


def test_models_metrics_health(live):
    url, _ = live
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    text = httpx.get(url + "/metrics").text
    for name in ("gptrain_requests_total", "gptrain_generated_tokens_total", "gptrain_queue_length"):
        assert name in text
    assert "gptrain_batch_occupancy" in text and "gptrain_time_to_first_token_seconds_count" in text
    assert httpx.get(url + "/nope").json()["error"]["message"]


def test_api_key(model):
    from fastapi.testclient import TestClient

    server = Server(Engine(model, max_batch=2).start(), ENC, "tiny", api_key="s3cret")
    try:
        with TestClient(create_app(server)) as c:
            assert c.get("/health").status_code == 200  # a load balancer's probe needs no key
            r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            ok = c.post(
                "/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 200
    finally:
        server.engine.stop()


def test_cli_user_errors(tmp_path):
    env_run = dict(cwd=REPO, capture_output=True, text=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "eval.serve", "--ckpt", str(tmp_path / "missing")], **env_run)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_engine_failure_is_reported(model, monkeypatch):
    """A bug in the engine thread: the request in flight gets a 500 body, /health 503, new requests 503."""
    from fastapi.testclient import TestClient

    server = Server(Engine(model, max_batch=2).start(), ENC, "tiny")

    def broken():
        raise RuntimeError("injected engine bug")

    monkeypatch.setattr(server.engine, "_decode", broken)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # the traceback the server log would show
    try:
        with TestClient(create_app(server)) as c:
            r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "ignore_eos": True})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert c.get("/health").status_code == 503
            r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
            assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    finally:
        server.engine.stop()


def test_cli_serves_and_stops(tmp_path):
    """python -m eval.serve end to end: binds 127.0.0.1 (port 0: a free one), answers, stops on SIGTERM."""
    import re
    import signal

    art = tiny_random(tmp_path / "m", family="modern", block_size=BLOCK)
    cmd = [sys.executable, "-m", "eval.serve", "--ckpt", str(art), "--port", "0", "--backend", "int8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:  # uvicorn logs the bound address once it listens
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the server did not start"
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        assert c.models.list().data[0].id == "m"
        r = c.completions.create(model="m", prompt="ab", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says what stopped it
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in proc.stderr.read()


@pytest.mark.slow  # the ONNX export takes most of its time
def test_onnx_engine_joins_and_leaves(model, tmp_path):
    """The ONNX decoder under continuous batching: 6 greedy sequences of different lengths through 3 rows
    (so rows join a running batch, longer and shorter, and leave it) give the no-cache reference tokens."""
    require_extra("onnxruntime", "onnx")
    from eval.backends import OnnxBackend
    from eval.batching_onnx import OnnxEngine
    from model.onnx_export import export_decoder

    path = export_decoder(model, tmp_path / "decoder.onnx", {"tokenizer": "bytes"})
    eng = OnnxEngine(OnnxBackend(path), max_batch=3).start()
    try:
        rng = random.Random(2)
        prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 17, 1, 9, 30, 5)]
        lengths = [5, 20, 12, 30, 8, 16]
        results, all_done = {}, threading.Event()

        def on_finish(s, reason):
            results[s.id] = list(s.tokens)
            if len(results) == len(prompts):
                all_done.set()

        seqs = [Seq(p, n, temperature=0, on_finish=on_finish) for p, n in zip(prompts, lengths, strict=True)]
        eng.submit(seqs)
        assert all_done.wait(120)
    finally:
        eng.stop()
    for s, p, n in zip(seqs, prompts, lengths, strict=True):
        assert results[s.id] == generate_no_cache(lambda x: model(x), p, n, BLOCK)
    assert eng.occupancy_sum > eng.steps_total  # rows did share steps
