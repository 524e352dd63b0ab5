"""QAT on tiny random models: the fake-quant forward is what the exported artifact computes, gradients follow
the straight-through / LSQ rules, training lowers the loss, a resumed run continues exactly, and the gate keeps
a failing artifact away from its output path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model_dir
from lowbit.core.scheme import get_scheme
from lowbit.formats.registry import load_artifact
from lowbit.methods.gptq import GPTQConfig
from lowbit.models.loader import load_model
from lowbit.pipeline.engine import Engine
from lowbit.qat import FakeQuantLinear, convert, fake_quant_layers, prepare
from lowbit.qat.fakequant import FakeQuant, ste_round
from lowbit.qat.train import TrainConfig, kd_loss, train
from lowbit.recipe import Recipe

ENGINE = Engine(device="cpu", progress=False)


def _prepared(folder: Path, recipe: Recipe, **kw):  # type: ignore[no-untyped-def]
    lm = load_model(str(folder))
    torch.manual_seed(0)
    tokens = torch.randint(3, 300, (4, 32))
    prepare(lm.model, recipe, tokens=tokens, engine=ENGINE, **kw)
    return lm


def _tokens(n: int = 8, t: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, t), generator=g)


@pytest.mark.parametrize(("arch", "preset", "gs", "method"), [
    ("llama", "W4A16_ASYM", 32, None), ("llama", "W3A16", 16, GPTQConfig()), ("gemma3", "W4A16_ASYM", 32, None)])
def test_trained_fake_quant_model_equals_exported_artifact(tmp_path: Path, arch: str, preset: str, gs: int,
                                                           method: GPTQConfig | None) -> None:
    """After a few steps (scales, zero points and latent weights all moved) the artifact loaded from disk gives
    bit-identical logits: the codes are integers, the scales values of the storage dtype, and both sides form
    W_hat = s * (q - z) by the same float32 product; every other tensor was rounded to the storage dtype."""
    folder = make_tiny_model_dir(tmp_path / "m", arch)
    recipe = Recipe(get_scheme(preset, group_size=gs), method or Recipe(get_scheme(preset)).method)
    lm = _prepared(folder, recipe)
    teacher = load_model(str(folder)).model
    cfg = TrainConfig(steps=3, lr=1e-2, scale_lr=1e-2, zero_lr=0.5, warmup=0.0, log_every=1000, compile=False)
    before = {n: m.qweight() for n, m in fake_quant_layers(lm.model).items()}
    train(lm.model, _tokens(), cfg, teacher=teacher, progress=False)
    after = {n: m.qweight() for n, m in fake_quant_layers(lm.model).items()}
    assert any(not torch.equal(before[n].codes, after[n].codes) for n in before)  # training changed the codes
    assert any(not torch.equal(before[n].scales, after[n].scales) for n in before)
    convert(lm.model, tmp_path / "art", tokenizer=lm.tokenizer)
    art = load_artifact(tmp_path / "art")
    ids = _tokens(2, 20, seed=5)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, art(ids).logits)


def test_straight_through_and_lsq_gradients() -> None:
    """FakeQuant's hand-written backward equals autograd through the straight-through formulation, and on one
    group it gives LSQ's step-size gradient: round(w/s) - w/s inside the grid, q - z at a clipped weight."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, 8, requires_grad=True)
    s = (torch.rand(6, 3, 1) * 0.3 + 0.15).requires_grad_()
    z = torch.randint(2, 6, (6, 3, 1)).float().requires_grad_()
    g = torch.randn(6, 3, 8)
    (FakeQuant.apply(w, s, z, 7) * g).sum().backward()
    ours = [t.grad.clone() for t in (w, s, z)]  # type: ignore[union-attr]
    for t in (w, s, z):
        t.grad = None
    (s * (torch.clamp(ste_round(w / s) + z, 0, 7) - z) * g).sum().backward()
    for a, t in zip(ours, (w, s, z), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)
    # one group by hand: s = 1, z = 4, 3 bits (codes 0..7, signed -4..3); w = 0.3 inside, w = 5.0 clipped to 7
    w1 = torch.tensor([[[0.3, 5.0]]], requires_grad=True)
    s1 = torch.tensor([[[1.0]]], requires_grad=True)
    z1 = torch.tensor([[[4.0]]], requires_grad=True)
    FakeQuant.apply(w1, s1, z1, 7).sum().backward()
    assert w1.grad.tolist() == [[[1.0, 0.0]]]  # type: ignore[union-attr]
    assert s1.grad.item() == pytest.approx((0 - 0.3) + (7 - 4))  # type: ignore[union-attr]
    assert z1.grad.item() == pytest.approx(-1.0)  # type: ignore[union-attr]


def test_compiled_kernels_equal_the_eager_ones() -> None:
    """What training runs (torch.compile'd kernels, bf16 output for autocast) equals the eager arithmetic."""
    from lowbit.qat.fakequant import compiled

    torch.manual_seed(1)
    w = torch.randn(40, 5, 16, requires_grad=True)
    s = (torch.rand(40, 5, 1) * 0.2 + 0.1).requires_grad_()
    z = torch.randint(0, 16, (40, 5, 1)).float().requires_grad_()
    g = torch.randn(40, 5, 16)
    outs, grads = [], []
    for on in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            with compiled(on):
                y = FakeQuant.apply(w, s, z, 15, dtype)
                (y.float() * g).sum().backward()
            outs.append(y)
            grads.append([t.grad.clone() for t in (w, s, z)])  # type: ignore[union-attr]
            for t in (w, s, z):
                t.grad = None
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3]) and outs[1].dtype == torch.bfloat16
    for a, b in zip(grads[0], grads[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scales_only_from_gptq_keeps_the_codes_moves_the_scales_and_exports_exactly(tmp_path: Path) -> None:
    """From GPTQ the latent weight sits at each cell's centre, where LSQ's scale gradient round(W/s) - W/s is 0
    for every weight: scales-only training through the rounding would never move. With the codes frozen
    (E2E-QP) the scale gradient is sum g * (q - z): the scales move, the codes stay GPTQ's, the loss falls,
    and the artifact still computes the fake-quant forward bit for bit."""
    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    recipe = Recipe(get_scheme("W3A16", group_size=16), GPTQConfig())
    lm = _prepared(folder, recipe, train_weights=False)
    teacher = load_model(str(folder)).model
    layers = fake_quant_layers(lm.model)
    assert all(m.frozen and not m.weight.requires_grad for m in layers.values())
    trainable = {n.rsplit(".", 1)[1] for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable == {"weight_scale"}  # symmetric: no zero points; codes fixed
    before = {n: m.qweight() for n, m in layers.items()}
    data = _tokens(4, 24)

    def kd() -> float:
        with torch.no_grad():
            return float(kd_loss(lm.model(data).logits, teacher(data).logits))

    loss0 = kd()
    cfg = TrainConfig(steps=20, lr=0.0, scale_lr=3e-4, warmup=0.0, log_every=1000, compile=False)
    train(lm.model, data, cfg, teacher=teacher, progress=False)
    after = {n: m.qweight() for n, m in layers.items()}
    assert all(torch.equal(before[n].codes, after[n].codes) for n in before)
    moved = sum(int((before[n].scales != after[n].scales).sum()) for n in before)
    total = sum(before[n].scales.numel() for n in before)
    assert moved > total // 2  # Adam moves every scale with a non-zero gradient by ~lr per step
    assert kd() < 0.9 * loss0  # the training windows' KD loss, same batches before and after
    convert(lm.model, tmp_path / "art", tokenizer=lm.tokenizer)
    art = load_artifact(tmp_path / "art")
    ids = _tokens(2, 20, seed=5)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, art(ids).logits)


def test_prepare_starts_at_the_ptq_result_and_only_quantized_layers_train(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    recipe = Recipe(get_scheme("W4A16", group_size=32), ignore=("model.layers.1.mlp.down_proj",))
    lm = _prepared(folder, recipe)
    ref = load_model(str(folder)).model
    from lowbit.methods.rtn import quantize_rtn

    layers = fake_quant_layers(lm.model)
    assert "model.layers.1.mlp.down_proj" not in layers and len(layers) == 13
    for n, m in layers.items():  # step 0 is RTN exactly, and the latent weight is the float weight
        rtn = quantize_rtn(ref.get_submodule(n).weight, m.scheme, scale_dtype=torch.bfloat16)
        assert torch.equal(m.qweight().codes, rtn.codes) and torch.equal(m.qweight().scales, rtn.scales)
        w, lat = ref.get_submodule(n).weight, m.weight.detach()
        moved = lat != w  # only weights within 1e-3 steps of a cell's edge move, by at most that
        assert moved.float().mean() < 0.01
        step = m.weight_scale.detach().repeat_interleave(32, dim=1)
        assert ((lat - w).abs() <= 1.01e-3 * step).all()
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[0] in layers for n in trainable)
    assert isinstance(lm.model.get_submodule("model.layers.1.mlp.down_proj"), torch.nn.Linear)


def test_a_few_steps_lower_the_distillation_loss(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    lm = _prepared(folder, Recipe(get_scheme("W2A16", group_size=16)))
    teacher = load_model(str(folder)).model
    cfg = TrainConfig(steps=30, lr=2e-3, scale_lr=2e-3, warmup=0.0, log_every=1000, compile=False)
    res = train(lm.model, _tokens(4, 24), cfg, teacher=teacher, progress=False)
    first, last = res.mean_loss(True, 4), res.mean_loss(False, 4)
    assert first is not None and last is not None and last < 0.7 * first


def test_resumed_run_continues_identically(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    recipe = Recipe(get_scheme("W3A16_ASYM", group_size=32))
    teacher = load_model(str(folder)).model
    cfg = TrainConfig(steps=6, lr=1e-3, scale_lr=1e-3, checkpoint_every=2, batch_size=3, log_every=1000,
                      compile=False)
    tokens = _tokens(4, 16)
    straight = _prepared(folder, recipe)
    full = train(straight.model, tokens, cfg, teacher=teacher, progress=False)

    def stop(step: int, entry: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    first = _prepared(folder, recipe)
    with pytest.raises(KeyboardInterrupt):
        train(first.model, tokens, cfg, teacher=teacher, checkpoint_dir=tmp_path / "ck", progress=False, on_step=stop)
    again = _prepared(folder, recipe)
    resumed = train(again.model, tokens, cfg, teacher=teacher, checkpoint_dir=tmp_path / "ck", resume=True,
                    progress=False)
    assert resumed.resumed_from == 4
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in full.log]
    a, b = dict(straight.model.named_parameters()), dict(again.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    other = _prepared(folder, recipe)  # a checkpoint of another configuration is refused
    from lowbit.core.errors import LowbitError

    with pytest.raises(LowbitError, match="another run"):
        train(other.model, tokens, TrainConfig(steps=6, lr=5e-4, checkpoint_every=2, compile=False), teacher=teacher,
              checkpoint_dir=tmp_path / "ck", resume=True, progress=False)


def test_hf_trainer_trains_the_prepared_model(tmp_path: Path) -> None:
    """Any loop trains it: transformers' Trainer, next-token loss, two steps move the scales."""
    from datasets import Dataset  # type: ignore[import-not-found]
    from transformers import Trainer, TrainingArguments

    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    lm = _prepared(folder, Recipe(get_scheme("W4A16", group_size=32)))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}
    ids = _tokens(4, 16).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    Trainer(model=lm.model, args=args, train_dataset=data).train()
    moved = [n for n, p in lm.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.endswith("weight_scale") for n in moved) and any(n.endswith(".weight") for n in moved)
    assert isinstance(lm.model.get_submodule("model.layers.0.self_attn.q_proj"), FakeQuantLinear)


def test_gguf_export_carries_the_trained_codes(tmp_path: Path) -> None:
    """W4A16 g32 symmetric maps onto Q4_0: the GGUF blocks decode to exactly the fake-quant weights, and
    llama.cpp computes what the fake-quant model computes (to its 8-bit activation rounding)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    folder = make_tiny_model_dir(tmp_path / "m", "llama")
    lm = _prepared(folder, Recipe(get_scheme("W4A16", group_size=32)))
    cfg = TrainConfig(steps=2, lr=1e-3, scale_lr=1e-3, warmup=0.0, compile=False)
    train(lm.model, _tokens(), cfg, teacher=load_model(str(folder)).model, progress=False)
    out = convert(lm.model, tmp_path / "m.gguf", tokenizer=lm.tokenizer, format="gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    q = lm.model.get_submodule("model.layers.1.mlp.down_proj").fake_weight().detach().numpy()
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == "Q4_0"
    assert np.array_equal(dequantize(np.asarray(t.data), t.tensor_type).reshape(q.shape), q)
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF reference (scripts/install_llamacpp.sh)")
    import llama_cpp

    llm = llama_cpp.Llama(str(out), n_ctx=32, logits_all=True, verbose=False)
    ids = [1, 5, 17, 42, 99, 7, 250, 3]
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())
    from lowbit.core.errors import LowbitError

    lm3 = _prepared(folder, Recipe(get_scheme("W3A16", group_size=32)))
    with pytest.raises(LowbitError, match="no GGUF type"):
        convert(lm3.model, tmp_path / "w3.gguf", format="gguf")


def test_block_wise_phase_lowers_each_blocks_error_and_still_exports_exactly(tmp_path: Path) -> None:
    from lowbit.qat.blocks import BlockConfig, train_blocks

    folder = make_tiny_model_dir(tmp_path / "m", "gemma3")  # per-layer attention kwargs (sliding and full)
    lm = _prepared(folder, Recipe(get_scheme("W2A16", group_size=16)))
    teacher = load_model(str(folder)).model
    res = train_blocks(lm.model, teacher, _tokens(6, 24), BlockConfig(epochs=4, lr=2e-3, scale_lr=2e-3,
                                                                      compile=False), progress=False)
    assert len(res.blocks) == 2 and res.steps_per_block == 24
    assert all(b["loss_last_epoch"] < 0.8 * b["loss_first_epoch"] for b in res.blocks)
    convert(lm.model, tmp_path / "art", tokenizer=lm.tokenizer)
    ids = _tokens(1, 20, seed=3)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, load_artifact(tmp_path / "art")(ids).logits)
