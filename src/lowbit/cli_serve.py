"""Command line for deployment: ``lowbit serve MODEL.gguf``, ``lowbit export ollama MODEL.gguf``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], None]


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the deployment sub-commands to ``sub``; returns {command: handler}."""
    s = sub.add_parser("serve", help="serve a .gguf file over an OpenAI-compatible API (llama-cpp-python)")
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--ctx", type=int, default=2048, help="context length in tokens (0: the model's)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's, half the CPUs)")
    s.add_argument("--chat-format", default=None,
                   help="override the GGUF's chat template with a llama-cpp-python format (chatml, llama-3, ...)")
    s.add_argument("--api-key", default=None, help="require this bearer token on every request")

    x = sub.add_parser("export", help="write deployment files for a model (ollama: a Modelfile)")
    targets = x.add_subparsers(dest="target", required=True)
    o = targets.add_parser("ollama", help="write an Ollama Modelfile next to a .gguf file")
    o.add_argument("model", help="a .gguf file")
    o.add_argument("--system", default=None, help="system prompt (default: the one the chat template inserts, if any)")
    o.add_argument("-o", "--out", default=None, help="Modelfile path (default: Modelfile next to the GGUF)")
    o.add_argument("--force", action="store_true", help="replace an existing Modelfile")
    return {"serve": cmd_serve, "export": cmd_export}


def cmd_serve(a: argparse.Namespace) -> None:
    from lowbit.serve.llamacpp import ServeConfig, serve

    serve(ServeConfig(model=Path(a.model), host=a.host, port=a.port, ctx=a.ctx, threads=a.threads,
                      chat_format=a.chat_format, api_key=a.api_key))


def cmd_export(a: argparse.Namespace) -> None:
    from lowbit.cli import console
    from lowbit.serve.ollama import export_ollama

    res = export_ollama(a.model, a.out, system=a.system, force=a.force)
    console.print(f"wrote {res.path}: template {res.family or 'left out'}, "
                  f"system prompt {'set' if res.system else 'none'}, stops {', '.join(res.stops) or 'none'}")
    console.print(f"note: {res.note}")
    console.print(f"next: ollama create NAME -f {res.path}")
