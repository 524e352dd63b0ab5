"""What every command shares: consoles, tables that never cut a name, escaped messages, help formatting."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# off a terminal (a pipe, a log file) rich would assume 80 columns and cut table cells: use a wide page
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(stderr=False, soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

_TEXT_COLUMNS = {"name", "method", "scheme", "model", "architecture", "gguf", "licence", "cached", "engine",
                 "config", "kernel", "format", "task"}


def say(msg: str) -> None:
    """Print a message to stdout as it is (no rich markup: ``[llamacpp]`` stays)."""
    console.print(escape(msg))


def table(title: str, columns: list[str] | tuple[str, ...], rows: list[list[str]]) -> Table:
    """A table whose cells wrap instead of being cut."""
    t = Table(title=escape(title))
    for c in columns:
        t.add_column(c, justify="left" if c in _TEXT_COLUMNS else "right", overflow="fold")
    for row in rows:
        t.add_row(*(escape(str(x)) for x in row))
    return t


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the error and where the options are), not a usage
    dump; its sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and adds ``(default: X)`` to options with a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "%(default)" in h or "default" in h or action.default in (None, False, argparse.SUPPRESS):
            return h
        if action.option_strings and action.nargs != 0:
            return h + " (default: %(default)s)"
        return h


def add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The global options; ``suppress``: absent options leave the value parsed before the subcommand."""
    d: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("-v", "--verbose", action="store_true", default=d if suppress else False, help="debug logging")
    p.add_argument("--no-progress", action="store_true", default=d if suppress else False,
                   help="no progress bars or progress lines")


def sub(subparsers: Any, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser with the global options and an examples epilog."""
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help,
                                                       epilog="examples:\n" + examples, formatter_class=HelpFormatter)
    add_common(p, suppress=True)
    return p
