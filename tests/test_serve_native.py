"""``lowbit serve FOLDER``: continuous batching over ``lowbit.load`` and the OpenAI-compatible HTTP API.

The batching engine is checked against transformers' own greedy ``generate`` run one prompt at a time
(the rows of a batch are left-padded and merged into a running cache, so a wrong mask or position
would change the tokens). The HTTP tests start the real app under uvicorn on a free loopback port and
talk to it with the official ``openai`` client and with raw sockets (malformed JSON, a client that
disconnects mid-stream).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_tiny_model_dir
from lowbit.serve.batching import BatchEngine, Event, GenRequest

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
PROMPTS = ["the quick brown fox", "low bit", "a tiny model for tests has two layers and", "hello"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny Llama quantized to W4A16 g32 (RTN): a real compressed-tensors artifact."""
    import lowbit
    from lowbit.recipe.schema import Recipe

    base = make_tiny_model_dir(tmp_path_factory.mktemp("base"), "llama", seed=3)
    out = tmp_path_factory.mktemp("art") / "tiny-w4"
    scheme = lowbit.lookup_scheme("W4A16")
    import dataclasses

    recipe = Recipe(scheme=dataclasses.replace(scheme, group_size=32))
    lowbit.quantize(str(base), recipe, out)
    return out


@pytest.fixture(scope="module")
def loaded(artifact) -> tuple[Any, Any]:
    import lowbit

    model, tok = lowbit.load(artifact, "cpu")
    tok.chat_template = CHATML
    return model.eval(), tok


def _collect(engine: BatchEngine, prompt: list[int], n: int, done: dict, key: Any, **kw: Any) -> GenRequest:
    parts: list[str] = []

    def emit(ev: Event) -> None:
        if ev.kind == "text":
            parts.append(ev.text)
        else:
            done[key] = (ev, "".join(parts))

    req = GenRequest(prompt=prompt, max_tokens=n, emit=emit, temperature=0.0, **kw)
    engine.submit(req)
    return req


def _wait(done: dict, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(done) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == n, f"{len(done)} of {n} requests finished"


def test_batched_greedy_equals_one_at_a_time(loaded):
    _check_batched_greedy(*loaded)


def test_sliding_window_cache_runs_in_waves(tmp_path):
    """Gemma 3's sliding-window cache layers cannot take rows in mid-run: requests wait for the batch to
    empty, and still get exactly the lone greedy tokens."""
    import lowbit

    model, tok = lowbit.load(make_tiny_model_dir(tmp_path / "g", "gemma3", seed=1), "cpu")
    _check_batched_greedy(model.eval(), tok)


def _check_batched_greedy(model: Any, tok: Any) -> None:
    """Rows that join a running batch at different steps, with different prompt lengths, give exactly the
    tokens transformers' greedy generate gives each prompt alone (fp32: only a wrong mask or position
    changes an argmax; the batch's padded attention differs from the lone run by rounding only)."""
    engine = BatchEngine(model, tok, ctx=128, max_batch=8)
    engine.start()
    try:
        done: dict = {}
        reqs = []
        for i, p in enumerate(PROMPTS):
            reqs.append(_collect(engine, tok(p)["input_ids"], 12, done, i))
            time.sleep(0.05 * i)  # staggered: later rows join a batch already decoding
        _wait(done, len(PROMPTS))
    finally:
        engine.stop()
    assert engine.steps > 0
    for i, p in enumerate(PROMPTS):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        want = ref[0, ids.shape[1]:].tolist()
        got = reqs[i].generated
        assert got == want[:len(got)] and (len(got) == 12 or got[-1] == 2), (p, got, want)
        ev, text = done[i]
        assert ev.kind == "done" and ev.finish in ("stop", "length")
        assert text == tok.decode([t for t in got if t != 2], skip_special_tokens=True)


def test_stop_strings_cancel_and_sampling(loaded):
    model, tok = loaded
    engine = BatchEngine(model, tok, ctx=128, max_batch=4)
    engine.start()
    try:
        done: dict = {}
        ids = tok("the quick brown fox")["input_ids"]
        _collect(engine, ids, 20, done, "ref")
        _wait(done, 1)
        full = done["ref"][1]
        stop = full[3:5] if len(full) >= 5 else None
        gone = _collect(engine, ids, 100, done, "gone")
        gone.cancelled.set()  # a client that left: never answered, its row dropped
        if stop:
            _collect(engine, ids, 20, done, "stop", stop=(stop,))
        a = _collect(engine, ids, 10, done, "s1", seed=7)
        a.temperature = 1.0
        b = _collect(engine, ids, 10, done, "s2", seed=7)
        b.temperature = 1.0
        _wait(done, 4 if stop else 3)
        assert "gone" not in done and engine.load == (0, 0)
    finally:
        engine.stop()
    if stop:
        ev, text = done["stop"]
        assert ev.finish == "stop" and text == full[:full.find(stop)]
    assert a.generated == b.generated  # the same seed draws the same tokens, whatever else is in the batch


# -- HTTP -------------------------------------------------------------------------------------------------------
class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(loaded):
    from lowbit.serve.openai_api import ApiConfig, build_app

    model, tok = loaded
    engine = BatchEngine(model, tok, ctx=128, max_batch=16)
    engine.start()
    srv = _Server(build_app(engine, tok, ApiConfig(model_name="tiny-w4", ctx=128, api_key="k")))
    srv.engine = engine  # type: ignore[attr-defined]
    yield srv
    srv.stop()
    engine.stop()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Authorization": "Bearer k",
                                                          "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_streams_concurrently(server):
    import asyncio

    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", timeout=60)

    async def one(i: int) -> tuple[str | None, str]:
        s = await client.chat.completions.create(model="tiny-w4", max_tokens=8 + i, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": PROMPTS[i % 4]}])
        text, fin = "", None
        async for ch in s:
            if ch.choices and ch.choices[0].delta.content:
                text += ch.choices[0].delta.content
            if ch.choices and ch.choices[0].finish_reason:
                fin = ch.choices[0].finish_reason
        return fin, text

    async def main() -> list:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-w4"]
        return await asyncio.gather(*[one(i) for i in range(12)])

    results = asyncio.run(main())
    assert all(fin in ("stop", "length") for fin, _ in results), results  # none cut off
    sync = openai.OpenAI(base_url=server.url + "/v1", api_key="k", timeout=60)
    r = sync.completions.create(model="tiny-w4", prompt="hello", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "other", "prompt": "hi"}).encode(), 404, "model_not_found"),
    (json.dumps({"prompt": "hello " * 200}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"prompt": "hi", "max_tokens": 500}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, None),
    (json.dumps({"prompt": [10**9]}).encode(), 400, None),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), 400, None),
])
def test_bad_requests_are_4xx_and_the_server_goes_on(server, body, status, code):
    got, err = _post(server.url + "/v1/completions", body)
    assert got == status and err["error"]["message"] and err["error"]["code"] == code
    ok, res = _post(server.url + "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert ok == 200 and res["choices"][0]["finish_reason"] in ("stop", "length")


def test_cross_origin_refused(server):
    got, err = _post(server.url + "/v1/completions", b'{"prompt": "hi"}', {"Origin": "http://evil.example"})
    assert got == 403 and "cross-origin" in err["error"]["message"]


def test_disconnect_mid_stream_frees_the_row(server):
    body = json.dumps({"prompt": "the quick", "max_tokens": 100, "stream": True, "temperature": 1.0,
                       "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data:" not in got:
            part = s.recv(4096)
            assert part, got
            got += part
    deadline = time.monotonic() + 30
    while server.engine.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.load == (0, 0)
    ok, res = _post(server.url + "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}).encode())
    assert ok == 200 and res["object"] == "chat.completion"
