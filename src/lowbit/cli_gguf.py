"""Command line for GGUF: ``lowbit gguf`` (convert + quantize for llama.cpp), ``lowbit imatrix``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rich.console import Console

from lowbit.core.errors import LowbitError

Handler = Callable[[argparse.Namespace], None]
console = Console(soft_wrap=True)


def _device(name: str) -> str | None:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else None


def cmd_gguf(a: argparse.Namespace) -> None:
    from lowbit.gguf_jobs import export_gguf

    rep = export_gguf(a.model, a.out, a.type, imatrix=a.imatrix, device=_device(a.device), force=a.force)
    if rep.carried or rep.carried_rounded or rep.requantized:
        console.print(f"lowbit codes carried over as they are: {len(rep.carried)} tensor(s); carried with the "
                      f"float16 rounding of a scale or min: {len(rep.carried_rounded)}; re-quantized to the file's "
                      f"type: {len(rep.requantized)}" + (f" ({', '.join(rep.requantized[:4])}"
                                                          f"{', ...' if len(rep.requantized) > 4 else ''})"
                                                          if rep.requantized else ""))
    counts = ", ".join(f"{k} x{v}" for k, v in rep.type_counts().items())
    console.print(f"wrote {rep.path}: {rep.file_type}, {rep.size_bytes / 1e6:.1f} MB, {rep.bits_per_weight:.2f} "
                  f"bits/weight, {rep.seconds:.1f} s; tensor types: {counts}")
    if rep.fell_back:
        console.print(f"note: {len(rep.fell_back)} tensor(s) have rows the type's block does not divide and use "
                      f"llama.cpp's fallback type (e.g. {rep.fell_back[0]}: {rep.types[rep.fell_back[0]]})")


def cmd_imatrix(a: argparse.Namespace) -> None:
    from lowbit.gguf_jobs import compute_imatrix

    if a.calib_samples < 1 or a.calib_len < 1:
        raise LowbitError("--calib-samples and --calib-len must be positive")
    im = compute_imatrix(a.model, a.out, calib=a.calib, samples=a.calib_samples, length=a.calib_len,
                         seed=a.seed, device=_device(a.device) or "cpu", progress=not a.no_progress)
    console.print(f"wrote {a.out}: {len(im.sums)} matrices, {im.chunk_count} x {im.chunk_size} tokens")


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the GGUF sub-commands to ``sub``; returns {command: handler}."""
    from lowbit.formats.gguf.ftypes import FILE_TYPES

    g = sub.add_parser("gguf", help="write a GGUF file for llama.cpp / Ollama (any file type, with an imatrix)")
    g.add_argument("model", help="offline source name, model folder, .gguf file or hub id")
    g.add_argument("-o", "--out", required=True, help="output .gguf file")
    g.add_argument("--type", default=None, type=str.upper, choices=[*FILE_TYPES, "AUTO"],
                   help="GGUF file type with llama.cpp's mixing rules (default Q4_K_M); AUTO (the default for a "
                        "lowbit-quantized folder): the type closest to its scheme, keeping its codes where they fit")
    g.add_argument("--imatrix", default=None, help="importance matrix (GGUF or legacy .dat, ours or llama.cpp's)")
    g.add_argument("--device", default="cpu", help="where the encoders run: cpu, cuda, auto")
    g.add_argument("--force", action="store_true", help="replace an existing output file")

    m = sub.add_parser("imatrix", help="compute an importance matrix in llama.cpp's GGUF format")
    m.add_argument("model", help="offline source name, model folder, .gguf file or hub id")
    m.add_argument("-o", "--out", required=True, help="output imatrix file (.gguf)")
    m.add_argument("--calib", default=None, help="calibration: c4 | c4:PATH | python-docs | PATH (default c4)")
    m.add_argument("--calib-samples", type=int, default=128)
    m.add_argument("--calib-len", type=int, default=512)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="auto", help="device for the forward passes: auto, cpu, cuda")
    return {"gguf": cmd_gguf, "imatrix": cmd_imatrix}
