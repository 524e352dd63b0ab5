import pytest
import torch

import lowbit.core.inplace as ip


@pytest.mark.parametrize("n", [1, 7, 100, 1030])
def test_in_place_permutations_equal_torch_indexing(n, monkeypatch):
    monkeypatch.setattr(ip, "_BAND_ELEMENTS", 1000)  # many bands and tiles even for small n
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n + 3, n, generator=g)
    H = X.T @ X
    H = (H + H.T) / 2  # exactly symmetric (the algorithm relies on H == H^T)
    p = torch.randperm(n, generator=g)
    assert torch.equal(ip.permute_symmetric_(H.clone(), p), H[p][:, p])
    assert torch.equal(ip.permute_columns_(X.clone(), p), X[:, p])
    A = torch.randn(n, n, generator=g)
    assert torch.equal(ip.transpose_(A.clone(), tile=64), A.T)
    with pytest.raises(ValueError, match="square"):
        ip.transpose_(X)
