"""``lowbit gguf`` (convert + quantize for llama.cpp and Ollama) and ``lowbit imatrix``."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import say, sub
from lowbit.core.errors import LowbitError

GGUF_EXAMPLES = """\
  lowbit gguf qwen2.5-coder-0.5b --type Q4_K_M -o qwen-q4km.gguf
  lowbit imatrix qwen2.5-coder-0.5b -o qwen.imatrix.gguf && \\
      lowbit gguf qwen2.5-coder-0.5b --type Q4_K_M --imatrix qwen.imatrix.gguf -o qwen-q4km-im.gguf
  lowbit gguf out/qwen-w4 -o qwen-w4.gguf          # a lowbit artifact: its codes kept where a type holds them
  lowbit gguf gemma3-270m --bpw 4.9 --imatrix g.imatrix.gguf -o gemma-mix.gguf   # per-tensor types, measured
  lowbit gguf gemma3-270m --types gemma-mix.gguf.types.json -o again.gguf          # replay (or edit) a type map"""
IMATRIX_EXAMPLES = """\
  lowbit imatrix gemma3-270m -o gemma.imatrix.gguf
  lowbit imatrix ./my-model --calib my_text.jsonl --calib-samples 256 -o my.imatrix.gguf"""


def _device(name: str) -> str | None:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else None
    from lowbit.pipeline.engine import resolve_device

    return resolve_device(name)


def cmd_gguf(a: argparse.Namespace) -> None:
    from lowbit.cli.mixed_flags import allocate_args, budget_of, read_types, report_allocation
    from lowbit.core.io import check_output_file
    from lowbit.jobs.gguf import export_gguf
    from lowbit.models.loader import check_spec

    check_spec(a.model)
    check_output_file(a.out, overwrite=a.force)
    budget = budget_of(a)
    if (budget is not None or a.types) and a.type is not None:
        raise LowbitError("--type sets llama.cpp's own mix; --bpw / --max-size / --types choose per tensor: give one")
    types = read_types(a.types) if a.types else None
    if a.imatrix:
        from lowbit.formats.gguf.imatrix import load_imatrix

        load_imatrix(a.imatrix)  # a bad file is reported before the model loads
    if budget is not None:
        alloc = allocate_args(a, "gguf", budget, imatrix=a.imatrix)
        report_allocation(alloc)
        types = alloc.gguf_types()
    rep = export_gguf(a.model, a.out, a.type, imatrix=a.imatrix, device=_device(a.device), force=a.force,
                      types=types)
    if budget is not None:
        from lowbit.core.io import write_json_atomic

        write_json_atomic(str(a.out) + ".types.json", {"budget": budget.label, "types": types})
        say(f"type map: {a.out}.types.json (replay or edit it with --types)")
    if rep.carried or rep.carried_rounded or rep.requantized:
        say(f"lowbit codes carried over as they are: {len(rep.carried)} tensor(s); carried with the float16 rounding "
            f"of a scale or min: {len(rep.carried_rounded)}; re-quantized to the file's type: {len(rep.requantized)}"
            + (f" ({', '.join(rep.requantized[:4])}{', ...' if len(rep.requantized) > 4 else ''})"
               if rep.requantized else ""))
    counts = ", ".join(f"{k} x{v}" for k, v in rep.type_counts().items())
    say(f"wrote {rep.path}: {rep.file_type}, {rep.size_bytes / 1e6:.1f} MB, {rep.bits_per_weight:.2f} bits/weight, "
        f"{rep.seconds:.1f} s; tensor types: {counts}")
    if rep.fell_back:
        say(f"note: {len(rep.fell_back)} tensor(s) have rows the type's block does not divide and use llama.cpp's "
            f"fallback type (e.g. {rep.fell_back[0]}: {rep.types[rep.fell_back[0]]})")


def cmd_imatrix(a: argparse.Namespace) -> None:
    from lowbit.core.io import check_output_file
    from lowbit.data import resolve_calib_texts
    from lowbit.jobs.gguf import compute_imatrix
    from lowbit.models.loader import check_spec

    if a.calib_samples < 1 or a.calib_len < 1:
        raise LowbitError("--calib-samples and --calib-len must be >= 1")
    if a.seed < 0:
        raise LowbitError(f"--seed must be >= 0, got {a.seed}")
    check_spec(a.model)
    check_output_file(a.out, overwrite=a.force)
    if a.calib:
        resolve_calib_texts(a.calib)
    im = compute_imatrix(a.model, a.out, calib=a.calib, samples=a.calib_samples, length=a.calib_len,
                         seed=a.seed, device=_device(a.device) or "cpu", progress=not a.no_progress)
    say(f"wrote {a.out}: {len(im.sums)} matrices, {im.chunk_count} x {im.chunk_size} tokens")


def register(subs: Any) -> dict[str, Any]:
    """Add the GGUF sub-commands; returns {command: handler}."""
    from lowbit.formats.gguf.ftypes import FILE_TYPES

    g = sub(subs, "gguf", "write a GGUF file for llama.cpp / Ollama (any file type, with an imatrix)", GGUF_EXAMPLES)
    g.add_argument("model", help="offline source name, model folder, lowbit artifact, .gguf file or hub id")
    g.add_argument("-o", "--out", required=True, help="output .gguf file")
    g.add_argument("--type", default=None, type=str.upper, choices=[*FILE_TYPES, "AUTO"], metavar="TYPE",
                   help=f"GGUF file type ({', '.join(FILE_TYPES)}) with llama.cpp's mixing rules (default Q4_K_M); "
                        "AUTO (default for a lowbit artifact): the type closest to its scheme, keeping its codes")
    g.add_argument("--imatrix", default=None, help="importance matrix (GGUF or legacy .dat, ours or llama.cpp's)")
    g.add_argument("--device", default="cpu", help="where the encoders run: cpu, cuda, auto")
    g.add_argument("--force", action="store_true", help="replace an existing output file")
    from lowbit.cli.mixed_flags import add_budget_flags

    add_budget_flags(g, "gguf")

    m = sub(subs, "imatrix", "compute an importance matrix in llama.cpp's GGUF format", IMATRIX_EXAMPLES)
    m.add_argument("model", help="offline source name, model folder, .gguf file or hub id")
    m.add_argument("-o", "--out", required=True, help="output imatrix file (.gguf)")
    m.add_argument("--calib", default=None, help="calibration text: c4 | c4:PATH | python-docs | PATH | hf:NAME "
                                                 "(default c4)")
    m.add_argument("--calib-samples", type=int, default=128, help="calibration sequences")
    m.add_argument("--calib-len", type=int, default=512, help="tokens per sequence")
    m.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    m.add_argument("--device", default="auto", help="device for the forward passes: auto, cpu, cuda")
    m.add_argument("--force", action="store_true", help="replace an existing output file")
    return {"gguf": cmd_gguf, "imatrix": cmd_imatrix}
