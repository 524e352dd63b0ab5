"""Serve any lowbit artifact (or model folder) through ``lowbit.load`` with continuous batching.

``lowbit.load(path, device)`` gives the model with lowbit's runtime modules (and whatever fast kernels
they pick for the device); :class:`~lowbit.serve.batching.BatchEngine` batches the requests and
:mod:`lowbit.serve.openai_api` speaks OpenAI's API over HTTP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.core.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeConfig:
    """Options of ``lowbit serve`` for a model folder; ``ctx=0``: the model's own context length."""

    model: Path
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    ctx: int = 2048
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_batch: int = 64
    max_queue: int = 1024
    name: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise LowbitError(f"--port {self.port} is not a TCP port; use 1-65535 (e.g. 8000)")
        if self.ctx < 0:
            raise LowbitError(f"--ctx {self.ctx} is negative; use 0 (the model's context) or a token count")
        if self.max_batch < 1 or self.max_queue < 1:
            raise LowbitError("--max-batch and --max-queue must be at least 1")
        if self.cors_origins and not self.api_key:
            raise LowbitError("--cors-origin lets web pages call the server: it needs --api-key too")


def context_length(model: Any, asked: int) -> int:
    """``asked`` tokens (0: the model's), never more than the model's position limit."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if asked == 0:
        if not isinstance(limit, int):
            raise LowbitError("the model's config names no max_position_embeddings; pass --ctx N")
        return limit
    return min(asked, limit) if isinstance(limit, int) else asked


def build(cfg: NativeConfig) -> tuple[Any, Any]:
    """(app, engine) for ``cfg``: the artifact is loaded and the engine started."""
    import torch

    from lowbit.jobs.artifacts import load
    from lowbit.serve.batching import BatchEngine
    from lowbit.serve.openai_api import ApiConfig, build_app

    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("--device cuda: no CUDA device is visible; use --device cpu")
    model, tok = load(cfg.model, cfg.device)
    model.eval()
    ctx = context_length(model, cfg.ctx)
    engine = BatchEngine(model, tok, ctx, max_batch=cfg.max_batch, max_queue=cfg.max_queue, device=dev)
    engine.start()
    name = cfg.name or Path(cfg.model).name
    app = build_app(engine, tok, ApiConfig(model_name=name, ctx=ctx, api_key=cfg.api_key,
                                           cors_origins=cfg.cors_origins))
    return app, engine


def serve_native(cfg: NativeConfig) -> None:
    """Serve until SIGINT/SIGTERM (blocking); the port is checked before the model loads."""
    from lowbit.serve.llamacpp import check_port_free, run_uvicorn

    if not Path(cfg.model).is_dir():
        raise LowbitError(f"{cfg.model} is not a model folder or a .gguf file")
    check_port_free(cfg.host, cfg.port)
    app, engine = build(cfg)
    auth = " (API key required)" if cfg.api_key else ""
    log.info("serving %s on http://%s:%d/v1 (%s, batches of up to %d)%s", cfg.model, cfg.host, cfg.port,
             cfg.device, cfg.max_batch, auth)
    try:
        run_uvicorn(app, cfg.host, cfg.port)
    finally:
        engine.stop()
