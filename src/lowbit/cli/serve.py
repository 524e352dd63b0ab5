"""``lowbit serve ARTIFACT`` (OpenAI-compatible API) and ``lowbit export ollama MODEL.gguf``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import say, sub

SERVE_EXAMPLES = """\
  lowbit serve qwen-q4km.gguf                         # http://127.0.0.1:8000/v1 (OpenAI-compatible, llama.cpp)
  lowbit serve qwen-q4km.gguf --device cuda           # every layer on the GPU (--gpu-layers N for some)
  lowbit serve out/qwen-w4 --port 9000 --api-key secret   # any lowbit artifact, batched, through lowbit.load
  lowbit serve out/qwen-w4 --device cuda --max-batch 128"""
EXPORT_EXAMPLES = """\
  lowbit export ollama qwen-q4km.gguf && ollama create qwen-q4km -f Modelfile"""


def register(subs: Any) -> dict[str, Any]:
    """Add the deployment sub-commands; returns {command: handler}."""
    s = sub(subs, "serve", "serve an artifact over an OpenAI-compatible API (GGUF: llama-cpp-python; "
            "folders: lowbit, batched)", SERVE_EXAMPLES)
    s.add_argument("model", help="a .gguf file, or an artifact / model folder (any format lowbit writes)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N] (a GGUF on cuda: all layers, see --gpu-layers)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--ctx", type=int, default=2048, help="context length in tokens (0: the model's)")
    s.add_argument("--api-key", default=None, help="require this bearer token on every request")
    s.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN call the server (repeatable; needs --api-key)")
    s.add_argument("--name", default=None, help="model name in the API (default: the file or folder name)")
    g = s.add_argument_group("GGUF files (llama-cpp-python)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's, half the CPUs)")
    g.add_argument("--gpu-layers", type=int, default=None,
                   help="layers offloaded to the GPU (-1: all; default 0, or -1 with --device cuda)")
    g.add_argument("--chat-format", default=None,
                   help="override the GGUF's chat template with a llama-cpp-python format (chatml, llama-3, ...)")
    f = s.add_argument_group("folders (lowbit's batching server)")
    f.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    f.add_argument("--max-queue", type=int, default=1024, help="requests waiting beyond a batch (then 429)")

    x = sub(subs, "export", "write deployment files for a model (ollama: a Modelfile)", EXPORT_EXAMPLES)
    targets = x.add_subparsers(dest="target", required=True)
    o = targets.add_parser("ollama", help="write an Ollama Modelfile next to a .gguf file")
    o.add_argument("model", help="a .gguf file")
    o.add_argument("--system", default=None, help="system prompt (default: the one the chat template inserts, if any)")
    o.add_argument("-o", "--out", default=None, help="Modelfile path (default: Modelfile next to the GGUF)")
    o.add_argument("--force", action="store_true", help="replace an existing Modelfile")
    return {"serve": cmd_serve, "export": cmd_export}


def cmd_serve(a: argparse.Namespace) -> None:
    from lowbit.core.errors import LowbitError

    path = Path(a.model).expanduser()
    cors = tuple(a.cors_origin or ())
    if not path.exists():
        raise LowbitError(f"no such file or folder: {path}. Fix: pass a .gguf file or an artifact folder")
    if path.is_dir():
        from lowbit.pipeline.engine import resolve_device
        from lowbit.serve.native import NativeConfig, serve_native

        for flag, v in (("--threads", a.threads), ("--gpu-layers", a.gpu_layers), ("--chat-format", a.chat_format)):
            if v is not None:
                raise LowbitError(f"{flag} applies to .gguf files (llama.cpp); {path} is a folder")
        resolve_device(a.device)  # a bad or absent device is one line, before the model loads
        serve_native(NativeConfig(model=path, device=a.device, host=a.host, port=a.port, ctx=a.ctx,
                                  api_key=a.api_key, cors_origins=cors, max_batch=a.max_batch,
                                  max_queue=a.max_queue, name=a.name))
        return
    from lowbit.serve.llamacpp import ServeConfig, serve

    if a.device != "cpu" and not a.device.startswith("cuda"):
        raise LowbitError(f"--device {a.device}: a GGUF runs on cpu or cuda")
    layers = a.gpu_layers if a.gpu_layers is not None else (-1 if a.device.startswith("cuda") else 0)
    serve(ServeConfig(model=path, host=a.host, port=a.port, ctx=a.ctx, threads=a.threads,
                      chat_format=a.chat_format, api_key=a.api_key, gpu_layers=layers, cors_origins=cors,
                      name=a.name))


def cmd_export(a: argparse.Namespace) -> None:
    from lowbit.serve.ollama import export_ollama

    res = export_ollama(a.model, a.out, system=a.system, force=a.force)
    say(f"wrote {res.path}: template {res.family or 'left out'}, system prompt {'set' if res.system else 'none'}, "
        f"stops {', '.join(res.stops) or 'none'}")
    say(f"note: {res.note}")
    say(f"next: ollama create NAME -f {res.path}")
