import pytest
import torch

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import quantize_rtn


def _w(out=48, inp=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [32, None])
def test_rtn_error_bound(bits, sym, gs):
    """Min/max RTN: every weight is within half a step of its reconstruction (the grid spans the
    range up to half a step: sym max|w| = (2^(b-1) - 0.5) s, asym zero point rounded)."""
    w = _w()
    qw = quantize_rtn(w, QuantScheme(bits, gs, sym))
    err = (qw.dequantize() - w).abs()
    step = qw.scales.float()[:, qw.group_index()]
    assert bool((err <= step / 2 * (1 + 1e-4)).all())
    assert int(qw.codes.max()) <= qw.scheme.qmax
    if sym:
        assert bool((qw.zeros == 1 << (bits - 1)).all())


def test_rtn_error_shrinks_with_bits():
    w = _w()
    errs = [(quantize_rtn(w, QuantScheme(b, 32)).dequantize() - w).pow(2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] / w.pow(2).mean() < 1e-4  # W8: relative MSE below 1e-4


def test_search_never_worse_than_minmax():
    w = _w(seed=1)
    for s in (QuantScheme(4, 32), QuantScheme(3, 32, False), QuantScheme(4, None)):
        plain = (quantize_rtn(w, s).dequantize() - w).pow(2).sum(1)
        searched = (quantize_rtn(w, s, search=True).dequantize() - w).pow(2).sum(1)
        assert bool((searched <= plain * (1 + 1e-6)).all())
        assert searched.sum() < plain.sum()


def test_importance_lowers_weighted_error():
    """Weighted by E[x^2], the imatrix fit beats plain and unweighted-search RTN on the layer output."""
    g = torch.Generator().manual_seed(2)
    w = _w(64, 128, seed=3)
    x = torch.randn(2048, 128, generator=g) * (torch.rand(128, generator=g) * 4) ** 2  # outlier channels
    imp = x.pow(2).mean(0)
    s = QuantScheme(4, 32)

    def out_err(qw):
        return float((x @ (qw.dequantize() - w).T).pow(2).mean())

    e_plain = out_err(quantize_rtn(w, s))
    e_search = out_err(quantize_rtn(w, s, search=True))
    e_imp = out_err(quantize_rtn(w, s, importance=imp))
    assert e_imp < e_search < e_plain


def test_scales_are_rounded_to_storage_dtype():
    """Codes are chosen against the stored (bf16) scales: the half-step bound holds for them, up to
    the grid shrinking by the scale's rounding (relative 2^-9 at most, times qmax steps)."""
    w = _w()
    qw = quantize_rtn(w, QuantScheme(4, 32, False), scale_dtype=torch.bfloat16)
    assert qw.scales.dtype == torch.bfloat16
    step = qw.scales.float()[:, qw.group_index()]
    bound = step / 2 + step * 15 * 2**-9
    assert bool(((qw.dequantize() - w).abs() <= bound * (1 + 1e-4)).all())


def test_bad_inputs():
    w = _w()
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(w, QuantScheme(4, 32))
    with pytest.raises(ValueError, match="importance"):
        quantize_rtn(_w(), QuantScheme(4, 32), importance=torch.ones(5))
    with pytest.raises(Exception, match="does not divide"):
        quantize_rtn(_w(8, 100), QuantScheme(4, 32))


def test_zero_group_is_exact():
    w = _w()
    w[:, :32] = 0
    qw = quantize_rtn(w, QuantScheme(4, 32, False))
    assert bool((qw.dequantize()[:, :32] == 0).all())


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_fit_params_in_bands_equals_fit_groups(search, sym):
    from lowbit.methods.rtn import fit_groups, fit_params

    w = torch.randn(70, 4, 32, generator=torch.Generator().manual_seed(0))
    a = torch.rand(1, 4, 32, generator=torch.Generator().manual_seed(1))
    sch = QuantScheme(3, 32, sym)
    s, z, _ = fit_groups(w, sch, a, search=search, scale_dtype=torch.bfloat16)
    s2, z2 = fit_params(w, sch, a, search=search, scale_dtype=torch.bfloat16, rows=16)
    assert torch.equal(s, s2) and torch.equal(z, z2)
