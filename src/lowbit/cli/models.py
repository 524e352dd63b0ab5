"""``lowbit models``: the offline model sources (fetched from PyPI wheels, no hub needed)."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import console, sub, table


def register(subs: Any) -> dict[str, Any]:
    sub(subs, "models", "list the offline model sources", "  lowbit models\n  lowbit quantize gemma3-270m ...")
    return {"models": cmd_models}


def cmd_models(a: argparse.Namespace) -> None:
    from lowbit.models.sources import SOURCES, cache_root

    rows = [[name, src.architecture, src.gguf_file, src.license,
             "yes" if (cache_root() / "models" / name).is_dir() else "no"] for name, src in SOURCES.items()]
    console.print(table(f"offline model sources (cache: {cache_root()})",
                        ["model", "architecture", "gguf", "licence", "cached"], rows))
