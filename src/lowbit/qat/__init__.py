"""Quantization-aware training: fake-quant linears initialised from a PTQ result, trained, exported, gated.

    from lowbit.qat import prepare, convert, train, TrainConfig
    prepare(model, recipe, tokens=calibration)   # the recipe's PTQ, then FakeQuantLinear in place
    train(model, windows, TrainConfig(steps=300), teacher=float_model)   # or any loop, HF Trainer included
    convert(model, "out/qat", tokenizer=tok)     # compressed-tensors (or format="gguf" where codes map)

    from lowbit.qat import run, QATConfig        # the whole job (what `lowbit qat` and `lowbit compare` call)
    res = run("smollm2-135m", recipe, "out/qat", QATConfig(TrainConfig(steps=300)), gate=Gate(max_ppl_increase=40))

:func:`prepare` swaps the recipe's linears for :class:`FakeQuantLinear` s (straight-through rounding,
learnable LSQ step sizes and integer zero points, optionally learnable weights), starting from the recipe's
PTQ method; :func:`convert` writes the artifact through the same exporters as ``lowbit quantize``.
"""

from lowbit.qat.convert import convert, qweights
from lowbit.qat.fakequant import FakeQuantLinear
from lowbit.qat.job import QATConfig, QATResult, run
from lowbit.qat.prepare import QATState, fake_quant_layers, prepare
from lowbit.qat.train import TrainConfig, TrainResult, train

__all__ = ["FakeQuantLinear", "QATConfig", "QATResult", "QATState", "TrainConfig", "TrainResult", "convert",
           "fake_quant_layers", "prepare", "qweights", "run", "train"]
