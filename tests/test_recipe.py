"""Recipes: round trips, validation with key paths, llm-compressor recipes, replay, per-layer overrides."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.cli import main
from lowbit.core.errors import RecipeError
from lowbit.core.presets import lookup_scheme
from lowbit.core.scheme import QuantScheme
from lowbit.formats.registry import load_artifact
from lowbit.methods.rtn import quantize_rtn
from lowbit.recipe import (
    AWQConfig,
    Calibration,
    Export,
    GPTQConfig,
    ImatrixConfig,
    Override,
    Recipe,
    RTNConfig,
    SmoothQuantConfig,
)

W4, W8 = lookup_scheme("W4A16").with_options(group_size=32), lookup_scheme("W8A16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "c.txt"
    p.write_text("\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    return p


RECIPES = [
    Recipe(W4),
    Recipe(W4, GPTQConfig(damp=0.05, act_order=False), Calibration("c4", 64, 1024, 3), Export("compressed-tensors",
                                                                                             "float16"),
           ignore=("lm_head",), overrides=(Override(("re:.*down_proj",), scheme=W8),
                                           Override(("model.layers.0.self_attn.q_proj",), keep=True))),
    Recipe(W4, AWQConfig(inner=GPTQConfig(asym_alpha=0.0), clip=True)),
    Recipe(lookup_scheme("NF4").with_options(double_quant=True)),
    Recipe(lookup_scheme("W8A8"), SmoothQuantConfig(alpha=0.7, inner=GPTQConfig())),
    Recipe(W4, ImatrixConfig(propagate=True), overrides=(Override(("re:.*mlp.*",), method=RTNConfig(search=True)),)),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=range(len(RECIPES)))
def test_round_trip_yaml_and_json(tmp_path: Path, recipe: Recipe) -> None:
    for name in ("r.yaml", "r.json"):
        recipe.save(tmp_path / name)
        assert Recipe.from_file(tmp_path / name) == recipe
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert json.loads(json.dumps(recipe.to_dict())) == recipe.to_dict()  # plain data only


@pytest.mark.parametrize(("data", "message"), [
    ({"scheme": "W4A16", "method": {"name": "gptq", "dampp": 0.1}}, "recipe.method.dampp: unknown key"),
    ({"scheme": "W4A16", "method": {"name": "gptq", "damp": 2.0}}, "recipe.method: GPTQ damp must be in"),
    ({"scheme": "W4A16", "method": {"name": "gptq", "damp": "x"}}, "recipe.method.damp: expected float"),
    ({"scheme": "W5A16"}, "recipe.scheme: unknown scheme 'W5A16'; known schemes: .*NF4.*FP8"),
    ({"scheme": "W4A16", "calibration": {"samples": 0}}, "recipe.calibration: samples must be >= 1"),
    ({"scheme": "W4A16", "export": {"format": "gguf"}}, "recipe.export: format must be one of"),
    ({"scheme": "W4A16", "overrides": [{"targets": ["x"]}]}, r"recipe.overrides\[0\]: an override gives"),
    ({"scheme": "W4A16", "overrides": [{"targets": "x", "keep": True, "scheme": "W8A16"}]}, "keep: true leaves"),
    ({"scheme": "W4A16", "method": "nope"}, "recipe.method.name: unknown method 'nope'"),
    ({"scheme": "W4A16", "extra": 1}, "recipe.extra: unknown key"),
    ({"method": "gptq"}, "no 'scheme' key"),
    ({"scheme": "W4A16", "version": 99}, "newer than this lowbit"),
    ({"scheme": {"bits": 4, "group_size": 128, "colour": "red"}}, "recipe.scheme: unknown scheme fields"),
])
def test_invalid_recipes_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("scheme: W4A16\nmethod: [gptq\n")
    with pytest.raises(RecipeError, match=r"r.yaml: line \d+"):
        Recipe.from_file(f)


LLMC = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: ["lm_head"]
      dampening_frac: 0.02
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: "int", symmetric: true, strategy: "group", group_size: 32, actorder: "static"}
        group_1:
          targets: ["re:.*down_proj"]
          weights: {num_bits: 8, type: "int", symmetric: true, strategy: "channel"}
"""


def test_llmcompressor_gptq_recipe_translates() -> None:
    from lowbit.recipe.llmc import llmcompressor_to_dict

    r = Recipe.from_dict(llmcompressor_to_dict(yaml.safe_load(LLMC)))
    assert r.scheme == QuantScheme(4, 32, True) and r.ignore == ("lm_head",)
    assert isinstance(r.method, GPTQConfig) and r.method.damp == 0.02 and r.method.act_order and r.method.static_groups
    assert r.overrides == (Override(("re:.*down_proj",), scheme=QuantScheme(8, None, True)),)


@pytest.mark.parametrize(("text", "message"), [
    ("q:\n  GPTQModifier:\n    scheme: W4A16\n    bogus_field: 1\n", r"q.GPTQModifier.bogus_field: lowbit cannot"),
    ("q:\n  SparseGPTModifier:\n    sparsity: 0.5\n", "cannot honour SparseGPTModifier"),
    ("q:\n  GPTQModifier:\n    scheme: W4A16\n    kv_cache_scheme: {num_bits: 8}\n", "kv_cache_scheme: KV-cache"),
    ("q:\n  AWQModifier:\n    scheme: W4A16_ASYM\n    mappings: [[a, b]]\n", "mappings: lowbit takes"),
    ("q:\n  QuantizationModifier:\n    config_groups:\n      g: {targets: [Linear], weights: {num_bits: 4, "
     "type: int, strategy: tensor}}\n", "per group or per channel"),
])
def test_llmcompressor_fields_lowbit_cannot_honour_are_named(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=message):
        Recipe.from_file(f)


def test_llmcompressor_smoothquant_gptq_w8a8() -> None:
    from lowbit.recipe.llmc import llmcompressor_to_dict

    text = ("s:\n  m:\n    SmoothQuantModifier: {smoothing_strength: 0.8}\n"
            "    GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}\n")
    r = Recipe.from_dict(llmcompressor_to_dict(yaml.safe_load(text)))
    assert r.scheme == lookup_scheme("W8A8") and isinstance(r.method, SmoothQuantConfig)
    assert r.method.alpha == 0.8 and isinstance(r.method.inner, GPTQConfig)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_llmcompressor_recipe_quantizes_and_transformers_loads(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    """The issue's done-when: an llm-compressor GPTQ recipe with ignore lm_head and an 8-bit down_proj group
    quantizes a model into a mixed artifact that transformers loads with lowbit's logits."""
    f = tmp_path / "llmc.yaml"
    f.write_text(LLMC)
    out = tmp_path / "q"
    assert main(["--no-progress", "quantize", str(tiny), "--recipe", str(f), "--calib", str(corpus),
                 "--calib-samples", "4", "--calib-len", "32", "-o", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert set(groups) == {4, 8} and qc["ignore"] == ["lm_head"]
    assert groups[8]["weights"]["strategy"] == "channel" and groups[4]["weights"]["group_size"] == 32
    ours = load_artifact(out)
    down = ours.get_submodule("model.layers.1.mlp.down_proj").qweight()
    q_proj = ours.get_submodule("model.layers.1.self_attn.q_proj").qweight()
    assert down.scheme.bits == 8 and down.scheme.group_size is None and q_proj.scheme.bits == 4
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    a, b = _logits(ours, ids), _logits(theirs, ids)
    # both dequantize the same codes and scales in float32 and run the same float32 graph
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    stored = Recipe.from_file(out / "recipe.yaml")
    assert stored.calibration == Calibration(str(corpus), 4, 32, 0) and stored.method.damp == 0.02


def test_replay_is_byte_identical(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    """``lowbit quantize MODEL --recipe OUT/recipe.yaml -o OUT2`` writes the same weight bytes."""
    first, again = tmp_path / "a", tmp_path / "b"
    assert main(["--no-progress", "quantize", str(tiny), "--scheme", "W4A16_ASYM", "--group-size", "32",
                 "--method", "gptq", "--calib", str(corpus), "--calib-samples", "4", "--calib-len", "32",
                 "--override", "re:.*o_proj=W8A16", "--ignore", "model.layers.0.mlp.down_proj", "-o", str(first)]) == 0
    assert main(["--no-progress", "quantize", str(tiny), "--recipe", str(first / "recipe.yaml"), "-o", str(again)]) == 0
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (first / "recipe.yaml").read_text() == (again / "recipe.yaml").read_text()
    qc = json.loads((first / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    rec = json.loads((first / "provenance.json").read_text())
    assert rec["source"]["sha256"] and rec["source"]["model"] == "m" and "quantize_seconds" in rec


def test_flags_change_a_recipe_and_say_so(tmp_path: Path, tiny: Path, corpus: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    r = Recipe(W4, GPTQConfig(), Calibration(str(corpus), 4, 32))
    r.save(tmp_path / "r.yaml")
    with caplog.at_level(logging.INFO):
        assert main(["--no-progress", "quantize", str(tiny), "--recipe", str(tmp_path / "r.yaml"), "--damp", "0.1",
                     "--calib-samples", "2", "-o", str(tmp_path / "q")]) == 0
    stored = Recipe.from_file(tmp_path / "q" / "recipe.yaml")
    assert stored.method.damp == 0.1 and stored.calibration.samples == 2 and stored.method.asym_alpha == 0.5
    said = caplog.text
    assert "method.damp: 0.01 -> 0.1" in said and "calibration.samples: 4 -> 2" in said


def test_override_with_another_method(tmp_path: Path, tiny: Path, corpus: Path) -> None:
    """GPTQ everywhere but down_proj, which RTN quantizes from its original weights (RTN runs after the
    calibrated method in each block, on weights nothing changed)."""
    import lowbit

    recipe = Recipe(W4, GPTQConfig(), Calibration(str(corpus), 4, 32),
                    overrides=(Override(("re:.*down_proj",), scheme=W8, method=RTNConfig()),))
    res = lowbit.quantize(str(tiny), recipe, tmp_path / "q", engine=lowbit.Engine(progress=False))
    model, tok = lowbit.load(res.path, kernels=False)  # the canonical modules, not the speed kernels
    src = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    for i in (0, 1):
        n = f"model.layers.{i}.mlp.down_proj"
        want = quantize_rtn(src.get_submodule(n).weight, W8, scale_dtype=torch.bfloat16)
        got = model.get_submodule(n).qweight()
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert set(json.loads((res.path / "provenance.json").read_text())["methods"]) == {"gptq", "rtn"}
    results = lowbit.evaluate(res.path, reference=str(tiny), data=str(corpus), ctx=32, max_windows=2, progress=False)
    assert results["q"].kld_mean is not None and results["q"].kld_mean > 0


@pytest.mark.parametrize(("recipe", "message"), [
    (Recipe(W4, overrides=(Override(("re:.*k_proj",), scheme=W8),)), "share one input"),
    (Recipe(W4, overrides=(Override(("re:.*dwn_proj",), scheme=W8),)), "matches no quantizable linear"),
    (Recipe(W4, overrides=(Override(("re:.*down_proj",), scheme=lookup_scheme("NF4")),)), "one kind of scheme"),
    (Recipe(W4, GPTQConfig(), overrides=(Override(("re:.*down_proj",), method=GPTQConfig(damp=0.1)),)),
     "one config per method"),
    (Recipe(W4, overrides=(Override(("Linear",), keep=True),)), "nothing to quantize"),
    (Recipe(QuantScheme(4, 48)), "does not divide"),
    (Recipe(W4, SmoothQuantConfig()), "smoothquant takes W8A8"),
])
def test_plan_errors_before_any_work(tmp_path: Path, tiny: Path, recipe: Recipe, message: str) -> None:
    import lowbit

    with pytest.raises(Exception, match=message):
        lowbit.quantize(str(tiny), recipe, tmp_path / "q", engine=lowbit.Engine(progress=False))
    assert not (tmp_path / "q").exists()


def test_mixed_export_refused_outside_compressed_tensors(tmp_path: Path, tiny: Path) -> None:
    import lowbit

    r = Recipe(lookup_scheme("W4A16_ASYM").with_options(group_size=32), export=Export("awq"),
               overrides=(Override(("re:.*down_proj",), scheme=W8),))
    with pytest.raises(Exception, match="holds one scheme"):
        lowbit.quantize(str(tiny), r, tmp_path / "q", engine=lowbit.Engine(progress=False))
