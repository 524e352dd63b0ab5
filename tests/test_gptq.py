import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core.errors import SchemeError
from lowbit.core.scheme import QuantScheme
from lowbit.formats import compressed_tensors as ct
from lowbit.methods.gptq import GPTQConfig, HessianConsumed, gptq_quantize
from lowbit.methods.rtn import quantize_rtn
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.hessian import HessianObserver
from lowbit.pipeline.quantize import quantize_model


def _layer(out=64, inp=128, n=1024, seed=0):
    """A weight and correlated inputs with a few outlier channels (as in real LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix
    x[:, :4] *= 8
    return w, x


def _hessian(x):
    obs = HessianObserver(x.shape[1], "cpu")
    for chunk in x.split(100):
        obs.update(chunk)
    return obs.H


def _out_err(w, qw, x):
    return float((x @ (qw.dequantize() - w).T).pow(2).mean())


def test_hessian_observer_is_2_xtx_over_n():
    _, x = _layer()
    assert torch.allclose(_hessian(x), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [16, 40, 128, 1000])
def test_hessian_row_panels_give_the_full_symmetric_product(rows):
    """Summing only the lower block triangle (row panels) and mirroring it when ``H`` is read gives
    the full ``2/n X^T X`` (uneven panel sizes too), with ``D`` beside it untouched by the panels."""
    _, x = _layer()
    xf = x + 0.1 * torch.randn_like(x)
    full, panel = HessianObserver(128, "cpu", cross=True), HessianObserver(128, "cpu", cross=True, panel_rows=rows)
    for a, b in zip(x.split(100), xf.split(100), strict=True):
        full.update(a, b)
        panel.update(a, b)
    assert panel._panels is not None and len(panel._panels) == max(1, 128 // rows)
    assert torch.allclose(panel.H, full.H, rtol=1e-5, atol=1e-5)
    assert torch.equal(panel.H, panel.H.T)
    assert torch.equal(panel.D, full.D)


@pytest.mark.gpu  # the fused bf16 path runs on CUDA only (bench/gpu_tests.py); the panels are covered on the CPU above
def test_fused_hessian_panels_on_cuda():
    """A 4096-wide input on the fused path is summed in 2048-row panels: symmetric, as close to the
    full product as its fp32 sums allow (bit-identical on an H200 in bench/hessian_panels.py), and
    near fp64."""
    torch.manual_seed(0)
    obs, full = HessianObserver(4096, "cuda"), HessianObserver(4096, "cuda", panel_rows=4096)
    ref = torch.zeros(4096, 4096, dtype=torch.float64, device="cuda")
    for _ in range(3):
        x = (torch.randn(1024, 4096, device="cuda") * torch.rand(4096, device="cuda")).bfloat16()
        obs.update(x)
        full.update(x)
        ref += x.double().T @ x.double()
    assert obs._panels == [(0, 2048), (2048, 4096)] and full._panels == [(0, 4096)]
    H = obs.H
    ref *= 2 / obs.n
    assert torch.equal(H, H.T)
    vs_full = float((H - full.H).norm() / full.H.norm())
    vs_fp64 = float((H.double() - ref).norm() / ref.norm())
    assert vs_full < 1e-6, vs_full
    assert vs_fp64 < 1e-4, (vs_fp64, float((full.H.double() - ref).norm() / ref.norm()))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [32, None])
def test_gptq_beats_rtn_on_layer_output(bits, gs):
    w, x = _layer(seed=bits)
    s = QuantScheme(bits, gs, False)
    qw, st = gptq_quantize(w, _hessian(x), s)
    assert st.loss > 0 and st.dead_columns == 0
    assert _out_err(w, qw, x) < 0.8 * _out_err(w, quantize_rtn(w, s), x)


@pytest.mark.parametrize("static", [True, False])
def test_act_order(static):
    """The outlier channels (64x the others' H_jj) placed last: in natural order they are quantized last,
    when no column is left to absorb their 64x-weighted rounding errors; act-order quantizes them
    first. Plain GPTQ's output error is dominated by them: act-order removes most of it (measured 0.31-0.42
    of plain over 8 seeds, both group modes), so 0.6 can only fail if the ordering is lost."""
    w, x = _layer(seed=7)
    x = x.flip(1)
    s = QuantScheme(3, 32, True)
    H = _hessian(x)
    plain, _ = gptq_quantize(w, H, s, GPTQConfig(act_order=False))
    ordered, _ = gptq_quantize(w, H, s, GPTQConfig(act_order=True, static_groups=static))
    assert _out_err(w, ordered, x) < 0.6 * _out_err(w, plain, x)
    if static:
        assert ordered.g_idx is None
    else:  # every group still has exactly group_size columns, spread over the input dimension
        assert ordered.g_idx is not None and torch.bincount(ordered.g_idx).tolist() == [32] * 4
        assert not torch.equal(ordered.g_idx.long(), torch.arange(128) // 32)


def test_dead_columns_are_zeroed():
    w, x = _layer()
    x[:, 5] = 0
    qw, st = gptq_quantize(w, _hessian(x), QuantScheme(4, 32, False))
    assert st.dead_columns == 1 and bool((qw.dequantize()[:, 5] == 0).all())


def test_cholesky_failure_raises_damp_and_succeeds(caplog):
    w, x = _layer()
    H = _hessian(x)
    evals, evecs = torch.linalg.eigh(H)
    evals[0] = -0.5 * float(torch.diag(H).mean())  # indefinite: damp 0.01 and 0.1 of mean diag fail
    bad = evecs @ torch.diag(evals) @ evecs.T
    qw, st = gptq_quantize(w, bad, QuantScheme(4, 32), name="bad.layer")
    assert st.damp == pytest.approx(1.0)
    assert "bad.layer" in caplog.text and "succeeded with damp" in caplog.text
    with pytest.raises(SchemeError, match="singular"):
        gptq_quantize(w, bad, QuantScheme(4, 32), GPTQConfig(max_damp_tries=2))


def test_consumed_hessian_same_result_and_retry_signal():
    w, x = _layer()
    H = _hessian(x)
    ref, _ = gptq_quantize(w, H, QuantScheme(4, 32))
    Hc = H.clone()
    got, _ = gptq_quantize(w, Hc, QuantScheme(4, 32), consume_hessian=True)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)
    assert not torch.equal(Hc, H)  # factorised in place: no second in x in buffer
    evals, evecs = torch.linalg.eigh(H)
    evals[0] = -0.5 * float(torch.diag(H).mean())
    bad = evecs @ torch.diag(evals) @ evecs.T
    with pytest.raises(HessianConsumed):
        gptq_quantize(w, bad.clone(), QuantScheme(4, 32), consume_hessian=True)


@pytest.mark.parametrize("asym", [0.0, 0.5])
def test_pipeline_collects_again_when_a_consumed_factorisation_fails(tmp_path, monkeypatch, asym):
    """Also with asymmetric calibration (GPTAQ): the retry keeps aiming at the float output."""
    import lowbit.pipeline.gptq as pg

    d = make_tiny_model_dir(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    real, calls = pg.gptq_quantize, []

    def flaky(W, H, *a, consume_hessian=False, **k):
        calls.append(consume_hessian)
        assert (k.get("wd") is not None) == (asym > 0)
        if len(calls) == 1:
            assert consume_hessian
            H.fill_(float("nan"))  # what a failed in-place factorisation leaves behind
            W.fill_(float("nan"))  # the consumed working copy too: the retry must rebuild it
            raise HessianConsumed("failed")
        return real(W, H, *a, consume_hessian=consume_hessian, **k)

    monkeypatch.setattr(pg, "gptq_quantize", flaky)
    method = GPTQMethod(QuantScheme(4, 32), GPTQConfig(asym_alpha=asym, asym_scope="all"), scale_dtype=torch.float32)
    qws = quantize_model(model, QuantScheme(4, 32), method, tokens=ids, progress=False)
    assert calls[:3] == [True, False, True] and len(qws) == 14
    assert all(torch.isfinite(q.scales).all() for q in qws.values())
    assert all(torch.isfinite(lin.weight).all() for lin in model.modules() if isinstance(lin, torch.nn.Linear))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # device-to-host copies
def test_group_results_own_their_host_storage(tmp_path, device):
    """q/k/v (and gate/up) are solved stacked; each linear's result must be a tensor of its own
    (safetensors refuses shared storage), on the host (on CUDA: copied from the device) and equal
    to the weights written back into the layer."""
    d = make_tiny_model_dir(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    qws = quantize_model(model, QuantScheme(4, 32), GPTQMethod(QuantScheme(4, 32)), tokens=ids, progress=False,
                         device=device, offload_activations=device == "cuda")
    ptrs = [t.untyped_storage().data_ptr() for q in qws.values() for t in (q.codes, q.scales, q.zeros)]
    assert len(set(ptrs)) == len(ptrs)
    for name, q in qws.items():
        w = model.get_submodule(name).weight
        assert q.codes.device.type == "cpu" and q.codes.is_contiguous()
        torch.testing.assert_close(q.dequantize(w.dtype), w.detach())


def test_true_sequential_pipeline_on_tiny_model(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m", "qwen2")
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    errs = {}
    for name in ("rtn", "gptq"):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        method = GPTQMethod(QuantScheme(3, 32), scale_dtype=torch.float32) if name == "gptq" else "rtn"
        quantize_model(m, QuantScheme(3, 32), method, tokens=ids, progress=False, scale_dtype=torch.float32)
        with torch.inference_mode():
            errs[name] = float((m(ids).logits - ref(ids).logits).pow(2).mean())
        if name == "gptq":
            assert len(method.stats) == 14  # type: ignore[union-attr]
    assert errs["gptq"] < errs["rtn"]


def test_act_order_g_idx_round_trips_through_the_format(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    method = GPTQMethod(QuantScheme(4, 32), GPTQConfig(act_order=True, static_groups=False),
                        scale_dtype=torch.float32)
    qws = quantize_model(model, QuantScheme(4, 32), method, tokens=ids, progress=False)
    assert all(q.g_idx is not None for q in qws.values())
    out = ct.save_quantized(model, qws, tmp_path / "out", dtype=torch.float32)
    import json
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["actorder"] == "group"
    loaded, _ = ct.load_quantized(out)
    for n, qw in qws.items():
        back = loaded.get_submodule(n).qweight()
        assert back.g_idx is not None and torch.equal(back.g_idx, qw.g_idx) and torch.equal(back.codes, qw.codes)
    with torch.inference_mode():
        assert torch.allclose(loaded(ids[:1]).logits, model(ids[:1]).logits, atol=1e-5)


def test_memory_estimate_and_refusal(tmp_path, monkeypatch):
    from lowbit.core.errors import LowbitError
    from lowbit.jobs import quantize
    from lowbit.models.archs import block_linears, get_arch, get_blocks
    from lowbit.pipeline import estimate
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe import Calibration, Recipe

    d = make_tiny_model_dir(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    method = GPTQMethod(QuantScheme(4, 32), GPTQConfig(asym_alpha=0.0))
    est = estimate.estimate_run(model, get_arch(model), method, 8, 64, torch.device("cpu"), rate=1e9)
    assert est.parts["hessians"] == 128 * 128 * 4  # the largest stage: down_proj's input, in = 128
    # block inputs, outputs, and o_proj's inputs kept for the attention's replay
    assert est.parts["activations"] == 3 * 8 * 64 * 64 * 4 and est.seconds > 0
    no_replay = GPTQMethod(QuantScheme(4, 32), GPTQConfig(asym_alpha=0.0), replay_attention=False)
    off = estimate.estimate_run(model, get_arch(model), no_replay, 8, 64, torch.device("cpu"), 1e9)
    assert off.parts["activations"] == 2 * 8 * 64 * 64 * 4
    # GPTAQ: D beside H, the float model's activations, a float copy of the block, two runs per stage
    aq = estimate.estimate_run(model, get_arch(model), GPTQMethod(QuantScheme(4, 32), GPTQConfig(asym_scope="all")),
                               8, 64, torch.device("cpu"), rate=1e9)
    lins = block_linears(get_blocks(model, get_arch(model))[0], get_arch(model))

    def nbytes(*names: str) -> int:
        return sum(lins[n].weight.numel() * lins[n].weight.element_size() for n in names)

    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    assert aq.parts["hessians"] == 2 * est.parts["hessians"] and aq.parts["activations"] == 2 * est.parts[
        "activations"] and aq.seconds > est.seconds
    # float copies of what is quantized before the last paired stage: all but down_proj
    assert aq.parts["float weights"] == nbytes(*attn, "mlp.gate_proj", "mlp.up_proj")
    # all but down_proj: its stage holds H alone, as plain GPTQ's does; the copies shrink to the attention
    sk = estimate.estimate_run(model, get_arch(model), GPTQMethod(QuantScheme(4, 32), GPTQConfig(
        asym_scope="skip-last")), 8, 64, torch.device("cpu"), rate=1e9)
    assert sk.parts["hessians"] == est.parts["hessians"] and sk.parts["float weights"] == nbytes(*attn)
    assert est.seconds < sk.seconds < aq.seconds
    # awq+gptq: GPTQ inside AWQ holds the same statistics
    from lowbit.pipeline.awq import AWQMethod

    both = estimate.estimate_run(model, get_arch(model), AWQMethod(QuantScheme(4, 32), inner=GPTQMethod(
        QuantScheme(4, 32), GPTQConfig(asym_scope="skip-last"))), 8, 64, torch.device("cpu"), rate=1e9)
    search = both.parts.pop("AWQ search")  # AWQ's scale search holds its token sample beside GPTQ's statistics
    assert both.parts == sk.parts
    assert search == 8 * 64 * (2 * 64 + 128) * 4 + 8 * 64 * 64 * 4  # 512 tokens < max_tokens: all of them
    assert both.cpu_bytes > sk.cpu_bytes
    from lowbit.models.archs import get_blocks

    blocks = get_blocks(model, get_arch(model))  # the search scores 20 alphas + the identity + the reference
    params = sum(p.numel() for p in blocks[0].parameters())
    assert both.seconds == pytest.approx(sk.seconds + len(blocks) * 22 * (2 * params * 512 + 4 * 512 * 64 * 64) / 1e9)
    seq = GPTQMethod(QuantScheme(4, 32), GPTQConfig(asym_alpha=0.0), true_sequential=False)
    assert estimate.estimate_run(model, get_arch(model), seq, 8, 64, torch.device("cpu"), 1e9).parts[
        "hessians"] == (3 * 64 * 64 + 128 * 128) * 4
    monkeypatch.setattr(estimate, "available_bytes", lambda device: 2**16)
    out = tmp_path / "q"
    with pytest.raises(LowbitError, match=r"cpu cannot hold one block of this run.*--hessians-on-cpu"):
        quantize(str(d), Recipe(QuantScheme(4, 32), GPTQConfig(), Calibration("python-docs", 8, 64)), out,
                 engine=Engine(progress=False))
    assert not out.exists()


def test_act_order_static_artifact_loads_in_transformers(tmp_path):
    """Default GPTQ (act-order, static groups) exports the plain group layout, actorder "weight":
    transformers + compressed-tensors load it and agree with our loader."""
    pytest.importorskip("compressed_tensors")
    import json

    from lowbit.jobs import quantize
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe import Calibration, Recipe

    d = make_tiny_model_dir(tmp_path / "m", "qwen2")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i} of a small calibration corpus for gptq" for i in range(200)))
    res = quantize(str(d), Recipe(QuantScheme(4, 32), GPTQConfig(), Calibration(str(corpus), 8, 32)),
                   tmp_path / "out", engine=Engine(progress=False))
    cfg = json.loads((res.path / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    record = json.loads((res.path / "provenance.json").read_text())
    assert res.recipe.method.act_order and len(record["methods"]["gptq"]["gptq"]["layer_loss"]) == 14
    ours, _ = ct.load_quantized(res.path)
    theirs = AutoModelForCausalLM.from_pretrained(res.path, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_hessian_weighted_clipping_search_helps():
    w, x = _layer(seed=11)
    H = _hessian(x)
    s = QuantScheme(3, 32, True)
    plain, _ = gptq_quantize(w, H, s, GPTQConfig(search=False))
    searched, _ = gptq_quantize(w, H, s, GPTQConfig(search=True))
    assert _out_err(w, searched, x) < _out_err(w, plain, x)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scale_refit_lowers_layer_output_error(bits):
    w, x = _layer(out=96, inp=256, n=2048, seed=10 + bits)
    H = _hessian(x)
    s = QuantScheme(bits, 64, bits == 4)
    plain, _ = gptq_quantize(w, H, s, scale_dtype=torch.bfloat16)
    refit, _ = gptq_quantize(w, H, s, GPTQConfig(refit=True), scale_dtype=torch.bfloat16)
    assert torch.equal(refit.codes, plain.codes)  # only the scales move
    assert refit.scales.dtype == torch.bfloat16 and not torch.equal(refit.scales, plain.scales)
    assert _out_err(w, refit, x) < 0.995 * _out_err(w, plain, x)


def test_observer_keeps_the_largest_norm_tokens():
    g = torch.Generator().manual_seed(3)
    obs = HessianObserver(16, "cpu", keep_top=3)
    seen = []
    for b, scale in enumerate([5.0, 9.0, 7.0, 6.0]):
        x = torch.randn(2, 10, 16, generator=g)
        x[b % 2, b] *= scale  # one planted large token per batch
        obs.update(x)
        seen.append(x.reshape(-1, 16))
    rows = torch.cat(seen)
    want = rows[rows.norm(dim=1).topk(3).indices]
    assert obs.top.shape == (3, 16) and obs.n == 80
    torch.testing.assert_close(obs.top, want, rtol=0, atol=0)  # the planted 9, 7, 6 tokens, in order
    assert not any(torch.equal(r, seen[0][0 * 10 + 0]) for r in obs.top)  # the planted 5 is out


def test_search_guard_keeps_the_search_only_where_the_top_tokens_do_not_lose(tmp_path):
    """The guard solves each group plain and with the search, and keeps the search iff the worst
    error on the largest-norm tokens does not grow: the first group of block 0 (same inputs in
    every run) must come out bit-equal to the plain or the searched run, as its flag says."""
    d = make_tiny_model_dir(tmp_path / "m", "qwen2")
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(5))
    s = QuantScheme(3, 32)
    runs = {}
    for tag, cfg in {"plain": GPTQConfig(), "search": GPTQConfig(search=True),
                     "guard": GPTQConfig(search=True, search_guard=8)}.items():
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        method = GPTQMethod(s, cfg, scale_dtype=torch.float32)
        runs[tag] = (quantize_model(m, s, method, tokens=ids, progress=False, scale_dtype=torch.float32),
                     method.stats)
    qws, stats = runs["guard"]
    flags = [st.searched for st in stats.values()]
    assert all(f is not None for f in flags) and len(flags) == 14
    q = "model.layers.0.self_attn.q_proj"
    first = stats[next(k for k in stats if k.endswith(".0.self_attn.q_proj"))].searched
    assert torch.equal(qws[q].codes, runs["search" if first else "plain"][0][q].codes)
    assert all(st.searched is None for st in runs["search"][1].values())
    with pytest.raises(SchemeError, match="search guard"):
        GPTQConfig(search=True, search_guard=-1)
    with pytest.raises(SchemeError, match="turn it on"):  # a guard without the search would do nothing
        GPTQConfig(search_guard=8)
    with pytest.raises(SchemeError, match="turn it on"):
        GPTQConfig(search_power=0.5)


def test_timeline_marks_each_stage_and_solve_without_synchronising(tmp_path, monkeypatch):
    """GPTQMethod(timeline=...) marks each stage's forward, each group's solve and the engine's rest
    of the block; the totals add up to the time between the first mark and the last."""
    import time

    import lowbit.pipeline.gptq as pg
    from lowbit.pipeline.blockwise import run_blockwise
    from lowbit.pipeline.hessian import Timeline

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / "m", "llama"), dtype=torch.float32)
    tl = Timeline(torch.device("cpu"))
    ids = torch.randint(3, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    real, pause, solves = pg.gptq_quantize, 0.1, []

    def slow(*a, **k):  # a known cost inside every solve: the timeline must book it to the solves
        solves.append(1)
        time.sleep(pause)
        return real(*a, **k)

    monkeypatch.setattr(pg, "gptq_quantize", slow)
    run_blockwise(model, GPTQMethod(QuantScheme(4, 32), timeline=tl), ids, progress=False)
    tl.mark("end")
    tot = tl.totals()
    assert list(tot) == ["forward q_proj (paired)", "solve q_proj+k_proj+v_proj", "forward o_proj (paired)",
                         "solve o_proj", "forward gate_proj (paired)", "solve gate_proj+up_proj", "forward down_proj",
                         "solve down_proj", "output pass, moves (engine)"]
    labels = [m[0] for m in tl.marks]
    assert labels.count("forward q_proj (paired)") == model.config.num_hidden_layers
    first, last = tl.marks[0][1], tl.marks[-1][1]
    assert isinstance(first, float) and isinstance(last, float)
    assert sum(tot.values()) == pytest.approx(last - first) and all(v >= 0 for v in tot.values())
    booked = sum(v for k, v in tot.items() if k.startswith("solve"))
    assert booked >= len(solves) * pause and len(solves) >= 4 * model.config.num_hidden_layers
    # every group's solve label holds its own sleeps (one solve per block at least): were they booked
    # to a forward, the solve labels would hold milliseconds
    assert all(v >= model.config.num_hidden_layers * pause for k, v in tot.items() if k.startswith("solve"))
    blocks = tl.per_block()  # one dict per block, every phase in each, summing to the totals
    assert len(blocks) == model.config.num_hidden_layers and all(list(b) == list(tot) for b in blocks)
    assert all(sum(b[k] for b in blocks) == pytest.approx(v) for k, v in tot.items())
