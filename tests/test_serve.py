"""eval.serve / eval.serve.batching: a live server on a free 127.0.0.1 port, driven by the real openai client.

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
from eval.generate import generate_no_cache  # noqa: E402
from eval.serve.app import create_app  # noqa: E402
from eval.serve.batching import Engine, Seq  # noqa: E402
from eval.serve.protocol import Server  # noqa: E402
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


def test_n_and_seed(client, live):
    """docs/serving.md: choice j of a request with seed s is what a one-choice request with seed s + j
    gives, for every prompt of the request, also while other requests share the batch."""

    def ask(seed, n=3, prompt=("ab", "cd")):
        r = client.completions.create(model="tiny", prompt=list(prompt), max_tokens=12, n=n, temperature=1.0, seed=seed)
        return [(c.index, c.text) for c in r.choices]

    a, b, c = ask(7), ask(7), ask(8)
    assert [i for i, _ in a] == list(range(6))
    assert a == b  # same seed, same texts
    assert a != c
    assert len({t for _, t in a[:3]}) > 1  # the choices of one prompt differ from each other
    for i, prompt in enumerate(("ab", "cd")):
        for j in range(3):
            assert a[i * 3 + j][1] == ask(7 + j, n=1, prompt=(prompt,))[0][1], (prompt, j)

    async def under_load():
        rng = random.Random(2)
        noise = ["".join(rng.choice("xyz ") for _ in range(rng.randint(1, 20))) for _ in range(8)]
        async with openai.AsyncOpenAI(base_url=live[0] + "/v1", api_key="unused", timeout=60, max_retries=0) as ac:
            kw = dict(model="tiny", max_tokens=12, temperature=1.0)
            jobs = [ac.completions.create(prompt=p, **kw, seed=99) for p in noise]
            jobs += [ac.completions.create(prompt=["ab", "cd"], n=3, seed=7, **kw)]
            jobs += [ac.completions.create(prompt="cd", n=1, seed=7 + j, **kw) for j in range(3)]
            return await asyncio.gather(*jobs)

    *_, many, s0, s1, s2 = asyncio.run(under_load())
    assert [(ch.index, ch.text) for ch in many.choices] == a
    assert [r.choices[0].text for r in (s0, s1, s2)] == [t for _, t in a[3:]]


def test_n_boundary(live):
    """n up to the engine's batch (16 here) is served; one more is a 400 that names the limit; prompts x n
    beyond what the server holds at once (max_queue 64 + max_batch 16) is a 400, not a 429."""
    url, server = live
    body = {"prompt": "a", "max_tokens": 1, "temperature": 1.0, "seed": 0}
    r = httpx.post(url + "/v1/completions", json={**body, "n": 16}, timeout=60)
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == list(range(16))
    r = httpx.post(url + "/v1/completions", json={**body, "n": 17}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most 16" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**body, "prompt": ["a"] * 6, "n": 16}, timeout=60)
    assert r.status_code == 400 and "(80)" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**body, "prompt": ["a"] * 5, "n": 16}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 80


def test_prompt_of_exactly_the_context(live, model):
    """A prompt of BLOCK tokens leaves no room to generate (400 naming the context) but can be scored
    (max_tokens 0, echo, logprobs: lm-eval's loglikelihood); BLOCK - 1 tokens leave room for one."""
    url, _ = live
    ids = [int(t) for t in torch.randint(0, 256, (BLOCK,), generator=torch.Generator().manual_seed(5))]
    r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and str(BLOCK) in r.json()["error"]["message"]
    r = httpx.post(
        url + "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}, timeout=60
    )
    assert r.status_code == 200
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # (BLOCK, V)
    assert got[0] is None and got[1:] == pytest.approx([float(ref[t, ids[t + 1]]) for t in range(BLOCK - 1)], abs=1e-4)
    body = {"prompt": ids[:-1], "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    assert r.json()["choices"][0]["text"] == ENC.decode([int(ref[-2].argmax())], errors="replace")
    body["max_tokens"] = 2
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 400


def test_eot_finishes_a_choice(client):
    """<|endoftext|> ends a choice with finish_reason "stop" and is not in its text; ignore_eos samples
    past it. The same seed samples the same tokens either way, so the text without ignore_eos is the
    ignore_eos text cut where <|endoftext|> first appears."""
    eot = ENC.decode([EOT_ID])
    kw = dict(model="tiny", prompt="q", max_tokens=60, temperature=1.0, logprobs=0)
    r = client.completions.create(**kw, n=16, seed=0, extra_body={"ignore_eos": True})
    hits = [c.index for c in r.choices if eot in c.logprobs.tokens]
    assert hits, "no choice sampled <|endoftext|>: pick another prompt or more tokens"
    j = hits[0]
    tokens = r.choices[j].logprobs.tokens
    k = tokens.index(eot)
    stopped = client.completions.create(**kw, n=1, seed=j)
    (c,) = stopped.choices
    assert c.finish_reason == "stop" and c.logprobs.tokens == tokens[:k]
    assert c.text == r.choices[j].text[: r.choices[j].text.index(eot)]
    assert stopped.usage.completion_tokens == k  # the tokens of the text; <|endoftext|> is not returned


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


def test_engine_and_generate_sample_the_same_tokens(model):
    """The engine drives generate's step and sampling rule: a sampled sequence (temperature, top-k, top-p)
    with seed s gets the tokens generate gives its prompt alone with seed s, also while other rows share
    its steps and join and leave around it."""
    from model.generation import CachedDecoder, generate

    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    prompts = [[5, 6, 7], [70, 71, 72, 73, 74, 75, 76], [9], [100, 101]]
    lengths = [24, 9, 30, 5]
    expected = [
        generate(CachedDecoder(model), [p], n, seed=40 + i, **kw)[0]
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    eng = Engine(model, max_batch=2).start()  # 4 sequences through 2 rows: rows join and leave mid-run
    try:
        results, all_done = {}, threading.Event()

        def on_finish(s, reason):
            results[s.id] = list(s.tokens)
            if len(results) == len(prompts):
                all_done.set()

        seqs = [
            Seq(p, n, seed=40 + i, on_finish=on_finish, **kw)
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        eng.submit(seqs)
        assert all_done.wait(60)
    finally:
        eng.stop()
    assert [results[s.id] for s in seqs] == expected
    assert eng.occupancy_sum > eng.steps_total  # rows did share steps


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


def raw_post(url: str, body: dict) -> socket.socket:
    """POST /v1/completions on a bare socket: the test closes it to play a client that leaves."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(cond, limit=400) -> None:
    for _ in range(limit):
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("the engine never reached the expected state")


def test_disconnect_from_a_non_streaming_request_frees_slot(live, monkeypatch):
    """A client that leaves a JSON (non-streaming) request: its row is freed long before max_tokens."""
    url, server = live
    slow_steps(monkeypatch, server.engine, seconds=0.05)  # BLOCK - 2 steps: over 6 s if never cancelled
    before = server.engine.generated_tokens_total
    sock = raw_post(url, {"prompt": "x", "max_tokens": BLOCK - 2, "ignore_eos": True})
    wait_for(lambda: server.engine.running == 1)
    sock.close()
    wait_idle(server)
    assert server.engine.generated_tokens_total - before < BLOCK - 2  # it stopped early: the row was freed


@pytest.mark.parametrize("stream", [False, True])
def test_request_cancelled_while_queued_leaves_the_queue(live, monkeypatch, stream):
    """One row, busy: a queued request whose client leaves is out of the queue while the running one
    still runs (it holds no queue place), and it never generates a token."""
    url, server = live
    slow_steps(monkeypatch, server.engine, seconds=0.05)
    monkeypatch.setattr(server.engine, "max_batch", 1)
    long = {"prompt": "x", "max_tokens": BLOCK - 2, "ignore_eos": True, "stream": True}
    seqs_before = server.engine.sequences_total
    with httpx.stream("POST", url + "/v1/completions", json=long, timeout=30) as resp:
        lines = resp.iter_lines()  # held: a dropped iterator closes the connection
        next(lines)
        sock = raw_post(url, {"prompt": "y", "max_tokens": 5, "stream": stream})
        wait_for(lambda: server.engine.queue_length == 1)
        sock.close()
        wait_for(lambda: server.engine.queue_length == 0)
        assert server.engine.running == 1  # the long request is still running
    wait_idle(server)
    assert server.engine.sequences_total - seqs_before == 1  # the queued one was never prefilled


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


def scrape(url: str, **kw) -> dict[str, float]:
    """/metrics in the Prometheus text format -> {'name{labels}': value}."""
    text = httpx.get(url + "/metrics", **kw).text
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def test_models_metrics_health(live):
    url, server = live
    wait_idle(server)
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "running": 0, "waiting": 0}
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == BLOCK
    before = scrape(url)
    for name in ("gptrain_queue_length", "gptrain_batch_occupancy", "gptrain_time_to_first_token_seconds_count"):
        assert name in before
    assert before["gptrain_queue_length"] == 0 and before["gptrain_batch_occupancy"] == 0
    body = {"prompt": ["abc", "de"], "n": 2, "max_tokens": 7, "ignore_eos": True}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    nope = httpx.get(url + "/nope")
    assert nope.status_code == 404 and "/nope" in nope.json()["error"]["message"]
    after = scrape(url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta['gptrain_requests_total{code="200"}'] == 1 and delta['gptrain_requests_total{code="404"}'] == 1
    assert delta["gptrain_sequences_total"] == 4  # 2 prompts x n=2
    assert delta["gptrain_prompt_tokens_total"] == 2 * (3 + 2)
    assert delta["gptrain_generated_tokens_total"] == 4 * 7
    assert delta["gptrain_time_to_first_token_seconds_count"] == 4
    assert delta["gptrain_decode_rows_total"] >= 4 * 6  # the first token of each comes from its prefill


def test_api_key(model):
    from fastapi.testclient import TestClient

    server = Server(Engine(model, max_batch=2).start(), ENC, "tiny", api_key="s3cret")
    # ignore_eos: an untrained model may sample <|endoftext|> first, which generates no token
    body = {"prompt": "a", "max_tokens": 1, "ignore_eos": True}
    try:
        with TestClient(create_app(server)) as c:
            assert c.get("/health").status_code == 200  # a load balancer's probe needs no key
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                for r in (
                    c.post("/v1/completions", json=body, headers=headers),
                    c.get("/v1/models", headers=headers),
                    c.get("/metrics", headers=headers),
                ):
                    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
            key = {"Authorization": "Bearer s3cret"}
            assert c.post("/v1/completions", json=body, headers=key).status_code == 200
            assert c.get("/v1/models", headers=key).json()["data"][0]["id"] == "tiny"
            assert "gptrain_generated_tokens_total 1" in c.get("/metrics", headers=key).text
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
    from eval.serve.batching_onnx import OnnxEngine
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
