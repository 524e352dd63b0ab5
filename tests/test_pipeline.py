import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ALL_ARCHS, make_tiny_model_dir
from lowbit.core.errors import LowbitError, SchemeError, UnsupportedArchitectureError
from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import quantize_rtn
from lowbit.models.archs import get_arch, get_blocks
from lowbit.pipeline.blockwise import capture_inputs, run_blockwise
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.rtn import ImatrixRTNMethod


def _model(tmp_path, arch="llama", seed=0):
    d = make_tiny_model_dir(tmp_path / arch, arch, seed)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _tokens(n=4, t=24, seed=0):
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_capture_matches_a_full_forward(tmp_path, arch):
    """Captured block-0 inputs and per-block kwargs reproduce the model's own hidden states (olmo2 and
    gpt_neox through the generic fallback's table)."""
    model = _model(tmp_path, arch)
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    tokens = _tokens()
    hidden, kwargs = capture_inputs(model, tokens, spec, torch.device("cpu"))
    assert len(hidden) == tokens.shape[0] and len(kwargs) == len(blocks)
    with torch.inference_mode():
        ref = model(tokens[1:2], output_hidden_states=True, use_cache=False).hidden_states
        x = hidden[1]
        assert torch.allclose(x, ref[0], atol=1e-6)
        for i, block in enumerate(blocks):
            y = block(x, **kwargs[i])
            x = y[0] if isinstance(y, tuple) else y
            if i < len(blocks) - 1:  # the last hidden state is after the final norm
                assert torch.allclose(x, ref[i + 1], atol=1e-5), f"block {i}"


def test_gemma3_blocks_get_their_own_attention_kwargs():
    """Sliding and full attention layers receive different rotary embeddings and masks."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=320, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    tokens = _tokens(t=40)
    hidden, kwargs = capture_inputs(model, tokens, get_arch(model), torch.device("cpu"))
    assert not torch.equal(kwargs[0]["position_embeddings"][0], kwargs[1]["position_embeddings"][0])
    with torch.inference_mode():
        ref = model(tokens[:1], output_hidden_states=True, use_cache=False).hidden_states
        y = model.model.layers[0](hidden[0], **kwargs[0])
        y = model.model.layers[1](y[0] if isinstance(y, tuple) else y, **kwargs[1])
        y = y[0] if isinstance(y, tuple) else y
    assert torch.allclose(model.model.norm(y), ref[-1], atol=1e-5)


def test_rtn_pipeline_equals_per_layer_rtn(tmp_path):
    model = _model(tmp_path)
    orig = copy.deepcopy(model)
    s = QuantScheme(4, 32)
    qws = quantize_model(model, s, "rtn", progress=False, scale_dtype=torch.float32)
    assert len(qws) == 2 * 7
    for name, qw in qws.items():
        direct = quantize_rtn(orig.get_submodule(name).weight, s)
        assert torch.equal(qw.codes, direct.codes) and torch.equal(qw.scales, direct.scales)
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())  # fake-quant written back
    assert torch.equal(model.lm_head.weight, orig.lm_head.weight)


def test_imatrix_statistics_are_input_square_means(tmp_path):
    model = _model(tmp_path)
    tokens = _tokens()
    seen: dict[str, list[torch.Tensor]] = {"q": [], "down": []}
    layer = model.model.layers[1]
    h1 = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["q"].append(a[0]))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0]))
    with torch.inference_mode():
        for s in range(tokens.shape[0]):
            model(tokens[s : s + 1], use_cache=False)
    h1.remove()
    h2.remove()
    method = ImatrixRTNMethod(QuantScheme(4, 32), scale_dtype=torch.float32)
    run_blockwise(model, method, tokens, progress=False)
    for key, name in (("q", "self_attn.q_proj"), ("down", "mlp.down_proj")):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]])
        got = method.importance[f"model.layers.1.{name}"]
        assert torch.allclose(got, x.pow(2).mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
def test_imatrix_rtn_runs_on_every_family(tmp_path, arch):
    model = _model(tmp_path, arch)
    qws = quantize_model(model, QuantScheme(4, 32, False), "imatrix-rtn", tokens=_tokens(), progress=False)
    assert len(qws) == 14 and all(torch.isfinite(q.scales.float()).all() for q in qws.values())
    with torch.inference_mode():
        assert torch.isfinite(model(_tokens(1)).logits).all()


def test_unsupported_architecture_names_the_missing_entry(tmp_path):
    model = _model(tmp_path)
    model.config.architectures = ["MysteryForCausalLM"]

    class Mystery(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    with pytest.raises(UnsupportedArchitectureError, match="MysteryForCausalLM"):
        quantize_model(Mystery(model), QuantScheme(4, 32), progress=False)


def test_bad_inputs_stop_before_any_work(tmp_path):
    model = _model(tmp_path)
    with pytest.raises(SchemeError, match="does not divide the input dimension 64"):
        quantize_model(model, QuantScheme(4, 48), progress=False)
    with pytest.raises(LowbitError, match="calibration"):
        quantize_model(model, QuantScheme(4, 32), "imatrix-rtn", tokens=None, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LowbitError, match=r"model.layers.1.mlp.up_proj.weight has 1 NaN/Inf"):
        quantize_model(model, QuantScheme(4, 32), progress=False)
    assert torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_warm_forward_runs_block0_once_and_changes_nothing(tmp_path, arch):
    """The GPU warm-up forward (forced on here, on the CPU) runs block 0 one extra time, before any
    statistics hook: GPTQ's codes and imatrix's statistics equal those of a run without it."""
    from lowbit.pipeline.gptq import GPTQMethod

    tokens = _tokens()
    runs = {}
    for warm in (False, True):
        model = _model(tmp_path, arch)
        calls = [0]
        model.model.layers[0].register_forward_pre_hook(lambda m, a, c=calls: c.__setitem__(0, c[0] + 1))
        gptq = GPTQMethod(QuantScheme(4, 32, False), scale_dtype=torch.float32)
        qws = run_blockwise(model, gptq, tokens, progress=False, warm_forward=warm)
        imx = ImatrixRTNMethod(QuantScheme(4, 32), scale_dtype=torch.float32)
        run_blockwise(model, imx, tokens, progress=False, warm_forward=warm)
        runs[warm] = (qws, imx.importance, calls[0])
    (q0, i0, c0), (q1, i1, c1) = runs[False], runs[True]
    assert c1 == c0 + 2  # one extra forward of block 0 per run, nothing more
    assert q0.keys() == q1.keys() and i0.keys() == i1.keys()
    for k in q0:
        assert torch.equal(q0[k].codes, q1[k].codes) and torch.equal(q0[k].scales, q1[k].scales)
    for k in i0:
        assert torch.equal(i0[k], i1[k])
