"""The attention replay (lowbit.pipeline.replay): later runs of a block reuse o_proj's saved inputs."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir
from lowbit.core.scheme import QuantScheme
from lowbit.methods.gptq import GPTQConfig
from lowbit.pipeline import replay
from lowbit.pipeline.blockwise import run_blockwise
from lowbit.pipeline.gptq import GPTQMethod


def _run(d, alpha: float, on: bool, ids: torch.Tensor) -> dict:
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    method = GPTQMethod(QuantScheme(3, 32), GPTQConfig(asym_alpha=alpha), scale_dtype=torch.float32,
                        replay_attention=on)
    return run_blockwise(model, method, ids, progress=False)


def _spy(monkeypatch) -> list[tuple[str, bool]]:
    """Records (source, replayed) for each call of the attention while a replay is active."""
    seen: list[tuple[str, bool]] = []
    real = replay.AttnReplay._forward

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        out = real(self, *a, **k)
        seen.append((self.src, self.z is not None and self.ok))
        return out

    monkeypatch.setattr(replay.AttnReplay, "_forward", spy)
    return seen


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3", "phi3"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_gptq_with_replay_gives_the_same_codes(tmp_path, monkeypatch, arch, alpha):
    """Same codes and scales, bit for bit, with the attention replayed in every run after o_proj's stage:
    plain GPTQ's gate/up and down stages and the output pass; under GPTAQ also the float run of the
    gate/up stage, from the float model's own saved inputs."""
    d = make_tiny_model_dir(tmp_path / "m", arch)
    ids = torch.randint(3, 300, (5, 48), generator=torch.Generator().manual_seed(0))
    ref = _run(d, alpha, False, ids)
    seen = _spy(monkeypatch)
    got = _run(d, alpha, True, ids)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k].codes, ref[k].codes), k
        assert torch.equal(got[k].scales, ref[k].scales), k
        assert torch.equal(got[k].zeros, ref[k].zeros), k
    runs = 4 if alpha > 0 else 3  # (+ the float run) gate/up, down, output pass
    assert len(seen) == 2 * 5 * runs and all(r for _, r in seen)
    assert {s for s, _ in seen} == ({"float", "quantized"} if alpha > 0 else {"quantized"})


def test_an_attention_that_is_not_its_projection_is_not_replayed(tmp_path, monkeypatch, caplog):
    """An attention whose output is more than o_proj of o_proj's input fails the first call's check:
    the block runs the real attention from then on, with a warning, and the codes are those of a run
    without replay."""
    import transformers.models.llama.modeling_llama as ml

    real = ml.LlamaAttention.forward

    def scaled(self, *a, **k):  # type: ignore[no-untyped-def]
        out = real(self, *a, **k)
        return (out[0] * 1.5, *out[1:])

    monkeypatch.setattr(ml.LlamaAttention, "forward", scaled)
    d = make_tiny_model_dir(tmp_path / "m", "llama")
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = _run(d, 0.0, False, ids)
    seen = _spy(monkeypatch)
    replay._warned.clear()
    with caplog.at_level(logging.WARNING, logger="lowbit.pipeline.replay"):
        got = _run(d, 0.0, True, ids)
    assert all(torch.equal(got[k].codes, ref[k].codes) for k in ref)
    assert seen and not any(r for _, r in seen)
    assert "replaying it is off for this block" in caplog.text


def test_replay_restores_an_instance_forward(tmp_path):
    """A forward set on the attention instance (as some wrappers do) is called by the check and is back after."""
    from lowbit.models.archs import get_arch, get_blocks
    from lowbit.pipeline.replay import attn_replay

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / "m", "qwen2"), dtype=torch.float32)
    spec = get_arch(model)
    block = get_blocks(model, spec)[0]
    calls = []
    bound = block.self_attn.forward

    def own(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return bound(*a, **k)

    block.self_attn.forward = own
    rp = attn_replay(block, spec, 0)
    assert rp is not None and rp.proj is block.self_attn.o_proj
    with rp.active():
        assert block.self_attn.forward == rp._forward
    assert block.self_attn.forward is own
