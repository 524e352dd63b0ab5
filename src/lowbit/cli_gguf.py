"""Command line for GGUF: ``lowbit gguf`` (convert + quantize), ``lowbit imatrix``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], None]


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the GGUF sub-commands to ``sub``; returns {command: handler}."""
    return {}
