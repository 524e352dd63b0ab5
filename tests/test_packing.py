import pytest
import torch

from lowbit.core.packing import pack_int32, packed_words, unpack_int32


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 37), (5, 64), (1, 1), (7, 100)])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_every_bit_width(bits, shape, dim):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_int32(codes, bits, dim=dim)
    n = shape[dim]
    expect = (packed_words(n, bits), shape[1]) if dim == 0 else (shape[0], packed_words(n, bits))
    assert packed.dtype == torch.int32 and tuple(packed.shape) == expect
    assert torch.equal(unpack_int32(packed, bits, n, dim=dim), codes)


def test_known_words_4bit():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)  # e_i = i -> 0x76543210
    assert int(pack_int32(codes, 4)[0, 0]) == 0x76543210
    top = torch.full((1, 8), 15, dtype=torch.uint8)  # all ones -> -1 as int32
    assert int(pack_int32(top, 4)[0, 0]) == -1


def test_straddling_3bit_layout():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111  # bits 30, 31 of word 0 and bit 0 of word 1
    w = pack_int32(codes, 3)
    assert w.shape == (1, 3)
    assert int(w[0, 0]) & 0xFFFFFFFF == 0b11 << 30 and int(w[0, 1]) == 1 and int(w[0, 2]) == 0


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_exact_with_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (9, 200), generator=g).to(torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits, dim=1), helpers.pack_to_int32(signed, bits, packed_dim=1))
    assert torch.equal(pack_int32(codes, bits, dim=0), helpers.pack_to_int32(signed, bits, packed_dim=0))


def test_out_of_range_codes_refused():
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 8)
