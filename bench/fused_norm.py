"""The fused RMSNorm of the calibration forwards against transformers' eager one (GPU).

    PYTHONPATH=src python bench/fused_norm.py --out OUT

On a Llama-3-8B-shaped decoder layer (random bf16 weights), per 2048-token sample:
- the norm alone, ``(1, 2048, 4096)`` bf16: eager vs fused time, and how many outputs equal eager's
  bit for bit (the rest: their largest difference in bf16 units in the last place);
- the whole layer's forward over ``--samples`` samples, eager norms vs fused ones (ratio in the
  same process, same inputs), and the largest difference of the layer outputs.
Prints a table and writes ``fused_norm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _time(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from lowbit.pipeline.fused_norm import fused_norms, rms_norm

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=1, rope_theta=500000.0, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    norm = LlamaRMSNorm(4096, eps=1e-5).to(dev, torch.bfloat16)
    norm.weight.data.normal_(1.0, 0.1)
    x = (torch.randn(1, a.seq, 4096, device=dev) * 3).to(torch.bfloat16)
    ref = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    same = float((ref == got).float().mean())
    ulp = (ref.view(torch.int16).int() - got.view(torch.int16).int()).abs().max().item()
    t_eager = _time(lambda: norm(x), 200)
    t_fused = _time(lambda: rms_norm(x, norm.weight, norm.variance_epsilon), 200)

    layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.bfloat16).eval()
    for prm in layer.parameters():
        prm.data.normal_(0, 0.02)
    for n in (layer.input_layernorm, layer.post_attention_layernorm):
        n.weight.data.normal_(1.0, 0.1)
    rope = LlamaRotaryEmbedding(cfg).to(dev)
    pos = torch.arange(a.seq, device=dev)[None]
    pe = rope(x, pos)
    xs = [(torch.randn(1, a.seq, 4096, device=dev)).to(torch.bfloat16) for _ in range(a.samples)]

    def run() -> torch.Tensor:
        with torch.no_grad():
            o = layer(xs[0], position_embeddings=pe, position_ids=pos)
        return o[0] if isinstance(o, tuple) else o

    def sweep() -> None:
        with torch.no_grad():
            for h in xs:
                layer(h, position_embeddings=pe, position_ids=pos)

    out_e = run()
    t_layer_e = _time(sweep, 3) / a.samples
    with fused_norms(layer, dev) as k:
        out_f = run()
        t_layer_f = _time(sweep, 3) / a.samples
    t_layer_e2 = _time(sweep, 3) / a.samples  # eager again: the ratio is not the order
    diff = float((out_e.float() - out_f.float()).abs().max())
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": a.seq, "samples": a.samples,
           "norm_eager_us": t_eager * 1e6, "norm_fused_us": t_fused * 1e6, "norm_bit_equal_fraction": same,
           "norm_max_ulp": ulp, "fused_norms_in_layer": k,
           "layer_eager_ms_per_sample": [t_layer_e * 1e3, t_layer_e2 * 1e3],
           "layer_fused_ms_per_sample": t_layer_f * 1e3,
           "layer_output_max_abs_diff": diff, "layer_output_max_abs": float(out_e.float().abs().max())}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, (1, {a.seq}, 4096) bf16")
    print(f"{'what':44s} {'eager':>10s} {'fused':>10s} {'ratio':>7s}")
    print(f"{'RMSNorm alone (us)':44s} {t_eager * 1e6:10.1f} {t_fused * 1e6:10.1f} {t_fused / t_eager:7.2f}")
    te = min(t_layer_e, t_layer_e2)
    print(f"{'decoder layer forward, per sample (ms)':44s} {te * 1e3:10.3f} {t_layer_f * 1e3:10.3f} "
          f"{t_layer_f / te:7.2f}")
    print(f"norm outputs equal to eager: {same:.4%} (max {ulp} ulp); layer outputs max |diff| {diff:.3g} "
          f"(max |out| {rec['layer_output_max_abs']:.3g}); {k} norms fused")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_norm.json").write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
