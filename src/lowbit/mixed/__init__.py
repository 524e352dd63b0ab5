"""Mixed precision: each tensor's sensitivity to each candidate, and a bit budget spent where it buys the most.

:func:`sensitivity` -> :class:`Sensitivity` (per tensor and candidate: predicted and measured cost);
:func:`allocate` -> a :class:`~lowbit.recipe.Recipe` with per-layer overrides (compressed-tensors) or a GGUF
type map; :func:`export_gguf_budget` writes that GGUF file; :func:`plan` -> the :class:`Allocation` behind
either; :func:`parse_mix` reads ``mix@4.5`` and ``gguf:mix@4.9``.
"""

from lowbit.mixed.api import allocate, export_gguf_budget, parse_mix, plan, sensitivity
from lowbit.mixed.budget import Allocation, Budget, allocate_from, parse_budget
from lowbit.mixed.estimate import SensitivityConfig
from lowbit.mixed.sensitivity import Sensitivity

__all__ = ["Allocation", "Budget", "Sensitivity", "SensitivityConfig", "allocate", "allocate_from",
           "export_gguf_budget", "parse_budget", "parse_mix", "plan", "sensitivity"]
