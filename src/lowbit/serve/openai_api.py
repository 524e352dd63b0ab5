"""An OpenAI-compatible HTTP API over :class:`~lowbit.serve.batching.BatchEngine` (Starlette + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
gives server-sent events, ``data: {chunk}`` lines and a final ``data: [DONE]``), ``GET /health``.
Chat prompts are built by the tokenizer's own chat template.

Every refusal is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON or a bad field (400), a missing or wrong API key (401), an unknown model (404), a prompt
plus ``max_tokens`` longer than the context (400, ``context_length_exceeded``), a full queue (429). A
client that disconnects mid-stream cancels its request: the engine drops its row at the next step.
Without an API key only same-origin requests are answered (no CORS headers are sent, and a request whose
``Origin`` names another site is refused), so a web page cannot drive a local server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from lowbit.serve.batching import BatchEngine, Event, GenRequest, QueueFull

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes of a request body


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ApiConfig:
    model_name: str
    ctx: int
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()  # origins allowed to call from a browser (only with an API key)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, kind: type = float) -> Any:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {v!r}", param=key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must lie in [{lo}, {hi}], got {v}", param=key)
    return kind(v)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return ()
    s = [s] if isinstance(s, str) else s
    if not isinstance(s, list) or len(s) > 4 or not all(isinstance(x, str) and x for x in s):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(s)


class OpenAIServer:
    """Request parsing, prompt building, streaming and errors; generation is the engine's."""

    def __init__(self, engine: BatchEngine, tokenizer: Any, cfg: ApiConfig) -> None:
        self.engine, self.tok, self.cfg = engine, tokenizer, cfg
        self.created = int(time.time())

    # -- parsing ------------------------------------------------------------------------------------------------
    def check_model(self, body: dict[str, Any]) -> None:
        m = body.get("model")
        if m is not None and m != self.cfg.model_name:
            raise ApiError(404, f"model {m!r} does not exist; this server serves {self.cfg.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            msgs: list[Any] = body.get("messages") or []
            ok = isinstance(msgs, list) and len(msgs) > 0 and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
            if not ok:
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with string "
                                    "content", param="messages")
            if not getattr(self.tok, "chat_template", None):
                raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                               param="messages")
            try:
                text = self.tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                                    add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 -- the template's own refusal (e.g. roles must alternate)
                raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from e
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = len(self.tok)
            if any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"'prompt' token ids must lie in [0, {vocab})", param="prompt")
            return list(p)
        if not isinstance(p, str):
            raise ApiError(400, "'prompt' must be a string, a one-string list or a list of token ids", param="prompt")
        return list(self.tok(p)["input_ids"])

    def request(self, body: dict[str, Any], chat: bool, emit: Callable[[Event], None]) -> GenRequest:
        self.check_model(body)
        if _number(body, "n", 1, 1, 1, int) != 1:
            raise ApiError(400, "'n' must be 1", param="n")
        ids = self.prompt_ids(body, chat)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = self.cfg.ctx - len(ids)
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        default = max(room, 0) if chat else 16
        max_tokens = _number(body, key, default, 1, 1 << 30, int)
        if room < 1 or max_tokens > room:
            raise ApiError(400, f"this model's context is {self.cfg.ctx} tokens; the prompt has {len(ids)} and "
                                f"{max_tokens} more were asked for. Shorten the prompt or lower '{key}'",
                           param=key if room >= 1 else "messages" if chat else "prompt",
                           code="context_length_exceeded")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "'seed' must be an integer", param="seed")
        return GenRequest(prompt=ids, max_tokens=max_tokens, emit=emit, stop=_stops(body), seed=seed,
                          temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", 1.0, 1e-6, 1.0))

    # -- responses ----------------------------------------------------------------------------------------------
    def chunk(self, rid: str, chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.cfg.model_name,
                "choices": [choice]}

    def final(self, rid: str, chat: bool, text: str, finish: str | None, usage: dict | None) -> dict:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.cfg.model_name, "choices": [choice], "usage": usage}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.created,
                                            "owned_by": "lowbit", "max_model_len": self.cfg.ctx}]}


def build_app(engine: BatchEngine, tokenizer: Any, cfg: ApiConfig) -> Any:
    """The Starlette application (the engine must be started by the caller, or by the app's lifespan)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    api = OpenAIServer(engine, tokenizer, cfg)

    def error(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def guard(req: Request) -> dict[str, str]:
        return access(req.headers, cfg)

    async def models(req: Request) -> Response:
        try:
            return JSONResponse(api.models(), headers=guard(req))
        except ApiError as e:
            return error(e)

    async def health(req: Request) -> Response:
        running, waiting = engine.load
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting})

    async def preflight(req: Request) -> Response:
        got = preflight_headers(req.headers, cfg)
        if got is None:
            return error(ApiError(403, "cross-origin requests are refused (see --cors-origin)", "permission_error"))
        return Response(status_code=204, headers=got)

    async def generate(req: Request, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            headers = guard(req)
            body = await _read_json(req)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ApiError(400, "'stream' must be true or false", param="stream")
            g = api.request(body, chat, emit)
            engine.submit(g)
        except ClientDisconnect:
            return Response(status_code=499)
        except ApiError as e:
            return error(e)
        except QueueFull as e:
            return error(ApiError(429, str(e), "rate_limit_error"))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return StreamingResponse(_sse(api, rid, chat, events, g), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        parts: list[str] = []
        try:
            while True:
                ev = await events.get()
                if ev.kind == "text":
                    parts.append(ev.text)
                elif ev.kind == "error":
                    return JSONResponse(ApiError(500, ev.text, "server_error").body(), status_code=500)
                else:
                    return JSONResponse(api.final(rid, chat, "".join(parts), ev.finish, ev.usage), headers=headers)
        finally:
            g.cancelled.set()  # a client gone while waiting frees its row

    async def completions(req: Request) -> Response:
        return await generate(req, chat=False)

    async def chat_completions(req: Request) -> Response:
        return await generate(req, chat=True)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        engine.stop()

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    routes += [Route(r.path, preflight, methods=["OPTIONS"]) for r in routes if r.path.startswith("/v1")]
    app = Starlette(routes=routes, lifespan=lifespan)

    async def not_found(req: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return error(ApiError(code, f"{req.method} {req.url.path} is not an endpoint of this server "
                                    "(/v1/models, /v1/completions, /v1/chat/completions)"))

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    return app


def access(headers: Any, cfg: ApiConfig) -> dict[str, str]:
    """Origin and API-key checks of one request (``headers``: a mapping, lower-case names); returns the CORS
    headers to send (none unless the origin is allowed). Raises :class:`ApiError` 403 / 401."""
    origin = headers.get("origin")
    allowed = origin is not None and cfg.api_key is not None and ("*" in cfg.cors_origins
                                                                   or origin in cfg.cors_origins)
    if origin is not None and not allowed and origin.split("://", 1)[-1] != headers.get("host", ""):
        raise ApiError(403, f"cross-origin requests from {origin} are refused; start the server with --api-key "
                            "and --cors-origin ORIGIN to allow a web page", "permission_error")
    if cfg.api_key is not None:
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if allowed and origin else {}


def preflight_headers(headers: Any, cfg: ApiConfig) -> dict[str, str] | None:
    """The answer's headers to a CORS preflight from an allowed origin, else None."""
    origin = headers.get("origin")
    if origin and cfg.api_key is not None and ("*" in cfg.cors_origins or origin in cfg.cors_origins):
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Vary": "Origin"}
    return None


async def _read_json(req: Any) -> dict[str, Any]:
    return parse_json(await read_body(req.headers, req.stream()))


async def read_body(headers: Any, chunks: AsyncIterator[bytes]) -> bytes:
    """The request body, refused (413) past :data:`MAX_BODY` bytes before it is all read."""
    try:
        size = int(headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    if size > MAX_BODY:
        raise ApiError(413, f"request body of {size} bytes exceeds {MAX_BODY}")
    raw = b""
    async for part in chunks:
        raw += part
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body exceeds {MAX_BODY} bytes")
    return raw


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object, or :class:`ApiError` 400 that says what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _sse(api: OpenAIServer, rid: str, chat: bool, events: asyncio.Queue[Event], g: GenRequest
               ) -> AsyncIterator[bytes]:
    """Server-sent events of one request; a disconnect (the task is cancelled) cancels the request."""
    def line(obj: Any) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    try:
        first = True
        if chat:
            yield line(api.chunk(rid, chat, None, None, first=True))
            first = False
        while True:
            ev = await events.get()
            if ev.kind == "text":
                yield line(api.chunk(rid, chat, ev.text, None, first=first))
                first = False
            elif ev.kind == "error":
                yield line(ApiError(500, ev.text, "server_error").body())
                break
            else:
                yield line(api.chunk(rid, chat, None, ev.finish))
                break
        yield b"data: [DONE]\n\n"
    finally:
        g.cancelled.set()
