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


def _llama(path: Path, **kw):  # type: ignore[no-untyped-def]
    try:
        from llama_cpp import Llama
    except ImportError as e:  # CI installs it: a missing client is a failure, not a skip
        raise AssertionError("llama-cpp-python is required for the GGUF tests (see .ci/run)") from e
    return Llama(model_path=str(path), verbose=False, n_threads=1, **kw)


@pytest.fixture(scope="module")
def kq_folder(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A tiny Qwen2 whose hidden rows (256) take K-quants and whose MLP rows (320) take only 32-blocks."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("mix") / "hf", "qwen2", hidden_size=256,
                               intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2)


def test_stock_type_map_writes_the_stock_tensors(tmp_path: Path, kq_folder: Path) -> None:
    """A type map equal to llama.cpp's own Q4_K_M mix writes the same tensors, byte for byte."""
    from lowbit.formats.gguf.writer import write_gguf

    stock = write_gguf(kq_folder, tmp_path / "stock.gguf", "Q4_K_M")
    mixed = write_gguf(kq_folder, tmp_path / "mix.gguf", "MIX",
                       types={n: t for n, t in stock.types.items() if t != "F32"})
    a = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(stock.path).tensors}
    b = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(mixed.path).tensors}
    assert list(a) == list(b) and a == b


def test_mixed_types_are_ggml_bytes_and_llama_cpp_runs_them(tmp_path: Path, kq_folder: Path) -> None:
    """Every tensor of a per-tensor mix holds what ggml_quantize_chunk writes for its type (with the
    imatrix), and llama.cpp loads the file and predicts like the float model (the same top-1 on most
    positions, a small KL divergence: the mix is 5-8 bits)."""
    from gguf_ref import ggml_quantize_ref
    from lowbit.formats.gguf.imatrix import Imatrix
    from lowbit.formats.gguf.writer import write_gguf

    f32 = write_gguf(kq_folder, tmp_path / "f32.gguf", "F32")
    src = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
           for t in gguf.GGUFReader(f32.path).tensors}
    cycle = ["Q5_K", "Q6_K", "Q8_0", "Q5_1", "Q5_0"]
    types, i = {}, 0
    for n in src:
        if n.endswith("norm.weight") or src[n].shape[0] == 1:
            continue
        cands = [t for t in cycle if src[n].shape[1] % gguf.GGML_QUANT_SIZES[Q[t]][0] == 0]
        types[n] = cands[i % len(cands)]
        i += 1
    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["random"], chunk_count=1, chunk_size=8)
    for n in types:
        im.sums[n] = (rng.random((1, src[n].shape[1])) * 8).astype(np.float32)
        im.counts[n] = np.array([8.0], dtype=np.float32)
    rep = write_gguf(kq_folder, tmp_path / "mix.gguf", "MIX", imatrix=im, types=types)
    got = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(rep.path).tensors}
    assert {n: t for n, (t, _) in got.items() if n in types} == types
    assert len(set(types.values())) == len(cycle)
    for n, t in types.items():
        w = None if t == "Q8_0" else im.weights(n)
        assert got[n][1] == ggml_quantize_ref(src[n], Q[t], w).tobytes(), n
    ids = [1, 5, 9, 33, 77, 120, 200, 31, 64, 250, 17, 3]
    lp = []
    for path in (f32.path, rep.path):
        llm = _llama(path, n_ctx=64, logits_all=True)
        llm.eval(ids)
        lp.append(torch.log_softmax(torch.tensor(np.asarray(llm.scores[: len(ids)])), -1))
    kld = float((lp[0].exp() * (lp[0] - lp[1])).sum(-1).mean())
    assert 0 < kld < 0.05
    assert (lp[0].argmax(-1) == lp[1].argmax(-1)).float().mean() >= 0.75


def test_type_map_errors_name_the_tensor(tmp_path: Path, kq_folder: Path) -> None:
    from lowbit.formats.gguf.writer import write_gguf

    stock = write_gguf(kq_folder, tmp_path / "stock.gguf", "Q8_0")
    types = {n: t for n, t in stock.types.items() if t != "F32"}
    bad = {**types, "blk.0.ffn_down.weight": "Q4_K"}  # 320-wide rows: K-quants need 256-multiples
    with pytest.raises(LowbitError, match="blk.0.ffn_down.weight: Q4_K needs rows of a multiple of 256"):
        write_gguf(kq_folder, tmp_path / "x.gguf", "MIX", types=bad)
    with pytest.raises(LowbitError, match="gives no type for blk.0.attn_q.weight"):
        write_gguf(kq_folder, tmp_path / "x.gguf", "MIX", types={k: v for k, v in types.items()
                                                                    if k != "blk.0.attn_q.weight"})
    with pytest.raises(LowbitError, match="does not have: blk.9.attn_q.weight"):
        write_gguf(kq_folder, tmp_path / "x.gguf", "MIX", types={**types, "blk.9.attn_q.weight": "Q8_0"})
    assert not (tmp_path / "x.gguf").exists()


def _artifact_quant_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                if k.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    t = h.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


def test_int_allocation_to_recipe_to_artifact(tmp_path: Path, kq_folder: Path) -> None:
    """GPTQ sensitivity -> allocation under a budget -> recipe with overrides -> artifact whose quantized tensors
    take exactly the bytes the allocation counted; fused groups share a scheme; more budget, less loss."""
    import lowbit
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.mixed import Budget, SensitivityConfig, allocate_from, sensitivity
    from lowbit.recipe.schema import Calibration, Recipe

    cfg = SensitivityConfig(family="int", method="gptq", candidates=("W3", "W4", "W4g32", "W8c"), samples=2,
                            length=32)
    sens = sensitivity(str(kq_folder), cfg, progress=False)
    down = next(t for t in sens.tensors if t.name.endswith("down_proj"))
    assert "W3g128" not in sens.cost[down.name] and "W4g32" in sens.cost[down.name]  # 320 columns
    low, high = allocate_from(sens, Budget(bpw=4.2)), allocate_from(sens, Budget(bpw=6.5))
    assert low.bits_per_weight <= 4.2 and high.bits_per_weight <= 6.5
    assert high.predicted < low.predicted
    for a in (low, high):
        for t in sens.tensors:
            mates = [u for u in sens.tensors if u.unit == t.unit]
            assert {a.choice[u.name] for u in mates} == {a.choice[t.name]}
    base = Recipe(low.recipe().scheme, GPTQConfig(), Calibration(samples=2, length=32))
    recipe = low.recipe(base)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    res = lowbit.quantize(str(kq_folder), recipe, tmp_path / "out")
    assert _artifact_quant_bytes(tmp_path / "out") == low.tensor_bytes
    model, _ = lowbit.load(tmp_path / "out")
    schemes = {n: m.scheme for n, m in model.named_modules() if hasattr(m, "scheme")}
    for t in sens.tensors:
        assert schemes[t.module] == sens.candidate(low.choice[t.name]).scheme, t.name
    assert res.n_linears == len(sens.tensors)


def test_cli_gguf_bpw_and_replay(tmp_path: Path, kq_folder: Path, capsys: pytest.CaptureFixture) -> None:
    """`lowbit gguf --bpw` writes a file within the budget (its own bits per weight), lists every tensor's type,
    leaves a type map that replays to the same bytes, and llama.cpp runs the file."""
    from lowbit.cli import main

    out = tmp_path / "mix.gguf"
    args = ["--no-progress", "gguf", str(kq_folder), "--bpw", "6.0", "--sens-samples", "2", "--sens-len", "32",
            "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "per-tensor choice" in text and "ffn_down" in text
    size = out.stat().st_size
    n = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(out).tensors)
    assert 8 * size / n <= 6.0
    assert main(["--no-progress", "gguf", str(kq_folder), "--types", str(out) + ".types.json",
                 "-o", str(tmp_path / "again.gguf")]) == 0
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()
    llm = _llama(out, n_ctx=32)
    llm.eval([1, 5, 9, 33])
    assert np.isfinite(np.asarray(llm.scores[:4])).all()
    assert main(["gguf", str(kq_folder), "--bpw", "6", "--type", "Q4_K_M", "-o", str(tmp_path / "y.gguf")]) == 2


def test_cli_sensitivity_measures_and_plots(tmp_path: Path, kq_folder: Path) -> None:
    import json

    from lowbit.cli import main

    out = tmp_path / "s.json"
    assert main(["--no-progress", "sensitivity", str(kq_folder), "--candidates", "Q4_0,Q8_0", "--calib-samples", "2",
                 "--calib-len", "32", "--measure", "1", "--measure-tensors", r"blk\.1\.", "--plot",
                 str(tmp_path / "c.png"), "-o", str(out)]) == 0
    d = json.loads(out.read_text())
    measured = [t for t in d["tensors"] if "measured" in t]
    assert measured and all(t["name"].startswith("blk.1.") for t in measured)
    assert d["rank_agreement"]["pairs"] == 2 * len(measured)
    assert (tmp_path / "c.png").stat().st_size > 1000
    from lowbit.mixed import Sensitivity

    s = Sensitivity.load(out)
    assert s.cost == {t["name"]: t["cost"] for t in d["tensors"]}


def test_gguf_budget_counts_the_file_to_the_byte(tmp_path: Path, kq_folder: Path) -> None:
    """Metadata, tensor infos, every tensor's bytes and its 32-byte padding: the allocation's count of a GGUF
    file is its size, so a budget of the stock file's bits per weight admits the stock mix itself."""
    from lowbit.formats.gguf.writer import write_gguf
    from lowbit.mixed import Budget, SensitivityConfig, allocate_from, sensitivity
    from lowbit.mixed.api import gguf_overhead

    sens = sensitivity(str(kq_folder), SensitivityConfig(family="gguf", samples=1, length=16), progress=False)
    stock = write_gguf(kq_folder, tmp_path / "q.gguf", "Q4_K_M")
    counted = gguf_overhead(kq_folder) + sens.fixed_bytes + sum(sens.nbytes(t, stock.types[t.name])
                                                                for t in sens.tensors)
    assert counted == stock.size_bytes
    a = allocate_from(sens, Budget(bpw=stock.bits_per_weight), gguf_overhead(kq_folder))
    assert a.predicted <= sum(sens.cost[t.name][stock.types[t.name]] for t in sens.tensors)
    mixed = write_gguf(kq_folder, tmp_path / "m.gguf", "MIX", types=a.gguf_types())
    assert mixed.size_bytes == gguf_overhead(kq_folder) + sens.fixed_bytes + a.tensor_bytes <= stock.size_bytes


def test_compare_entry_points(tmp_path: Path, kq_folder: Path) -> None:
    """What `lowbit compare` calls: allocate() with a method config and a calibration on a loaded bf16 model
    (left as it was) gives a recipe keeping both; export_gguf_budget() writes a file within the budget;
    parse_mix() reads the budgeted names."""
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.mixed import allocate, export_gguf_budget, parse_mix
    from lowbit.models.loader import load_model
    from lowbit.recipe.schema import Calibration, Recipe

    assert parse_mix("gguf:mix@4.9")[0] == "gguf" and parse_mix("mix@4.5")[1].bpw == 4.5  # type: ignore[index]
    assert parse_mix("mix@250MB")[1].max_bytes == 250_000_000 and parse_mix("W4A16") is None  # type: ignore[index]
    ref = load_model(kq_folder, dtype=torch.bfloat16)
    before = {n: p.clone() for n, p in ref.model.named_parameters()}
    cfg, cal = GPTQConfig(damp=0.02), Calibration("c4", samples=2, length=32)
    r = allocate(ref, 5.0, method=cfg, calibration=cal, candidates=["W4", "W4g32", "W8c"])
    assert isinstance(r, Recipe) and r.method == cfg and r.calibration == cal
    assert all(torch.equal(p, before[n]) and p.dtype == torch.bfloat16 for n, p in ref.model.named_parameters())
    rep = export_gguf_budget(kq_folder, tmp_path / "m.gguf", 6.5, samples=2, length=32)
    assert rep.bits_per_weight <= 6.5 and rep.file_type == "MIX"
