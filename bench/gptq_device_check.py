"""GPTQ on a GPU agrees with GPTQ on the CPU (the Triton kernel, pinned staging, background copies).

    PYTHONPATH=src python bench/gptq_device_check.py

A small random Llama (4 layers, 512 wide, float32) is quantized W4A16 g128 act-order by the block
engine on the CPU and on CUDA (activations offloaded, so every transfer path runs); prints the
share of identical codes (error feedback carries summation-order differences on, so not all), the
largest scale difference, the logits error of both against the float model, and checks that the
model left on the host holds exactly the dequantized GPU result.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.core.scheme import QuantScheme
from lowbit.pipeline.blockwise import run_blockwise
from lowbit.pipeline.gptq import GPTQMethod


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2000)
    ref = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 2000, (16, 256))
    res = {}
    models = {}
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(ref)
        method = GPTQMethod(QuantScheme(4, 128, True), scale_dtype=torch.float32)
        res[dev] = run_blockwise(m, method, tokens, device=dev, progress=False, offload_activations=dev == "cuda")
        models[dev] = m
    same = [float((res["cpu"][k].codes == res["cuda"][k].codes).float().mean()) for k in res["cpu"]]
    ds = max(float((res["cpu"][k].scales - res["cuda"][k].scales).abs().max()) for k in res["cpu"])
    bad = [k for k in res["cuda"] if not torch.equal(models["cuda"].get_submodule(k).weight,
                                                       res["cuda"][k].dequantize(torch.float32))]
    with torch.inference_mode():
        lr = ref(tokens[:4]).logits
        err = {d: float((models[d](tokens[:4]).logits - lr).pow(2).mean()) for d in models}
    print(f"linears {len(same)}, identical codes min {min(same):.4f} mean {sum(same) / len(same):.4f}, "
          f"max |scale diff| {ds:.2e}; host weights != dequantized GPU result: {bad[:4]} ({len(bad)}); "
          f"logits MSE vs float: cpu {err['cpu']:.4g}, cuda {err['cuda']:.4g}", flush=True)
    assert not bad and err["cuda"] < 1.25 * err["cpu"]

if __name__ == "__main__":
    main()
