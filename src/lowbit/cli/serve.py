"""``lowbit serve MODEL.gguf`` (OpenAI-compatible API) and ``lowbit export ollama MODEL.gguf``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import say, sub

SERVE_EXAMPLES = """\
  lowbit serve qwen-q4km.gguf                         # http://127.0.0.1:8000/v1 (OpenAI-compatible)
  lowbit serve qwen-q4km.gguf --port 9000 --api-key secret"""
EXPORT_EXAMPLES = """\
  lowbit export ollama qwen-q4km.gguf && ollama create qwen-q4km -f Modelfile"""


def register(subs: Any) -> dict[str, Any]:
    """Add the deployment sub-commands; returns {command: handler}."""
    s = sub(subs, "serve", "serve a .gguf file over an OpenAI-compatible API (llama-cpp-python)", SERVE_EXAMPLES)
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--ctx", type=int, default=2048, help="context length in tokens (0: the model's)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's, half the CPUs)")
    s.add_argument("--chat-format", default=None,
                   help="override the GGUF's chat template with a llama-cpp-python format (chatml, llama-3, ...)")
    s.add_argument("--api-key", default=None, help="require this bearer token on every request")

    x = sub(subs, "export", "write deployment files for a model (ollama: a Modelfile)", EXPORT_EXAMPLES)
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
    from lowbit.serve.ollama import export_ollama

    res = export_ollama(a.model, a.out, system=a.system, force=a.force)
    say(f"wrote {res.path}: template {res.family or 'left out'}, system prompt {'set' if res.system else 'none'}, "
        f"stops {', '.join(res.stops) or 'none'}")
    say(f"note: {res.note}")
    say(f"next: ollama create NAME -f {res.path}")
