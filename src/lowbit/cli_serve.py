"""Command line for deployment: ``lowbit serve``, ``lowbit export ollama`` (filled in by the serve module)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], None]


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the deployment sub-commands to ``sub``; returns {command: handler}."""
    return {}
