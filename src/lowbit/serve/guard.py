"""An ASGI middleware that checks requests before llama-cpp-python's server sees them.

It applies lowbit's access rules (:func:`lowbit.serve.openai_api.access`: API key, no cross-origin calls
unless allowed) and, for the generation endpoints, reads the body once (bounded), refuses malformed
JSON, an unknown model and a prompt longer than the context with OpenAI-style 4xx answers, then hands
the same bytes on. Later ``receive`` calls go to the client again, so a disconnect mid-stream is still
seen by the server (which then frees the model for the next request).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lowbit.serve.openai_api import ApiConfig, ApiError, access, parse_json, preflight_headers, read_body

log = logging.getLogger(__name__)

GENERATE = ("/v1/completions", "/v1/chat/completions")
Check = Callable[[str, dict[str, Any]], None]


class _Gone(Exception):
    """The client disconnected while its body was being read."""


class RequestGuard:
    def __init__(self, app: Any, cfg: ApiConfig, check: Check | None = None) -> None:
        self.app, self.cfg, self.check = app, cfg, check

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse, Response

        headers = Headers(scope=scope)
        try:
            if scope["method"] == "OPTIONS":
                got = preflight_headers(headers, self.cfg)
                if got is None:
                    raise ApiError(403, "cross-origin requests are refused (see --cors-origin)", "permission_error")
                await Response(status_code=204, headers=got)(scope, receive, send)
                return
            cors = access(headers, self.cfg)
            if scope["method"] == "POST" and scope["path"] in GENERATE:
                raw = await read_body(headers, _chunks(receive))
                body = parse_json(raw)
                model = body.get("model")
                if model is not None and model != self.cfg.model_name:
                    raise ApiError(404, f"model {model!r} does not exist; this server serves "
                                        f"{self.cfg.model_name!r} (GET /v1/models)", param="model",
                                   code="model_not_found")
                if self.check is not None:
                    await run_in_threadpool(self.check, scope["path"], body)
                receive = _replay(raw, receive)
        except _Gone:
            return
        except ApiError as e:
            await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
            return
        await self.app(scope, receive, _adding(send, cors) if cors else send)


async def _chunks(receive: Callable[[], Awaitable[dict]]) -> AsyncIterator[bytes]:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _Gone
        yield msg.get("body", b"")
        if not msg.get("more_body", False):
            return


def _replay(raw: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return again


def _adding(send: Callable, extra: dict[str, str]) -> Callable:
    async def wrapped(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": list(msg.get("headers", [])) + [(k.lower().encode(), v.encode())
                                                                       for k, v in extra.items()]}
        await send(msg)

    return wrapped


def gguf_checker(cfg: ApiConfig, info: Any, chat_format: str | None) -> Check:
    """Refuse (400) a prompt that llama.cpp's context cannot hold, counted with the served model's own
    tokenizer and (for chat, when the GGUF's template is used) its own chat template; and a prompt plus
    ``max_tokens`` past it, as the lowbit server does."""
    def check(path: str, body: dict[str, Any]) -> None:
        llama = _current_llama()
        if llama is None or cfg.ctx <= 0:
            return
        chat = path.endswith("chat/completions")
        text = _chat_prompt(info, body) if chat and chat_format is None else None if chat else body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            return  # llama-cpp-python validates the rest itself
        n = len(llama.tokenize(text.encode("utf-8", "replace"), add_bos=not chat, special=chat))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = body.get(key)
        asked = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0
        if n >= cfg.ctx or n + asked > cfg.ctx:
            raise ApiError(400, f"this model's context is {cfg.ctx} tokens; the prompt has {n} and {asked} more "
                                f"were asked for. Shorten the prompt or lower '{key}'",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

    return check


def _current_llama() -> Any:
    from llama_cpp.server import app as server_app

    proxy = getattr(server_app, "_llama_proxy", None)
    return getattr(proxy, "_current_model", None)


def _chat_prompt(info: Any, body: dict[str, Any]) -> str | None:
    msgs = body.get("messages")
    if info is None or not info.template or not isinstance(msgs, list):
        return None
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template=info.template, eos_token=info.eos or "", bos_token=info.bos or "")
        return str(fmt(messages=msgs).prompt)
    except Exception:  # noqa: BLE001 -- llama-cpp-python reports template errors itself
        return None
