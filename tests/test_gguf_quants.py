"""GGUF block encoders: byte-identical to llama.cpp's ``ggml_quantize_chunk`` (llama-cpp-python's libggml-base).

Every supported type, without and with an importance matrix, on weight-like rows and on the rows that
exercise llama.cpp's special branches (all-zero, tiny and subnormal scales, constant, one-sided, signed
zeros, ties). The reference comes from ``tests/gguf_ref.py``; without llama-cpp-python these tests fail
with a message saying so (CI installs it), they are not skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from gguf_ref import ggml_lib, ggml_quantize_ref
from lowbit.core.errors import SchemeError
from lowbit.formats.gguf import cpu_pool, kquants, kquants_low, legacy, legacy_np
from lowbit.formats.gguf.cpu_pool import POOL_MIN_VALUES
from lowbit.formats.gguf.encode import SUPPORTED, quantize_rows
from lowbit.formats.gguf.qcommon import seq_sum, seq_sum_from_first

T = GGMLQuantizationType
TYPES = sorted(SUPPORTED, key=lambda t: t.value)
ROW_LENGTHS = (256, 512, 1280)


def weight_rows(n: int, seed: int) -> np.ndarray:
    """16 rows of length ``n``: weight-like rows plus every special case the C code branches on."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, n)) * 0.02
    x[rng.random(x.shape) < 0.003] *= 60  # planted outliers
    x[6] = rng.standard_t(3, n) * 3.0  # heavy tails
    x = x.astype(np.float32)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = rng.standard_normal(n).astype(np.float32) * np.float32(1e-30)
    x[3] = rng.standard_normal(n).astype(np.float32) * np.float32(1e-38)  # subnormal scales: 1/d overflows
    x[4] = np.float32(0.37)
    x[5] = np.float32(-1.25)
    x[7] = -np.abs(x[7])
    x[7, 5] = np.float32(-2.0)  # negative max dominates
    x[8] = np.abs(x[8])
    x[9] = np.round(x[9] * 200) / 200  # values on a grid: rounding ties
    x[9, ::7] = -0.0
    x[10, : n // 2] = 0.0  # half-zero row: all-zero blocks next to normal ones
    x[11, 3] = -x[11, 17] if x[11, 17] != 0 else np.float32(0.5)  # +a / -a ties for the absmax
    x[12] = (x[12].view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16-rounded weights
    return x


def importance(n: int, seed: int) -> np.ndarray:
    """A positive importance vector ``(n,)`` with zeros, one all-zero 32-block and a wide dynamic range."""
    rng = np.random.default_rng(seed + 100)
    im = (rng.random(n) * 3).astype(np.float32) ** 2
    im[rng.random(n) < 0.1] = 0.0
    im[32:64] = 0.0
    return im


def test_reference_library_writes_the_q8_0_bytes_of_its_spec() -> None:
    """The reference itself, on one Q8_0 block worked by hand: d = absmax / 127 as fp16 (2 bytes, little
    endian), then 32 int8 codes round(x / d) (no ties here); a wrong library or binding fails this."""
    assert ggml_lib().ggml_quantize_chunk is not None
    x = (np.arange(32, dtype=np.float32) - 15.7) / 16.3
    d = np.abs(x).max() / 127
    want = np.concatenate([np.frombuffer(np.float16(d).tobytes(), np.uint8),
                           np.round(x / d).astype(np.int8).view(np.uint8)])
    got = ggml_quantize_ref(x[None], GGMLQuantizationType.Q8_0)
    assert got.shape == (1, 34) and np.array_equal(got[0], want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_bytes_match_llama_cpp(qtype: GGMLQuantizationType, with_imatrix: bool) -> None:
    for seed, n in enumerate(ROW_LENGTHS):
        x = weight_rows(n, seed)
        im = importance(n, seed) if with_imatrix else None
        want = ggml_quantize_ref(x, qtype, im)
        got = quantize_rows(x, qtype, im)
        assert got.shape == want.shape and got.dtype == np.uint8
        bad = np.nonzero((got != want).any(axis=1))[0]
        assert bad.size == 0, f"{qtype.name} n={n} imatrix={with_imatrix}: rows {bad.tolist()} differ from llama.cpp"


LEGACY_FAST = {T.Q4_0: lambda x: legacy_np.symmetric(x, 8, five_bit=False),
               T.Q5_0: lambda x: legacy_np.symmetric(x, 16, five_bit=True),
               T.Q4_1: lambda x: legacy_np.affine(x, 15), T.Q5_1: lambda x: legacy_np.affine(x, 31),
               T.Q8_0: legacy_np.q8_0}


@pytest.mark.parametrize("qtype", list(LEGACY_FAST), ids=lambda t: t.name)
def test_legacy_fast_path_bytes_match_llama_cpp(qtype: GGMLQuantizationType) -> None:
    """The numpy fast path of the legacy types, which plain weights take (``weight_rows`` holds blocks whose
    ``1/d`` overflows, so the test above runs the generic port): llama.cpp's bytes on ordinary weights, with
    block scales over the whole fp16 range (each scale's fp16 rounding decides its bytes)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 512)) * np.exp(rng.uniform(-12, 4, (64, 1)))).astype(np.float32)
    assert LEGACY_FAST[qtype](x) is not None  # the fast path applies to these rows
    np.testing.assert_array_equal(quantize_rows(x, qtype), ggml_quantize_ref(x, qtype), err_msg=qtype.name)


TORCH_CHECKED = {T.Q8_0: legacy.quantize_q8_0, T.Q4_0: legacy.quantize_q4_0, T.Q4_1: legacy.quantize_q4_1,
                 T.Q5_1: legacy.quantize_q5_1, T.Q2_K: kquants_low.quantize_q2_k, T.Q3_K: kquants_low.quantize_q3_k,
                 T.Q4_K: kquants.quantize_q4_k, T.Q6_K: kquants.quantize_q6_k}


@pytest.mark.parametrize("qtype", list(TORCH_CHECKED), ids=lambda t: t.name)
def test_torch_path_matches_numpy_path(qtype: GGMLQuantizationType) -> None:
    """The torch code path (what ``device="cuda"`` runs) gives the numpy path's bytes; run here on CPU tensors."""
    enc = TORCH_CHECKED[qtype]
    x = weight_rows(256, 7)[:12]
    for im in (None, importance(256, 7)):
        want = quantize_rows(x, qtype, im)
        got = enc(torch.from_numpy(x), None if im is None else torch.from_numpy(im))
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("shape", [(2, 3), (8, 1), (16, 2), (32, 5), (17, 4, 3), (256, 7), (4864, 2)])
def test_sequential_sum_order(shape: tuple[int, ...]) -> None:
    """numpy's reduce over a leading axis is the C loop's order (pairwise summation would differ)."""
    rng = np.random.default_rng(0)
    p = (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape) * 4)).astype(np.float32)
    acc = p[0].copy()
    for i in range(1, shape[0]):
        acc = acc + p[i]
    np.testing.assert_array_equal(seq_sum_from_first(p), acc)
    np.testing.assert_array_equal(seq_sum(p), np.float32(0) + acc)
    p2 = np.stack([p, -p])  # the same sums along axis 1
    np.testing.assert_array_equal(seq_sum(p2, axis=1), np.stack([np.float32(0) + acc, np.float32(0) - acc]))
    np.testing.assert_array_equal(seq_sum(torch.from_numpy(p)).numpy(), np.float32(0) + acc)


def test_process_pool_path_matches_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor of POOL_MIN_VALUES values or more goes through the forked worker pool (on Linux), here in
    slices of 1 MB of rows through the scratch file."""
    monkeypatch.setattr(cpu_pool, "SCRATCH_BYTES", 1 << 20)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((POOL_MIN_VALUES // 1024 + 3, 1024)) * 0.02).astype(np.float32)
    im = importance(1024, 5)
    for qtype, qw in ((T.Q4_K, None), (T.Q6_K, im), (T.Q5_0, im)):
        np.testing.assert_array_equal(quantize_rows(x, qtype, qw, workers=2), ggml_quantize_ref(x, qtype, qw),
                                      err_msg=qtype.name)


def test_float_types_special_values() -> None:
    vals = np.array([np.nan, -np.nan, np.inf, -np.inf, 65504.0, 65520.0, 1e-8, -3e-39, 1.0000001, -0.0, 3.14159,
                     np.float32(1.00390625), np.float32(1.01171875)], dtype=np.float32)
    bits = np.concatenate([vals.view(np.uint32), np.array([0x7F800001, 0xFFC12345, 0x7FBFFFFF], np.uint32)])
    x = np.resize(bits, 64).view(np.float32).reshape(2, 32)
    for qtype in (T.F32, T.F16, T.BF16):
        np.testing.assert_array_equal(quantize_rows(x, qtype), ggml_quantize_ref(x, qtype), err_msg=qtype.name)


# max |x - dequant(quant(x))| / max |x| on normal rows (loose: the codes are checked exactly above)
ROUND_TRIP_TOL = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 8e-3, T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_0: 0.06, T.Q5_1: 0.06,
                  T.Q5_K: 0.06, T.Q4_0: 0.12, T.Q4_1: 0.12, T.Q4_K: 0.12, T.Q3_K: 0.3, T.Q2_K: 0.5}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_error_is_small(qtype: GGMLQuantizationType) -> None:
    x = np.random.default_rng(3).standard_normal((8, 512)).astype(np.float32)
    q = quantize_rows(x, qtype)
    back = quants.dequantize(q, qtype).reshape(x.shape)
    err = np.abs(back - x).max() / np.abs(x).max()
    assert err <= ROUND_TRIP_TOL[qtype], f"{qtype.name}: relative error {err:.4f}"


@pytest.mark.parametrize("qtype, n", [(T.Q4_K, 896), (T.Q6_K, 100), (T.Q4_0, 48), (T.Q8_0, 31)], ids=str)
def test_row_length_not_a_block_multiple_raises(qtype: GGMLQuantizationType, n: int) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    pattern = rf"{qtype.name} needs rows whose length is a multiple of {block}.*llama.cpp falls back"
    with pytest.raises(SchemeError, match=pattern):
        quantize_rows(np.zeros((2, n), np.float32), qtype)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="not supported"):
        quantize_rows(np.zeros((1, 256), np.float32), T.IQ2_XXS)
    with pytest.raises(ValueError, match="imatrix must have shape"):
        quantize_rows(np.zeros((1, 256), np.float32), T.Q4_K, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rows(np.full((1, 256), np.nan, np.float32), T.Q4_K)
