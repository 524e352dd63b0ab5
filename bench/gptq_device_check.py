"""GPTQ on a GPU agrees with GPTQ on the CPU (the Triton kernel, pinned staging, background copies).

    PYTHONPATH=src python bench/gptq_device_check.py

A small random Llama (4 layers, 512 wide, float32) is quantized W4A16 g128 act-order by the block
engine on the CPU and on CUDA (activations offloaded, so every transfer path runs); prints the
share of identical codes, the largest scale difference, and checks that the model left on the host
holds exactly the dequantized GPU result.
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
    host_ok = all(torch.equal(models["cuda"].get_submodule(k).weight, res["cuda"][k].dequantize(torch.float32))
                  for k in res["cuda"])
    print(f"linears {len(same)}, identical codes min {min(same):.4f} mean {sum(same) / len(same):.4f}, "
          f"max |scale diff| {ds:.2e}, host model == dequantized GPU result: {host_ok}")
    assert min(same) > 0.95 and host_ok


if __name__ == "__main__":
    main()
