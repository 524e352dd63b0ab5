"""lowbit: quantize, evaluate and export low-bit LLMs.

The Python API::

    import lowbit
    recipe = lowbit.Recipe.from_file("recipe.yaml")      # or lowbit.Recipe(scheme=..., method=...)
    res = lowbit.quantize("qwen2.5-coder-0.5b", recipe, "out/qwen-w4")
    model, tokenizer = lowbit.load("out/qwen-w4")
    results = lowbit.evaluate("out/qwen-w4", reference="qwen2.5-coder-0.5b")
    acc = lowbit.evaluate_tasks({"w4": model}, tokenizer, ["arc_easy", "hellaswag"], limit=500)  # lm-eval scoring

Layers import one way only: ``core``, ``models`` and ``data`` at the bottom; ``methods`` and
``formats`` above them (siblings that never import each other); ``pipeline`` above those;
``recipe`` above the pipeline; ``jobs``, ``eval``, ``compare``, ``qat``, ``serve``, ``cli`` on top.
The names below are imported on first use, so ``import lowbit`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "quantize": ("lowbit.jobs.quantization", "quantize"),
    "load": ("lowbit.jobs.artifacts", "load"),
    "evaluate": ("lowbit.jobs.evaluate", "evaluate_artifact"),
    "evaluate_tasks": ("lowbit.eval.tasks", "evaluate_tasks"),
    "Recipe": ("lowbit.recipe.schema", "Recipe"),
    "Engine": ("lowbit.pipeline.engine", "Engine"),
    "lookup_scheme": ("lowbit.core.presets", "lookup_scheme"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        mod, attr = _API[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
