"""Peer run: llm-compressor's GPTQModifier on the same model and calibration tokens as lowbit.

Runs inside llm-compressor's own virtual environment (it pins transformers):

    VENV/bin/python bench/peers/llmc_gptq.py MODEL_DIR TOKENS.safetensors BITS GROUP OUT_DIR

Writes OUT_DIR as a plain Hugging Face folder holding llm-compressor's fake-quantized weights in
float32 (its GPTQ writes the dequantized weights into each module), so the caller evaluates them
in its own harness, on the same windows as everything else. ``actorder`` is llm-compressor's
default (static). On CPU, ``IntermediatesCache.pin_memory`` is made a no-op (it fails without CUDA).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    model_dir, tokens_file, bits, group, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(
        sys.argv[5])
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.pipelines import cache
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    tokens = load_file(tokens_file)["tokens"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}},
        ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=tokens.shape[0],
            max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    save_fake_quant(model, model_dir, out, {"tool": "llmcompressor", "seconds": seconds, "bits": bits,
                                            "group_size": group})
    print(json.dumps({"seconds": seconds}))


def save_fake_quant(model: torch.nn.Module, model_dir: str, out: Path, meta: dict) -> None:
    """Write the model's (fake-quantized) weights in float32 as a plain HF folder, atomically."""
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
          if not k.rsplit(".", 1)[-1].startswith(("weight_scale", "weight_zero_point", "weight_g_idx",
                                                   "weight_global_scale"))}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(model_dir).iterdir():
        if f.suffix in (".json", ".jinja", ".model", ".txt") and f.name not in ("lowbit_source.json",):
            shutil.copy(f, tmp / f.name)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["dtype"] = "float32"
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "peer.json").write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
