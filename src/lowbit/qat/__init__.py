"""Quantization-aware training: fake-quant linears initialised from a PTQ result, trained, exported.

``prepare(model, recipe)`` swaps the recipe's linears for :class:`FakeQuantLinear` s (straight-through
rounding, learnable LSQ step sizes and integer zero points, optionally learnable weights), starting
from the recipe's PTQ method; ``convert(model, out)`` writes the artifact through the same exporters
as ``lowbit quantize``.
"""

from lowbit.qat.convert import convert, qweights
from lowbit.qat.fakequant import FakeQuantLinear
from lowbit.qat.prepare import QATState, fake_quant_layers, prepare

__all__ = ["FakeQuantLinear", "QATState", "convert", "fake_quant_layers", "prepare", "qweights"]
