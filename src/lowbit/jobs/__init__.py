"""The jobs behind the CLI and the Python API: quantize, load, evaluate, GGUF export.

Evaluation always loads artifacts from disk (what we measure is what we ship).
"""

from lowbit.formats.registry import load_artifact
from lowbit.jobs.artifacts import artifact_kind, is_quantized_artifact, load, load_any
from lowbit.jobs.evaluate import eval_text, evaluate_artifact, evaluate_models
from lowbit.jobs.quantization import QuantizeResult, bits_per_weight, quantize, quantize_loaded

__all__ = ["QuantizeResult", "artifact_kind", "bits_per_weight", "eval_text", "evaluate_artifact", "evaluate_models",
           "is_quantized_artifact", "load", "load_any", "load_artifact", "quantize", "quantize_loaded"]
