"""Architectures: the Qwen3 and Phi-3 tables, and the generic fallback for models no table names
(tiny OLMo-2 and GPT-NeoX), through lowbit's quantizers to an artifact transformers loads."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ALL_ARCHS, make_tiny_model_dir
from lowbit.core.errors import UnsupportedArchitectureError
from lowbit.core.scheme import PRESETS, QuantScheme
from lowbit.formats import compressed_tensors as ct
from lowbit.models.archs import ARCHS, block_linears, get_arch, get_blocks
from lowbit.models.generic import derive_spec
from lowbit.pipeline.awq import AWQMethod
from lowbit.pipeline.gptq import GPTQMethod
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.scaling import can_fold, fold_scales
from lowbit.pipeline.smoothquant import SmoothQuantMethod

SCHEME = QuantScheme(4, 32)  # symmetric: transformers + compressed-tensors loads it compressed (see test_format)
TABLED = ("llama", "qwen2", "gemma3", "mistral", "qwen3", "phi3")
GENERIC = ("olmo2", "gpt_neox")


def _model(tmp_path, arch, **overrides):  # type: ignore[no-untyped-def]
    d = make_tiny_model_dir(tmp_path / arch, arch, **overrides)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _ids(n=1, t=24, seed=0):
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("arch", TABLED)
def test_derived_groups_equal_every_table(tmp_path, arch):
    """The fallback, run on models that do have a table, finds the table's groups in the table's order,
    and the norm that feeds each norm-fed group; it marks every group unfoldable."""
    model = _model(tmp_path, arch)
    table = get_arch(model)
    derived = derive_spec(model, table.name)
    assert derived.derived and not table.derived and derived.blocks == table.blocks
    assert [g.linears for g in derived.groups] == [g.linears for g in table.groups]
    for d, t in zip(derived.groups, table.groups, strict=True):
        assert not d.foldable
        if t.prev not in table.linears:  # a norm: seen producing the group's input
            assert d.prev == t.prev


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_derived_groups_equal_the_tables_of_real_models(name):
    """The fallback's observation on the real offline models finds their tables' groups and norms."""
    from lowbit.models.loader import load_model

    model = load_model(name).model
    table = get_arch(model)
    derived = derive_spec(model, table.name)
    assert (derived.blocks, [g.linears for g in derived.groups]) == (table.blocks, [g.linears for g in table.groups])
    assert [g.prev for g in derived.groups if g.prev] == [g.prev for g in table.groups if g.prev not in table.linears]


@pytest.mark.parametrize("arch", GENERIC)
def test_generic_table_is_derived_once_and_logged(tmp_path, arch, caplog):
    model = _model(tmp_path, arch)
    with caplog.at_level(logging.INFO, logger="lowbit.models.generic"):
        spec = get_arch(model)
        assert get_arch(model) is spec  # cached per model: one probe, one log line
    assert model.config.architectures[0] not in ARCHS and spec.derived
    expect = {
        "olmo2": ("model.layers", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                                   ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]),
        "gpt_neox": ("gpt_neox.layers", [("attention.query_key_value",), ("attention.dense",),
                                         ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)]),
    }[arch]
    assert (spec.blocks, [g.linears for g in spec.groups]) == expect
    # OLMo-2 has no pre-norms (its q/k/v read the block input); GPT-NeoX feeds its two halves by two LayerNorms
    assert [g.prev for g in spec.groups][:3] == (["", "", ""] if arch == "olmo2" else
                                                 ["input_layernorm", "", "post_attention_layernorm"])
    logs = [r.getMessage() for r in caplog.records if "derived a generic one" in r.getMessage()]
    assert len(logs) == 1 and spec.blocks in logs[0] and spec.groups[0].linears[0] in logs[0]


@pytest.mark.parametrize("where, message", [("all", "did not run in a forward"),
                                            ("one", "blocks at 'model.layers' differ")])
def test_fallback_refuses_what_it_cannot_place(tmp_path, where, message):
    """A linear no forward reaches (every block) or blocks that differ (one block): an error naming the
    architecture, the linears and the table entry to add, never a layer silently left in float."""
    model = _model(tmp_path, "olmo2")
    blocks = model.model.layers
    for b in blocks if where == "all" else blocks[1:]:
        b.extra = torch.nn.Linear(64, 64)
    with pytest.raises(UnsupportedArchitectureError, match=message) as e:
        get_arch(model)
    assert "Olmo2ForCausalLM" in str(e.value) and "extra" in str(e.value) and "Add an ArchSpec" in str(e.value)


def test_generic_gptq_equals_table_gptq_bit_for_bit(tmp_path):
    """A Llama renamed to an unknown architecture goes through the fallback: its derived groups are the
    table's, so GPTQ (true-sequential, asymmetric calibration on) gives the same codes, bit for bit,
    though the derived table has no attention replay (the replay is exact, lowbit.pipeline.replay)."""
    tokens = _ids(4, 32, seed=1)
    ref_model, gen_model = _model(tmp_path / "a", "llama"), _model(tmp_path / "b", "llama")
    gen_model.config.architectures = ["UnheardOfForCausalLM"]
    gen_model.__class__ = type("UnheardOfForCausalLM", (type(gen_model),), {})  # no table by class name either
    assert get_arch(gen_model).derived and get_arch(gen_model).attn_out is None
    ref = quantize_model(ref_model, SCHEME, GPTQMethod(SCHEME), tokens=tokens, progress=False)
    got = quantize_model(gen_model, SCHEME, GPTQMethod(SCHEME), tokens=tokens, progress=False)
    assert set(got) == set(ref) and len(ref) == 14
    for k in ref:
        assert torch.equal(got[k].codes, ref[k].codes) and torch.equal(got[k].scales, ref[k].scales), k


@pytest.mark.parametrize("method", ["rtn", "imatrix-rtn", "gptq"])
@pytest.mark.parametrize("arch", ["qwen3", "phi3", *GENERIC])
def test_artifact_loads_in_transformers_with_our_logits(tmp_path, arch, method):
    """Every linear of every block quantized, saved, and loaded back by transformers + compressed-tensors:
    its logits equal those of lowbit's own loader. Both dequantize the same stored codes and scales
    ``(q - z) * s`` in float32 and run the same modules, so they can differ only by a different
    summation order of float32 dot products (a few ulp of ~1e-7 per product over <= 2 blocks): 1e-5 of
    the largest logit bounds that with room. Quantization itself moves the logits by ~1e-1 here."""
    model = _model(tmp_path, arch)
    ids = _ids()
    ref = _logits(model, ids)
    spec = get_arch(model)
    calib = None if method == "rtn" else _ids(4, 32, seed=1)
    qws = quantize_model(model, SCHEME, method, tokens=calib, progress=False)
    blocks = get_blocks(model, spec)
    expected = {f"{spec.blocks}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b, spec, i)}
    every = {n for n, m in blocks.named_modules(prefix=spec.blocks) if isinstance(m, torch.nn.Linear)}
    assert set(qws) == expected == every
    out = ct.save_quantized(model, qws, tmp_path / "out")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head"]  # (GPT-NeoX's head is lm_head in transformers 5, embed_out before)
    ours, _ = ct.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    a, b = _logits(ours, ids), _logits(theirs, ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item()), (a - b).abs().max()
    assert (a - ref).abs().max() > 1e-3  # the weights really are quantized


def test_cli_quantizes_a_model_no_table_names(tmp_path, capsys):
    """``lowbit quantize`` on GPT-NeoX (GPTQ): the fallback's table, an artifact transformers loads."""
    from lowbit.cli import main

    folder = make_tiny_model_dir(tmp_path / "neox", "gpt_neox")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60)))
    out = tmp_path / "q"
    assert main(["--no-progress", "quantize", str(folder), "--scheme", "W4A16", "--group-size", "32", "--method",
                 "gptq", "--calib", str(corpus), "--calib-samples", "4", "--calib-len", "16", "-o", str(out)]) == 0
    assert "8 linears" in capsys.readouterr().out
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.isfinite(_logits(m, _ids())).all()
    # AWQ needs a mapping: refused when the recipe meets the model, before calibration; nothing written
    bad = tmp_path / "awq"
    assert main(["--no-progress", "quantize", str(folder), "--scheme", "W4A16", "--group-size", "32", "--method",
                 "awq", "--calib", str(corpus), "--calib-samples", "4", "--calib-len", "16", "-o", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "AWQ needs a scale mapping for GPTNeoXForCausalLM" in err and "(attention.query_key_value)" in err
    assert not bad.exists()


@pytest.mark.parametrize("scheme", ["NF4", "FP8", "INT8-LLM"])
def test_data_types_quantize_every_linear_of_a_derived_table(tmp_path, scheme):
    """The data-type schemes run through the same engine: on GPT-NeoX every block linear comes back from
    the artifact as a quantized runtime module, and the logits stay near the float model's (NF4 is the
    coarsest: 16 levels, relative error measured 0.13)."""
    from lowbit.core.presets import lookup_scheme
    from lowbit.jobs import load_artifact, quantize
    from lowbit.pipeline.engine import Engine
    from lowbit.recipe import Calibration, Recipe

    folder = make_tiny_model_dir(tmp_path / "neox", "gpt_neox")
    ids = _ids()
    ref = _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60)))
    recipe = Recipe(lookup_scheme(scheme), calibration=Calibration(str(corpus), 4, 16))
    art = quantize(str(folder), recipe, tmp_path / "q", engine=Engine(progress=False)).path
    model = load_artifact(art)
    lins = [n for n, m in model.named_modules() if n.startswith("gpt_neox.layers.") and hasattr(m, "in_features")]
    assert len(lins) == 8 and not any(type(model.get_submodule(n)) is torch.nn.Linear for n in lins)
    out = _logits(model, ids)
    assert (out - ref).norm() / ref.norm() < 0.3


@pytest.mark.parametrize("make", [lambda: AWQMethod(SCHEME), lambda: SmoothQuantMethod(PRESETS["W8A8"], alpha=0.5)],
                         ids=["awq", "smoothquant"])
@pytest.mark.parametrize("arch", GENERIC)
def test_scale_folding_methods_refuse_a_derived_table(tmp_path, arch, make):
    """AWQ and SmoothQuant need the module feeding each group: on a derived table they stop before
    changing any weight, naming the architecture, what was derived and the entry to add."""
    model = _model(tmp_path, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = make()
    scheme = getattr(method, "scheme", None)
    with pytest.raises(UnsupportedArchitectureError) as e:
        quantize_model(model, scheme, method, tokens=_ids(2, 16), progress=False)
    msg = str(e.value)
    assert model.config.architectures[0] in msg and "needs a scale mapping" in msg
    assert "ArchSpec(" in msg and "LinearGroup(prev, linears)" in msg and "--method rtn" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_smoothquant_without_smoothing_needs_no_mapping(tmp_path):
    """Plain W8A8 (alpha None) folds nothing: a derived table is enough."""
    model = _model(tmp_path, "gpt_neox")
    qws = quantize_model(model, None, SmoothQuantMethod(PRESETS["W8A8"], alpha=None), progress=False)
    assert len(qws) == 8


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_phi3_folds_the_up_half_of_gate_up_and_never_o_proj(tmp_path, kv_heads):
    """Phi-3's fused linears: scales on down_proj's input fold into the up rows of gate_up_proj (part 1 of 2)
    and the float model's logits stay put (relative 1e-5: float32 rounding of the rescaled weights);
    o_proj's group, reading the v part of qkv_proj, is never folded, with grouped-query attention or without."""
    model = _model(tmp_path, "phi3", num_key_value_heads=kv_heads)
    ids = _ids(2, 24)
    ref = _logits(model, ids)
    spec, g, folded = get_arch(model), torch.Generator().manual_seed(1), []
    for block in get_blocks(model, spec):
        for group in spec.groups:
            if can_fold(block, group):
                k = block.get_submodule(group.linears[0]).in_features
                before = block.mlp.gate_up_proj.weight.detach().clone()
                fold_scales(block, spec, group, torch.rand(k, generator=g) * 4 + 0.1)
                folded.append(group.linears[0])
                if group.linears == ("mlp.down_proj",):  # the gate rows untouched, every up row divided
                    after = block.mlp.gate_up_proj.weight.detach()
                    assert torch.equal(after[:128], before[:128]) and not (after[128:] == before[128:]).all(1).any()
    assert folded == ["self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"] * 2
    out = _logits(model, ids)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def _outliers(tmp_path, arch):  # type: ignore[no-untyped-def]
    """Three 25x channels in both norms of every block: LLM-like outliers in the inputs of q/k/v (qkv_proj)
    and gate/up (gate_up_proj), as test_awq plants them in a Llama."""
    model = _model(tmp_path, arch)
    with torch.no_grad():
        for block in get_blocks(model, get_arch(model)):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                block.get_submodule(norm).weight[[3, 17, 40]] *= 25
    return model


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_awq_beats_rtn_on_the_new_tables(tmp_path, arch):
    """With planted outlier channels, AWQ (then RTN) lands below 0.8x RTN's mean squared logit error (the
    bar test_awq sets for Llama): the scales fold into Qwen3's norms and Phi-3's fused linears."""
    ids, calib = _ids(8, 32, seed=1), _ids(16, 32)
    ref = _logits(_outliers(tmp_path / "f", arch), ids)
    err = {}
    for name, m in (("rtn", "rtn"), ("awq", AWQMethod(SCHEME))):
        model = _outliers(tmp_path / name, arch)
        qws = quantize_model(model, SCHEME, m, tokens=calib, progress=False)
        assert len(qws) == 2 * len(get_arch(model).linears)
        err[name] = float(((_logits(model, ids) - ref) ** 2).mean())
    assert err["awq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_smoothquant_smooths_the_new_tables_exactly(tmp_path, arch):
    """SmoothQuant's smoothing alone (int8 weights left out) on every block: the float logits stay put
    (relative 1e-5, float32 rounding of the rescaled weights); the groups smoothed are the norm-fed ones
    and, for Phi-3, down_proj through the up rows of gate_up_proj (never o_proj: v part of qkv_proj)."""
    from lowbit.pipeline.blockwise import BlockContext, capture_inputs

    model = _outliers(tmp_path, arch)
    ids = _ids(2, 24)
    ref = _logits(model, ids)
    method, spec = SmoothQuantMethod(PRESETS["W8A8"], alpha=0.5, scale_dtype=torch.float32), get_arch(model)
    hidden, kwargs = capture_inputs(model, _ids(4, 32, seed=1), spec, torch.device("cpu"))
    for i, block in enumerate(get_blocks(model, spec)):
        ctx = BlockContext(i, block, block_linears(block, spec, i), spec, torch.device("cpu"), hidden, kwargs[i])
        method.smooth(ctx)
        ctx.run(keep_outputs=True)
        hidden = ctx.outputs
    out = _logits(model, ids)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    # qwen3: v -> o is not smoothed here because of grouped-query attention (4 heads, 2 kv heads)
    expect = {"qwen3": ["input_layernorm", "mlp.up_proj", "post_attention_layernorm"],
              "phi3": ["input_layernorm", "mlp.gate_up_proj", "post_attention_layernorm"]}[arch]
    assert sorted(k.split(".", 3)[-1] for k in method.smooth_scales if ".0." in k) == expect


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_gptq_residual_scope_aims_only_norm_fed_groups(tmp_path, arch):
    """GPTAQ's ``residual`` scope aims the groups a norm feeds; a derived group fed by no module of the
    block (OLMo-2 reads the block input) is not one, and a table with none says so."""
    from lowbit.core.errors import SchemeError
    from lowbit.methods.gptq import GPTQConfig

    spec = get_arch(_model(tmp_path, arch))
    method = GPTQMethod(SCHEME, GPTQConfig(asym_alpha=0.5, asym_scope="residual"))
    if arch == "olmo2":
        with pytest.raises(SchemeError, match="leaves no group"):
            method.plan(spec)
        return
    stages, _ = method.plan(spec)
    aimed = [g for st in stages for g in st.groups if g[0] in st.asym]
    assert aimed == [spec.groups[0].linears, spec.groups[2].linears]
