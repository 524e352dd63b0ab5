"""Recipes: one frozen description of a quantization, from flags, files or code (see :mod:`.schema`)."""

from lowbit.core.errors import RecipeError
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline.awq import AWQConfig
from lowbit.pipeline.rtn import ImatrixConfig, RTNConfig
from lowbit.pipeline.smoothquant import SmoothQuantConfig
from lowbit.recipe.schema import Calibration, Export, Override, Recipe

__all__ = ["AWQConfig", "Calibration", "Export", "GPTQConfig", "ImatrixConfig", "Override", "RTNConfig", "Recipe",
           "RecipeError", "SmoothQuantConfig"]
