"""The recipe: one frozen, validated, versioned description of a quantization.

A :class:`Recipe` says *what* an artifact is: the scheme, the method and its own config, the
calibration data, the export format, and ordered per-layer overrides. How a run goes (device,
offload, progress, threads) lives apart, in :class:`~lowbit.pipeline.engine.Engine`. Every
artifact stores its exact recipe (``recipe.yaml``); replaying it gives byte-identical weights.

Layer selection follows llm-compressor's syntax: a target is a module's full name
(``model.layers.0.mlp.down_proj``), ``re:`` and a regular expression matched from the start of
the name (``re:.*down_proj``), or the class name ``Linear`` (every quantizable linear). For each
quantizable linear the top-level scheme and method apply, then each override whose targets match
it, in order (a later override wins), then ``ignore`` (kept 16-bit, always).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.core.errors import RecipeError
from lowbit.core.io import write_text_atomic
from lowbit.core.presets import Scheme, scheme_to_dict
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.rtn import RTNConfig
from lowbit.recipe.llmc import is_llmcompressor, llmcompressor_to_dict
from lowbit.recipe.parse import build_config, method_to_dict, parse_method, parse_scheme, parse_targets, read_data

RECIPE_VERSION = 1
ROOT = "recipe"
EXPORT_FORMATS = ("auto", "compressed-tensors", "awq", "bitsandbytes")
STORAGE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Calibration:
    """The calibration text: a corpus (``c4``, ``wikitext2``, ``python-docs``, a path or
    ``hf:NAME[:CONFIG[:SPLIT]]``), ``samples`` sequences of ``length`` tokens drawn with ``seed``.

    ``corpus`` None is the default corpus and ``length`` None the method's default (2048 for GPTQ,
    512 otherwise); a recipe stored in an artifact has both resolved."""

    corpus: str | None = None
    samples: int = 128
    length: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise RecipeError(f"samples must be >= 1, got {self.samples}")
        if self.length is not None and self.length < 1:
            raise RecipeError(f"length must be >= 1 token, got {self.length}")
        if self.seed < 0:
            raise RecipeError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Export:
    """How the artifact is written: ``format`` (``auto`` picks by scheme: compressed-tensors for
    integer and FP8 schemes, bitsandbytes for NF4/FP4/INT8-LLM; ``awq`` is AutoAWQ's GEMM layout) and
    ``dtype``, the dtype of scales and unquantized tensors (None: the model's, bfloat16 for float32)."""

    format: str = "auto"
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise RecipeError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise RecipeError(f"dtype must be one of {', '.join(STORAGE_DTYPES)} or null, got {self.dtype!r}")


@dataclass(frozen=True)
class Override:
    """Layers matched by ``targets`` get ``scheme`` and/or ``method`` (unset ones: the recipe's), or
    stay 16-bit with ``keep``."""

    targets: tuple[str, ...]
    scheme: Scheme | None = None
    method: Any = None
    keep: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise RecipeError(f"targets must be a non-empty list of module names or re: patterns, got "
                              f"{self.targets!r}")
        if self.keep and (self.scheme is not None or self.method is not None):
            raise RecipeError("keep: true leaves the layers 16-bit; drop scheme and method, or keep")
        if not self.keep and self.scheme is None and self.method is None:
            raise RecipeError("an override gives a scheme, a method, or keep: true")


@dataclass(frozen=True)
class Recipe:
    """What a quantization is (see the module docstring).

    Attributes:
        scheme: the scheme of every quantizable linear (``W4A16``, ``NF4``, ...; :mod:`lowbit.core.presets`).
        method: the method's config (``RTNConfig``, ``ImatrixConfig``, ``GPTQConfig``, ``AWQConfig``,
            ``SmoothQuantConfig``; :mod:`lowbit.pipeline.registry`).
        calibration: the calibration text, for methods that need it.
        export: the artifact's format and storage dtype.
        ignore: targets kept 16-bit whatever else matches them (``lm_head`` is never quantized).
        overrides: per-layer changes, in order (a later match wins).
        version: the recipe format's version.
    """

    scheme: Scheme
    method: Any = field(default_factory=RTNConfig)
    calibration: Calibration = field(default_factory=Calibration)
    export: Export = field(default_factory=Export)
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.version > RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is newer than this lowbit reads ({RECIPE_VERSION}); "
                              "upgrade lowbit")
        if self.version < 1:
            raise RecipeError(f"recipe version must be >= 1, got {self.version}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def methods(self) -> list[Any]:
        """Every method config the recipe names (top level, then overrides), without repeats."""
        out: list[Any] = []
        for m in [self.method, *(o.method for o in self.overrides if o.method is not None)]:
            if m not in out:
                out.append(m)
        return out

    def calibration_length(self) -> int:
        """The calibration sequence length: the recipe's, else 2048 when GPTQ runs, else 512."""
        if self.calibration.length is not None:
            return self.calibration.length
        gptq = any(isinstance(m, GPTQConfig) or isinstance(getattr(m, "inner", None), GPTQConfig)
                   for m in self.methods)
        return 2048 if gptq else 512

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """A recipe from a lowbit YAML/JSON file, or an llm-compressor recipe YAML (translated)."""
        data = read_data(path)
        try:
            if is_llmcompressor(data):
                return cls.from_dict(llmcompressor_to_dict(data))
            return cls.from_dict(data)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:  # a shape no field expects
            raise RecipeError(f"{path}: not a recipe lowbit can read ({type(e).__name__}: {str(e)[:200]}); "
                              "compare it with recipe.yaml in an artifact lowbit wrote") from None

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        """A recipe from its mapping form (``recipe.yaml``'s content)."""
        if not isinstance(d, dict):
            raise RecipeError(f"{ROOT}: a recipe is a mapping, got {type(d).__name__}")
        if "scheme" not in d:
            raise RecipeError(f"{ROOT}: no 'scheme' key: a recipe names at least a scheme (e.g. scheme: W4A16)")

        def overrides(v: Any, path: str) -> tuple[Override, ...]:
            if not isinstance(v, list):
                raise RecipeError(f"{path}: expected a list of overrides, got {v!r}")
            return tuple(build_config(Override, o, f"{path}[{i}]", {
                "scheme": parse_scheme, "method": parse_method, "targets": parse_targets}) for i, o in enumerate(v))

        return build_config(cls, d, ROOT, {  # type: ignore[no-any-return]
            "scheme": parse_scheme, "method": parse_method, "ignore": parse_targets, "overrides": overrides,
            "calibration": lambda v, p: build_config(Calibration, v, p),
            "export": lambda v, p: build_config(Export, v, p)})

    def to_dict(self) -> dict[str, Any]:
        """The exact mapping form: every field, so a replay does not depend on later defaults."""
        return {
            "version": self.version,
            "scheme": scheme_to_dict(self.scheme),
            "method": method_to_dict(self.method),
            "calibration": dataclasses.asdict(self.calibration),
            "export": dataclasses.asdict(self.export),
            "ignore": list(self.ignore),
            "overrides": [_override_to_dict(o) for o in self.overrides],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> None:
        """Write the recipe atomically: JSON for a ``.json`` path, else YAML."""
        p = Path(path)
        write_text_atomic(p, json.dumps(self.to_dict(), indent=2) + "\n" if p.suffix == ".json" else self.to_yaml())


def _override_to_dict(o: Override) -> dict[str, Any]:
    d: dict[str, Any] = {"targets": list(o.targets)}
    if o.keep:
        d["keep"] = True
    if o.scheme is not None:
        d["scheme"] = scheme_to_dict(o.scheme)
    if o.method is not None:
        d["method"] = method_to_dict(o.method)
    return d
