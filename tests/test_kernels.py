"""Kernel-backed runtime linears: bit-exact repack, Triton kernels (interpreter), CPU int4/int8, prepare_model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.core.kernels import choose_backend, prepare_model
from lowbit.core.kernels.cpu_linear import CPUInt4Linear, CPUInt8Linear
from lowbit.core.kernels.tiles import pack_tiles, repack_ct, tile_elems, unpack_ct, unpack_tiles
from lowbit.core.kernels.triton_linear import TritonWxA16Linear
from lowbit.core.packing import pack_int32, unpack_int32
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme


def qlinear(n: int, k: int, scheme: QuantScheme, seed: int = 0, bias: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    groups = scheme.n_groups(k)
    codes = torch.randint(0, 2**scheme.bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = (torch.full((n, groups), scheme.sym_zero, dtype=torch.uint8) if scheme.symmetric
             else torch.randint(0, 2**scheme.bits, (n, groups), generator=g, dtype=torch.uint8))
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_qweight(QuantizedWeight(codes, scales, zeros, scheme), b)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [256, 300, 4096 + 96])
def test_repack_is_bit_exact(bits: int, k: int) -> None:
    codes = torch.randint(0, 2**bits, (37, k), dtype=torch.uint8)
    ct = pack_int32(codes, bits)  # the compressed-tensors words
    assert torch.equal(unpack_ct(ct, bits, k), unpack_int32(ct, bits, k))
    tiles = repack_ct(ct, bits, k, rows=10)
    assert torch.equal(unpack_tiles(tiles, bits, k), codes)
    # the layout itself: element t*TILE + s*32 + w sits in slot s of word t*32 + w
    t, s, w = (k - 1) // tile_elems(bits), 32 // bits - 1, 7
    kk = t * tile_elems(bits) + s * 32 + w
    if kk < k:
        assert (int(tiles[3, t * 32 + w]) & 0xFFFFFFFF) >> (s * bits) & (2**bits - 1) == int(codes[3, kk])
    assert torch.equal(pack_tiles(codes, bits), tiles)


def test_triton_linear_holds_the_same_weight() -> None:
    q = qlinear(48, 384, QuantScheme(4, 128, False))
    t = TritonWxA16Linear.from_quant_linear(q, "cpu")
    a, b = q.qweight(), t.qweight()
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)


# Runs in a subprocess: TRITON_INTERPRET must be set before triton compiles the kernels.
CHECK = r"""
import torch
from lowbit.core.kernels import configs
from lowbit.core.kernels.triton_linear import TritonWxA16Linear
from lowbit.core.qlinear import QuantLinear
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme

g = torch.Generator().manual_seed(0)
worst = 0.0
cases = [  # (bits, group, sym, N, K, M, dtype, config)
    (4, 128, True, 40, 512, 1, torch.bfloat16, configs.GemvConfig(bn=16, u=2)),
    (4, 128, False, 48, 1024, 1, torch.bfloat16, configs.GemvConfig(bn=16, u=2, split=2)),  # EVEN: no masks
    (8, 32, True, 32, 512, 1, torch.bfloat16, configs.GemvConfig(bn=16, u=2)),  # EVEN
    (4, 128, True, 32, 512, 4, torch.bfloat16, configs.GemmConfig(bm=16, bn=16)),  # EVEN
    (4, 32, False, 24, 640, 1, torch.float16, configs.GemvConfig(bn=8, u=4, split=2)),
    (8, None, True, 33, 384, 1, torch.bfloat16, configs.GemvConfig(bn=16, u=1, split=3)),
    (4, None, False, 20, 320, 1, torch.bfloat16, configs.GemvConfig(bn=16, u=2)),
    (4, 64, False, 40, 512, 3, torch.bfloat16, configs.GemmConfig(bm=16, bn=16)),
    (8, 128, False, 48, 384, 17, torch.bfloat16, configs.GemmConfig(bm=16, bn=32, split=2)),
    (4, None, True, 20, 256, 5, torch.float16, configs.GemmConfig(bm=16, bn=16, split=3)),
]
for bits, gs, sym, n, k, m, dt, cfg in cases:
    sch = QuantScheme(bits, gs, sym)
    G = sch.n_groups(k)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = (torch.full((n, G), sch.sym_zero, dtype=torch.uint8) if sym
             else torch.randint(0, 2**bits, (n, G), generator=g, dtype=torch.uint8))
    scales = (torch.rand(n, G, generator=g) * 0.02 + 0.001).to(dt)
    q = QuantLinear.from_qweight(QuantizedWeight(codes, scales, zeros, sch), torch.randn(n, generator=g), dtype=dt)
    mod = TritonWxA16Linear.from_quant_linear(q, "cpu")
    x = torch.randn(m, k, generator=g).to(dt)
    ref = x.double() @ q.qweight().dequantize(torch.float64).t() + q.bias.double()
    y = torch.full((m, n), float("nan"), dtype=dt)
    for rep in range(2):  # twice: split-K must leave its workspace and counters zeroed
        mod.run(x, y, cfg)
    ws, cnt = __import__("lowbit.core.kernels.triton_linear", fromlist=["x"])._WORKSPACE[torch.device("cpu")]
    assert bool((ws == 0).all()) and bool((cnt == 0).all()), "split-K workspace not reset"
    # Bound: float32 accumulation of exact (q - z) * x products is far below the output rounding;
    # bf16 rounding is <= 2^-8 relative, but the interpreter truncates (<= 2^-7); fp16 <= 2^-11.
    tol = 2.0**-7 if dt == torch.bfloat16 else 2.0**-10
    excess = ((y.double() - ref).abs() - tol * ref.abs()).clamp_min(0).max() / ref.abs().max()
    assert torch.isfinite(y).all(), (bits, gs, sym, m)
    assert excess < 1e-5, (bits, gs, sym, m, float(excess))
    y2 = mod(x)  # forward(): the default configuration, another summation order
    assert ((y2.double() - ref).abs() - tol * ref.abs()).clamp_min(0).max() / ref.abs().max() < 1e-5
    worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
print("OK", worst)
"""


def test_triton_kernels_match_dequantized_matmul() -> None:
    pytest.importorskip("triton", reason="needs the triton package (in the dev extra on x86-64 Linux)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("OK"), r.stdout


@pytest.mark.parametrize("scheme,cls", [(QuantScheme(4, 128), CPUInt4Linear),
                                        (QuantScheme(4, 64, False), CPUInt4Linear),
                                        (QuantScheme(4, None), CPUInt4Linear), (QuantScheme(8, None), CPUInt8Linear)])
def test_cpu_kernels_match_dequantized_matmul(scheme: QuantScheme, cls: type) -> None:
    q = qlinear(64, 256, scheme)
    mod = cls(q, torch.bfloat16)
    x = torch.randn(3, 256).to(torch.bfloat16)
    ref = x.double() @ q.qweight().dequantize(torch.float64).t() + q.bias.double()
    y = mod(x)
    assert y.dtype == torch.bfloat16
    # x is the same bf16 tensor on both sides; the output is rounded to bf16 (<= 2^-8 relative) and the
    # kernels round the dequantized weight to bf16 once (<= 2^-9 per weight, ~2^-9 of the output's norm);
    # asymmetric zeros are rounded to bf16 once more (<= 1/64 of a step, cpu_linear's docstring).
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 2.0**-7, err


def test_prepare_model_picks_and_reports_backends() -> None:
    model = nn.Sequential(qlinear(64, 256, QuantScheme(4, 128)), qlinear(64, 256, QuantScheme(8, None)),
                          qlinear(40, 256, QuantScheme(4, 64)), qlinear(64, 256, QuantScheme(3, 64)),
                          nn.LayerNorm(64))
    x = torch.randn(2, 256)
    refs = [m(x) for m in list(model)[:4]]
    report = prepare_model(model, "cpu", dtype=torch.bfloat16)
    assert report.layers["0"] == "cpu-int4" and report.layers["1"] == "cpu-int8"
    assert report.layers["2"].startswith("dequant: ") and "multiple of 16" in report.layers["2"]
    assert report.layers["3"] == "dequant: no cpu kernel for 3-bit weights"
    assert "1 cpu-int4, 1 cpu-int8, 2 dequant" in report.summary() and model.lowbit_kernels is report
    assert isinstance(model[0], CPUInt4Linear) and isinstance(model[3], QuantLinear)
    assert model[4].weight.dtype == torch.bfloat16
    for i, r in enumerate(refs):
        y = model[i](x.to(torch.bfloat16)).float()
        assert float((y - r).norm() / r.norm()) < 2.0**-6, i
    with pytest.raises(Exception, match="unknown kernel backend"):
        choose_backend(qlinear(64, 256, QuantScheme(4, 128)), torch.device("cpu"), "nope")
    assert choose_backend(qlinear(64, 256, QuantScheme(4, 128)), torch.device("cpu"), "triton")[0] == "dequant"


def test_loaded_artifact_decodes_like_the_dequantized_model(tmp_path: Path) -> None:
    """save -> load_quantized -> prepare_model(cpu): the same greedy tokens and close logits as the fallback."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model_dir
    from lowbit.formats import compressed_tensors as ct
    from lowbit.pipeline.quantize import quantize_model

    d = make_tiny_model_dir(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(d)
    qws = quantize_model(model, QuantScheme(4, 64), "rtn", progress=False)
    out = ct.save_quantized(model, qws, tmp_path / "w4")
    ref, _ = ct.load_quantized(out, dtype=torch.bfloat16)
    fast, _ = ct.load_quantized(out, dtype=torch.bfloat16)
    report = prepare_model(fast, "cpu", dtype=torch.bfloat16)
    assert set(report.layers.values()) == {"cpu-int4"} and len(report.layers) == 14
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), fast(ids).logits.float()
    assert float((a - b).norm() / a.norm()) < 2.0**-5  # bf16 activations through 2 blocks, 7 linears each
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_static_decoder_matches_transformers() -> None:
    """bench/static_decode.py (the decode benchmarks' loop) gives model(ids).logits and generate()'s tokens."""
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from static_decode import StaticDecoder, decode_tokens_per_s

    cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(cfg).eval()  # q/k/v biases, grouped-query attention
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits[0]
        dec = StaticDecoder(model, 16)
        first = dec.step(ids[:, :7], torch.arange(7))
        rest = torch.cat([dec.step(ids[:, i:i + 1], torch.tensor([i])) for i in range(7, 12)])
    assert torch.allclose(first[0], ref[6], atol=1e-5) and torch.allclose(rest, ref[7:], atol=1e-5)
    got = decode_tokens_per_s(model, 8, 6, graphs=False, runs=1)["tokens"]
    prompt = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    assert got == model.generate(prompt, max_new_tokens=6, do_sample=False)[0, 8:].tolist()


def test_int8_head_is_opt_in_and_bounded() -> None:
    from lowbit.core.kernels.prepare import int8_linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    q = int8_linear(lin)
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized_weight() - lin.weight).abs() <= step / 2 + 1e-7).all()  # round to nearest: half a step
    model = nn.Module()
    model.head = lin
    model.get_output_embeddings = lambda: model.head  # type: ignore[method-assign]
    model.set_output_embeddings = lambda m: setattr(model, "head", m)  # type: ignore[method-assign]
    report = prepare_model(model, "cpu", int8_head=True)
    assert isinstance(model.head, CPUInt8Linear) and report.layers == {"head": "cpu-int8"}


def test_shipped_configs_are_valid() -> None:
    from lowbit.core.kernels import configs

    shipped = configs._shipped()
    assert shipped, "src/lowbit/core/kernels/tuned/*.json is missing"
    for key, cfg in shipped.items():
        name, bits, gs_class, n, k, bucket = key
        assert bits in (4, 8) and bucket in (1, 2, 4, 8, 16, 32, 64, 128)
        assert isinstance(cfg, configs.GemvConfig) == (bucket == 1), key
    h100 = {(k[1], k[3], k[4]) for k in shipped if k[0] == "NVIDIA H100 80GB HBM3" and k[5] == 1}
    assert {(4, 4096, 4096), (4, 1024, 4096), (4, 14336, 4096), (4, 4096, 14336)} <= h100
