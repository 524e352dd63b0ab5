"""Serve a GGUF file over an OpenAI-compatible HTTP API through llama-cpp-python's server.

The chat prompt is built from the GGUF's own ``tokenizer.chat_template`` (Jinja, rendered by
llama-cpp-python; its stop token is the GGUF's EOS and llama.cpp also stops on every end-of-generation
token). Without a template in the file llama-cpp-python would fall back to the Llama-2 format, so we
warn and ask for ``--chat-format``. The file is checked before anything loads: the ``GGUF`` magic,
a header that ``gguf.GGUFReader`` parses and tensor data that fits in the file.

Endpoints (llama-cpp-python): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming
with ``stream=true``), ``/v1/embeddings``. SIGINT/SIGTERM stop uvicorn gracefully (exit status 0).

Changed from llama-cpp-python's defaults: a request that arrives while another streams waits its turn
(``interrupt_requests=False``; by default llama-cpp-python ends the running stream after one chunk, with no
``finish_reason``); its wide-open CORS policy is replaced by lowbit's (:func:`lowbit.serve.openai_api.access`:
no cross-origin calls unless ``--api-key`` and ``--cors-origin``); and :class:`RequestGuard` answers, before
llama-cpp-python sees them, malformed JSON (400), an unknown model (404; llama-cpp-python would silently
use its own) and a prompt longer than the context (400 ``context_length_exceeded``; a streamed request
would otherwise end in a broken stream).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.core.errors import LowbitError, ModelLoadError
from lowbit.models.loader import check_gguf

log = logging.getLogger(__name__)

INSTALL = "pip install 'lowbit[llamacpp]'"
TEMPLATE_FORMAT = "chat_template.default"  # llama-cpp-python's name for the GGUF's own template


@dataclass(frozen=True)
class ChatInfo:
    """What a GGUF says about chat: its Jinja template and the texts of its special tokens."""

    template: str | None
    bos: str | None
    eos: str | None
    eot: str | None  # end-of-turn token, when the file names one apart from EOS
    architecture: str
    context_length: int | None


def check_gguf_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a complete GGUF file; else a :class:`ModelLoadError` that says how to fix it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"no such file: {p}. Fix: pass the path of a .gguf file (e.g. one `lowbit gguf` wrote).")
    if p.stat().st_size < 4:
        raise ModelLoadError(f"{p} is not a GGUF file ({p.stat().st_size} bytes). Fix: pass a real .gguf file.")
    check_gguf(p)  # magic, header, tensor extents
    return p


def read_chat_info(path: str | Path) -> ChatInfo:
    """The chat template and special-token texts of a GGUF file (its header is checked on the way)."""
    from lowbit.models.gguf_header import read_header

    fields = read_header(path).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []

    def text(key: str) -> str | None:
        tid = fields.get(key)
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < len(tokens):
            return None
        return str(tokens[tid])

    arch = str(fields.get("general.architecture") or "unknown")
    ctx = fields.get(f"{arch}.context_length")
    template = fields.get("tokenizer.chat_template")
    eos, eot = text("tokenizer.ggml.eos_token_id"), text("tokenizer.ggml.eot_token_id")
    return ChatInfo(template=template if isinstance(template, str) and template else None,
                    bos=text("tokenizer.ggml.bos_token_id"), eos=eos, eot=eot if eot != eos else None,
                    architecture=arch,
                    context_length=ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None)


def _llama_chat_format() -> Any:
    try:
        from llama_cpp import llama_chat_format
    except ImportError as exc:
        raise LowbitError(f"serving needs llama-cpp-python ({exc}); install it: {INSTALL}") from exc
    return llama_chat_format


def choose_chat_format(info: ChatInfo, override: str | None) -> str | None:
    """The ``chat_format`` to pass to llama-cpp-python: the override if valid, else None (the GGUF's template).

    An unknown override is refused with the list of valid names. A file without a template gets a
    warning (llama-cpp-python would format chats as Llama-2) and None.
    """
    if override:
        registry = _llama_chat_format().LlamaChatCompletionHandlerRegistry()._chat_handlers
        valid = sorted(registry) + ([TEMPLATE_FORMAT] if info.template else [])
        if override not in valid:
            raise LowbitError(f"unknown --chat-format {override!r}; use one of: {', '.join(valid)}")
        log.info("chat format: %s (from --chat-format)", override)
        return override
    if info.template:
        log.info("chat format: the GGUF's tokenizer.chat_template (stop on %r and every end-of-generation token)",
                 info.eos)
        return None
    log.warning("the GGUF has no tokenizer.chat_template: llama-cpp-python would format chats as Llama-2. "
                "Fix: pass --chat-format (e.g. chatml, gemma, llama-3, mistral-instruct) if you use /v1/chat; "
                "/v1/completions is unaffected")
    return None


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``lowbit serve``; ``ctx=0`` means the model's training context, ``threads=None`` llama.cpp's
    default (half the CPUs)."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 8000
    ctx: int = 2048
    threads: int | None = None
    chat_format: str | None = None
    api_key: str | None = None
    name: str | None = None  # the model's name in the API (default: the file's stem)
    gpu_layers: int = 0  # layers offloaded to the GPU (-1: all); needs a CUDA build of llama-cpp-python
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise LowbitError(f"--port {self.port} is not a TCP port; use 1-65535 (e.g. 8000)")
        if self.ctx < 0:
            raise LowbitError(f"--ctx {self.ctx} is negative; use 0 (the model's context) or a token count")
        if self.threads is not None and self.threads < 1:
            raise LowbitError(f"--threads {self.threads} must be at least 1")
        if self.gpu_layers < -1:
            raise LowbitError(f"--gpu-layers {self.gpu_layers}: use -1 (all), 0 (CPU) or a layer count")
        if self.cors_origins and not self.api_key:
            raise LowbitError("--cors-origin lets web pages call the server: it needs --api-key too")


def check_port_free(host: str, port: int) -> None:
    """Raise a LowbitError when ``host:port`` cannot be bound (in use, or an address not on this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LowbitError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port, "
                              "or a --host address of this machine") from exc


def build_app(cfg: ServeConfig, info: ChatInfo | None = None) -> Any:
    """The llama-cpp-python FastAPI app for ``cfg`` (the model is loaded here); ``info``: the file is checked."""
    path = cfg.model if info is not None else check_gguf_file(cfg.model)
    info = info or read_chat_info(path)
    chat_format = choose_chat_format(info, cfg.chat_format)
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise LowbitError(f"serving needs llama-cpp-python with its server extra ({exc}); install it: {INSTALL}") \
            from exc
    threads: dict[str, Any] = {} if cfg.threads is None else {"n_threads": cfg.threads, "n_threads_batch": cfg.threads}
    if cfg.gpu_layers:
        _check_gpu_offload()
    model = ModelSettings(model=str(path), model_alias=cfg.name or path.stem, n_ctx=cfg.ctx,
                          n_gpu_layers=cfg.gpu_layers, logits_all=False, chat_format=chat_format, verbose=False,
                          **threads)
    server = ServerSettings(host=cfg.host, port=cfg.port, api_key=cfg.api_key, interrupt_requests=False)
    try:
        app = create_app(server_settings=server, model_settings=[model])
    except ValueError as exc:  # llama.cpp's "Failed to load model from file"
        raise ModelLoadError(f"llama.cpp could not load {path} ({exc}). Fix: upgrade llama-cpp-python if the "
                             "architecture or quant type is newer than it, or re-export the file.") from exc
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    from lowbit.serve.guard import RequestGuard, gguf_checker
    from lowbit.serve.openai_api import ApiConfig

    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    n_ctx = cfg.ctx or int(info.context_length or 0)
    api = ApiConfig(model_name=cfg.name or path.stem, ctx=n_ctx, api_key=cfg.api_key, cors_origins=cfg.cors_origins)
    app.user_middleware.insert(0, Middleware(RequestGuard, cfg=api, check=gguf_checker(api, info, chat_format)))
    return app


def _check_gpu_offload() -> None:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        raise LowbitError("--gpu-layers needs a llama-cpp-python built with GPU support (this one is CPU-only); "
                          "reinstall it with CMAKE_ARGS='-DGGML_CUDA=on', or drop --gpu-layers")


def serve(cfg: ServeConfig) -> None:
    """Serve ``cfg.model`` until SIGINT/SIGTERM (blocking); returns normally after the graceful shutdown.

    uvicorn handles both signals (finishes open requests, closes the socket); recent versions then
    re-raise the caught signal, which would end the process with a traceback or by the signal. The
    shutdown is the whole answer to the signal here, so it is not re-raised: the process exits 0.
    """
    info = read_chat_info(check_gguf_file(cfg.model))  # the file first: its error is the one to see
    check_port_free(cfg.host, cfg.port)
    app = build_app(cfg, info)
    auth = " (API key required)" if cfg.api_key else ""
    log.info("serving %s on http://%s:%d/v1 as model %r%s", cfg.model.name, cfg.host, cfg.port,
             cfg.name or cfg.model.stem, auth)
    run_uvicorn(app, cfg.host, cfg.port)


def run_uvicorn(app: Any, host: str, port: int) -> None:
    """Run ``app`` until SIGINT/SIGTERM; the graceful shutdown is the whole answer to the signal (exit 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)).run()
    except KeyboardInterrupt:  # a second Ctrl-C forces the exit
        pass
    log.info("server stopped")
