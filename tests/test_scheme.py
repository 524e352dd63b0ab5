import pytest

from lowbit.core.errors import SchemeError
from lowbit.core.scheme import PRESETS, QuantScheme, get_scheme


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True, "4"])
def test_bad_bits_refused(bits):
    with pytest.raises(SchemeError, match="bits"):
        QuantScheme(bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("gs", [0, -1, -128, 12.5, True])
def test_bad_group_size_refused(gs):
    with pytest.raises(SchemeError, match="group size"):
        QuantScheme(4, gs)  # type: ignore[arg-type]


def test_scheme_is_frozen():
    s = QuantScheme(4, 128)
    with pytest.raises(AttributeError):
        s.bits = 3  # type: ignore[misc]


def test_presets_follow_llm_compressor_names():
    assert get_scheme("W8A16") == QuantScheme(8, None, True, "W8A16")
    assert get_scheme("w4a16").group_size == 128 and get_scheme("W4A16").symmetric
    assert not get_scheme("W4A16_ASYM").symmetric
    assert get_scheme("W4A16", group_size=-1).group_size is None
    assert get_scheme("W4A16", group_size=32).group_size == 32
    assert get_scheme("W4A16", symmetric=False).symmetric is False


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(SchemeError) as e:
        get_scheme("W5A7")
    for name in PRESETS:
        assert name in str(e.value)


def test_group_size_must_divide_input_dim():
    s = QuantScheme(4, 128)
    assert s.n_groups(256) == 2
    assert QuantScheme(4, None).n_groups(576) == 1
    with pytest.raises(SchemeError, match="does not divide the input dimension 576"):
        s.n_groups(576)


def test_dict_round_trip_and_unknown_fields():
    s = QuantScheme(3, 64, False, "W3A16_ASYM")
    assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(SchemeError, match="unknown scheme fields"):
        QuantScheme.from_dict({**s.to_dict(), "rounding": "stochastic"})


def test_codes_range_and_bits_per_weight():
    s = QuantScheme(4, 128, True)
    assert (s.qmax, s.sym_zero) == (15, 8)
    assert s.bits_per_weight(4096) == pytest.approx(4 + 16 / 128)
    assert QuantScheme(4, 128, False).bits_per_weight(4096) == pytest.approx(4 + 20 / 128)


@pytest.mark.parametrize("g_idx", [False, True])
def test_dequantize_into_equals_dequantize(g_idx):
    import torch

    from lowbit.core.qweight import QuantizedWeight

    s = QuantScheme(4, 32, False)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2500, 128), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 16, (2500, 4), dtype=torch.uint8, generator=gen)
    gi = (torch.randperm(128, generator=gen) // 32).to(torch.int32) if g_idx else None
    q = QuantizedWeight(codes, torch.rand(2500, 4, generator=gen), zeros, s, gi)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(2500, 128, dtype=dtype)
        assert q.dequantize_into(out, rows=1000) is out and torch.equal(out, q.dequantize(dtype))
