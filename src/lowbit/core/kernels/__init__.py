"""Kernel-backed runtime linears for lowbit's integer weights (GPU: Triton; CPU: torch's int4/int8 kernels).

``prepare_model(model, device)`` swaps every :class:`~lowbit.core.qlinear.QuantLinear` of a loaded
model for the fastest linear that runs on ``device`` and reports which one each layer got;
``warm_up(model, rows)`` tunes the Triton launch configurations before CUDA-graph capture.
"""

from lowbit.core.kernels.prepare import BACKENDS, KernelReport, choose_backend, prepare_model, warm_up

__all__ = ["BACKENDS", "KernelReport", "choose_backend", "prepare_model", "warm_up"]
