"""Peer run: llm-compressor's AWQModifier (then plain RTN, its AWQ default) on lowbit's calibration tokens.

Runs inside llm-compressor's own virtual environment (it pins transformers):

    VENV/bin/python bench/peers/llmc_awq.py MODEL_DIR TOKENS.safetensors BITS GROUP OUT_DIR

Asymmetric ``BITS``-bit weights in groups of ``GROUP`` (AWQ's usual zero-point form), the
architecture's default AWQ mappings, ``lm_head`` left out. Writes llm-compressor's fake-quantized
weights in float32 as a plain Hugging Face folder (see ``llmc_gptq.py``). On CPU,
``IntermediatesCache.pin_memory`` is made a no-op (it fails without CUDA).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from llmc_gptq import save_fake_quant  # noqa: E402


def main() -> None:
    model_dir, tokens_file, bits, group, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(
        sys.argv[5])
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.pipelines import cache
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    tokens = load_file(tokens_file)["tokens"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    recipe = AWQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}}},
        ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=tokens.shape[0],
            max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    # AWQModifier leaves the smoothed float weights in the modules (it quantizes on save / in the
    # forward wrapper): write Q(W) with compressed-tensors' own fake_quantize and the qparams it chose
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    n = 0
    with torch.no_grad():
        for m in model.modules():
            qs = getattr(m, "quantization_scheme", None)
            if qs is not None and qs.weights is not None and hasattr(m, "weight_scale"):
                m.weight.data = fake_quantize(m.weight, m.weight_scale, getattr(m, "weight_zero_point", None),
                                              qs.weights)
                n += 1
    if n == 0:
        raise SystemExit("llm-compressor left no quantized module: nothing to compare")
    save_fake_quant(model, model_dir, out, {"tool": "llmcompressor-awq", "seconds": seconds, "bits": bits,
                                            "group_size": group})
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
