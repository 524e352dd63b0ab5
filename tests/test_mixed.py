"""Mixed precision: candidate byte counts against the writers, the Fisher statistics against autograd, the
single-tensor KLD against a plain forward, the knapsack against brute force, and allocations that the plan
checks accept and the engines load."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import make_tiny_model_dir
from lowbit.core.errors import LowbitError
from lowbit.core.scheme import QuantScheme
from lowbit.mixed.candidates import Candidate, parse_candidate, parse_candidates
from lowbit.mixed.knapsack import Unit, solve
from lowbit.mixed.measure import spearman

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("name,bits,gs,sym", [("W4", 4, 128, True), ("W3g64a", 3, 64, False), ("W8c", 8, None, True),
                                              ("W4A16_ASYM", 4, 128, False), ("w2g32", 2, 32, True)])
def test_int_names(name: str, bits: int, gs: int | None, sym: bool) -> None:
    c = parse_candidate(name, "int")
    assert c.scheme == QuantScheme(bits, gs, sym)


def test_unknown_candidate_is_a_clear_error() -> None:
    with pytest.raises(LowbitError, match="unknown candidate"):
        parse_candidate("Q4_K", "int")
    with pytest.raises(LowbitError, match="do not mix per layer"):
        parse_candidate("NF4", "int")
    assert [c.name for c in parse_candidates("Q8_0,Q4_0,Q4_K", "gguf")] == ["Q4_0", "Q4_K", "Q8_0"]


@pytest.mark.parametrize("name", ["W4", "W3g64a", "W8c", "W2g32a", "W5g32"])
@pytest.mark.parametrize("shape", [(96, 256), (37, 128)])
def test_int_bytes_equal_the_compressed_tensors_entries(name: str, shape: tuple[int, int]) -> None:
    """nbytes counts exactly the tensors pack_tensors writes (odd row counts pad the zero points' words)."""
    from lowbit.formats.compressed_tensors import pack_tensors
    from lowbit.methods.rtn import quantize_rtn

    c = parse_candidate(name, "int")
    assert c.scheme is not None
    w = torch.randn(shape)
    t = pack_tensors("l", quantize_rtn(w, c.scheme), torch.bfloat16)
    assert c.nbytes(shape) == sum(v.numel() * v.element_size() for v in t.values())


@pytest.mark.parametrize("t", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q4_0", "Q5_1", "Q8_0"])
def test_gguf_bytes_equal_the_encoder_output(t: str) -> None:
    from lowbit.formats.gguf.encode import quantize_rows

    c = parse_candidate(t, "gguf")
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    assert c.nbytes((3, 512)) == quantize_rows(x, Q[t], None).nbytes
    assert not Candidate("Q4_K", gguf=Q.Q4_K).fits((3, 640)) and Candidate("Q4_0", gguf=Q.Q4_0).fits((3, 640))


def _brute(units: list[Unit], budget: int) -> float:
    best = float("inf")
    for pick in itertools.product(*[u.options for u in units]):
        if sum(o[2] for o in pick) <= budget:
            best = min(best, sum(o[1] for o in pick))
    return best


def test_knapsack_matches_brute_force_and_keeps_the_budget() -> None:
    rng = random.Random(0)
    for trial in range(40):
        units = []
        for _ in range(rng.randint(1, 5)):
            opts = sorted((rng.randint(100, 5000), rng.random()) for _ in range(rng.randint(1, 4)))
            units.append(Unit(("t",), tuple((i, c, b) for i, (b, c) in enumerate(opts))))
        lo = sum(min(o[2] for o in u.options) for u in units)
        hi = sum(max(o[2] for o in u.options) for u in units)
        budget = rng.randint(lo, hi)
        sol = solve(units, budget, grains=1 << 16)
        assert sol.nbytes <= budget
        # the byte grid is exact here (budget < 2^16): the optimum itself
        assert sol.cost == pytest.approx(_brute(units, budget), abs=1e-12), trial
        assert solve(units, budget, grains=1 << 16).choice == sol.choice  # deterministic


def test_knapsack_refuses_an_impossible_budget() -> None:
    with pytest.raises(LowbitError, match="below the smallest assignment"):
        solve([Unit(("a",), ((0, 1.0, 100),))], 99)


def test_spearman_matches_scipy() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.random(30).tolist()
    b = (np.array(a) + rng.random(30)).tolist()
    b[3] = b[4]  # a tie
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def _tiny(tmp_path: Path, arch: str, **kw):  # type: ignore[no-untyped-def]
    from lowbit.models.loader import load_model

    return load_model(make_tiny_model_dir(tmp_path / arch, arch, **kw), dtype=torch.float32)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fisher_equals_autograd_squared_weight_gradients(tmp_path: Path, arch: str) -> None:
    """F from the hooks equals sum over sequences of (dL/dW)^2 from autograd, with the same sampled labels
    (the reference repeats collect_fisher's draws in the same order); tied embeddings add both paths."""
    from lowbit.mixed.fisher import collect_fisher

    lm = _tiny(tmp_path, arch)
    m = lm.model
    tokens = torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    st = collect_fisher(m, tokens, fraction=0.5, seed=5, progress=False)
    params = {n.removesuffix(".weight"): p for n, p in m.named_parameters() if p.ndim == 2}
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(5)
    for p in params.values():
        p.requires_grad_(True)
    n_tok = 0
    for i in range(tokens.shape[0]):
        T = tokens.shape[1]
        k = max(1, int(round((T - 1) * 0.5)))
        keep = torch.sort(torch.randperm(T - 1, generator=gen)[:k] + 1).values
        lp = torch.log_softmax(m(input_ids=tokens[i:i + 1], logits_to_keep=keep).logits[0].float(), -1)
        y = torch.multinomial(lp.detach().exp(), 1, generator=gen).squeeze(1)
        m.zero_grad()
        (-lp.gather(1, y[:, None]).sum()).backward()
        for n, p in params.items():
            ref[n] += p.grad.square()
        n_tok += k
    assert st.tokens == n_tok
    assert st.tied == (arch == "gemma3")
    for n, F in st.fisher.items():
        assert torch.allclose(F * n_tok, ref[n], rtol=1e-4, atol=1e-10), n
    assert set(st.fisher) == set(ref) - ({"lm_head"} if st.tied else set())


def test_single_tensor_kld_equals_a_plain_forward(tmp_path: Path) -> None:
    from lowbit.mixed.measure import SingleTensorKLD

    lm = _tiny(tmp_path, "gemma3")
    m = lm.model
    tokens = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    meas = SingleTensorKLD(m, tokens)

    def direct(module: str, w: torch.Tensor) -> float:
        with torch.no_grad():
            ref = torch.log_softmax(m(tokens).logits[:, 16:].float(), -1)
            mod = m.get_submodule(module)
            old = mod.weight.data.clone()
            mod.weight.data.copy_(w)
            q = torch.log_softmax(m(tokens).logits[:, 16:].float(), -1)
            mod.weight.data.copy_(old)
        return float((ref.exp() * (ref - q)).sum(-1).mean())

    for module in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj", "model.embed_tokens"):
        w = m.get_submodule(module).weight.detach()
        w2 = w + 0.05 * torch.randn_like(w)
        got = meas.kld(module, w2)
        assert got > 0
        assert got == pytest.approx(direct(module, w2), rel=1e-4), module
        assert meas.kld(module, w) == pytest.approx(0.0, abs=1e-7)
