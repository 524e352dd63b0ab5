"""Command line: ``lowbit run | quantize | qat | eval | models | gguf | imatrix | sensitivity | serve | export``.

Errors on bad input (:class:`~lowbit.core.errors.LowbitError`) print one clear line and exit 2,
before any model loads wherever the input can be checked without it; an artifact that misses its
threshold gate (:class:`~lowbit.jobs.gate.GateFailed`) exits 3.
"""

from __future__ import annotations

from lowbit.cudaenv import tune_pinned_allocator

tune_pinned_allocator()  # before torch loads: it reads its allocator settings once

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

from rich.logging import RichHandler  # noqa: E402
from rich.markup import escape  # noqa: E402

from lowbit import __version__  # noqa: E402
from lowbit.cli import compare, doctor, gguf, models, qat, quantize, sensitivity, serve  # noqa: E402
from lowbit.cli import eval as eval_cmd  # noqa: E402
from lowbit.cli.common import HelpFormatter, Parser, add_common, err_console  # noqa: E402
from lowbit.core.errors import LowbitError  # noqa: E402

Handler = Callable[[argparse.Namespace], int | None]
EXAMPLES = """\
  lowbit run                                              # compare schemes on SmolLM2-135M, recommend one
  lowbit quantize qwen2.5-coder-0.5b --scheme W4A16 --method gptq -o out/qwen-w4
  lowbit quantize ./my-model --recipe recipe.yaml -o out/my-w4
  lowbit qat smollm2-135m --scheme W3A16 --group-size 64 --max-ppl-increase 40 -o out/smol-w3-qat
  lowbit eval out/qwen-w4 --reference qwen2.5-coder-0.5b
  lowbit gguf qwen2.5-coder-0.5b --type Q4_K_M -o qwen-q4km.gguf
run `lowbit COMMAND --help` for each command's options and examples"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    p = Parser(prog="lowbit", description="Quantize, evaluate and export low-bit LLMs.",
               epilog="examples:\n" + EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    add_common(p, suppress=False)
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for mod in (compare, quantize, qat, eval_cmd, models, gguf, sensitivity, serve, doctor):
        handlers.update(mod.register(subs))
    return p, handlers


def _logging(verbose: bool, rank: int) -> None:
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=err_console, show_path=False, markup=False)
        fmt = "%(message)s"
    else:  # a log file: timestamps, one plain line per message
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s"
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_lowbit", False)]:  # a second main() in one process
        root.removeHandler(h)
    handler.setFormatter(logging.Formatter(fmt))
    setattr(handler, "_lowbit", True)  # noqa: B010 -- marks the handler main() added
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    a = parser.parse_args(argv)
    from lowbit.pipeline.distributed import init_from_env, world

    init_from_env()  # under torchrun: data-parallel calibration
    rank = world()[0]
    if rank != 0:  # only rank 0 talks
        a.no_progress = True
        from lowbit.cli.common import console

        console.quiet = True
    _logging(a.verbose, rank)
    try:
        rc = handlers[a.command](a)
    except LowbitError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}")
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written")
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
