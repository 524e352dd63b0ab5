"""``lowbit qat``: post-training quantization by a recipe, then quantization-aware training, export and gate.

The recipe flags are ``lowbit quantize``'s (:func:`lowbit.cli.quantize.add_recipe_args`); ``--calib`` names the
training text, which also calibrates the PTQ method that QAT starts from. ``--data`` is the gate's evaluation
text, and the training windows are checked disjoint from it.
"""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import say, sub
from lowbit.cli.gate_flags import add_gate_args, describe, gate_from_args
from lowbit.core.errors import LowbitError

EXAMPLES = """\
  lowbit qat smollm2-135m --scheme W3A16 --group-size 64 --steps 300 -o out/smol-w3-qat
  lowbit qat gemma3-270m --scheme W4A16_ASYM --method gptq --calib c4 --max-ppl-increase 15 -o out/g-w4-qat
  lowbit qat ./my-model --recipe recipe.yaml --no-distill --lr 2e-5 --checkpoint-every 50 -o out/my-qat
  lowbit qat ./my-model --recipe recipe.yaml --checkpoint-every 50 --resume -o out/my-qat   # after an interruption"""


def register(subs: Any) -> dict[str, Any]:
    from lowbit.cli.quantize import add_recipe_args

    q = sub(subs, "qat", "quantize, then train the quantized model (QAT) to recover accuracy; export and gate",
            EXAMPLES)
    q.add_argument("model", help="offline source name (lowbit models), model folder, .gguf file or hub id")
    q.add_argument("-o", "--out", required=True, help="output folder (absent or empty; --force replaces an artifact)")
    q.add_argument("--force", action="store_true", help="replace an existing lowbit artifact at --out")
    add_recipe_args(q)
    t = q.add_argument_group("training")
    t.add_argument("--steps", type=int, default=300, help="end-to-end optimizer steps (0: block-wise only)")
    t.add_argument("--lr", type=float, default=None, help="learning rate of the latent weights (default 1e-5)")
    t.add_argument("--scale-lr", type=float, default=None, help="learning rate of the scales (default 1e-4)")
    t.add_argument("--zero-lr", type=float, default=None, help="learning rate of the zero points (default 1e-3)")
    t.add_argument("--batch-size", type=int, default=1, help="windows per step")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    t.add_argument("--samples", type=int, default=512, help="distinct training windows drawn from --calib")
    t.add_argument("--block-epochs", type=int, default=0, metavar="N",
                   help="first train each block to reproduce the float block, N passes over --block-samples windows "
                        "(EfficientQAT's Block-AP; 0: off)")
    t.add_argument("--block-samples", type=int, default=64, help="windows of the block-wise phase")
    t.add_argument("--block-lr", type=float, default=None, help="block-wise learning rate of the latent weights "
                                                                "(default 1e-4)")
    t.add_argument("--block-scale-lr", type=float, default=None, help="block-wise learning rate of the scales "
                                                                      "(default 1e-4)")
    t.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="knowledge distillation from the float model (KL on logits); --no-distill: next-token loss "
                        "(default on)")
    t.add_argument("--freeze-weights", action="store_true",
                   help="end to end, train scales and zero points only, the codes frozen (after --block-epochs, "
                        "if any)")
    t.add_argument("--init", choices=["auto", "project", "ptq"], default="auto",
                   help="latent weights: the float weights moved into the PTQ codes' cells (project), the PTQ "
                        "weights (ptq), or auto: project after RTN, ptq after GPTQ/AWQ")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass "
                                                                     "(less memory, ~30%% more time)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse the fake-quant arithmetic with torch.compile (default on; eager where it fails)")
    t.add_argument("--train-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the training matmuls (autocast); weights, optimizer and loss stay float32")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="save a checkpoint every N steps "
                                                                                "(OUT.checkpoint)")
    t.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint when it holds this run")
    t.add_argument("--max-overlap", type=float, default=0.01, help="largest fraction of training 13-grams allowed "
                                                                   "in the evaluation text")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    add_gate_args(q)
    return {"qat": cmd_qat}


def config_from_args(a: argparse.Namespace) -> Any:
    from lowbit.qat.blocks import BlockConfig
    from lowbit.qat.job import QATConfig
    from lowbit.qat.train import TrainConfig

    for flag, v, lo in (("--steps", a.steps, 0), ("--batch-size", a.batch_size, 1), ("--samples", a.samples, 1),
                        ("--seq-len", a.seq_len, 2), ("--block-epochs", a.block_epochs, 0),
                        ("--block-samples", a.block_samples, 1), ("--checkpoint-every", a.checkpoint_every, 0)):
        if v < lo:
            raise LowbitError(f"{flag} must be >= {lo}, got {v}")
    for flag, v in (("--lr", a.lr), ("--scale-lr", a.scale_lr), ("--zero-lr", a.zero_lr), ("--block-lr", a.block_lr),
                    ("--block-scale-lr", a.block_scale_lr)):
        if v is not None and v < 0:
            raise LowbitError(f"{flag} must be >= 0, got {v}")
    if a.steps == 0 and a.block_epochs == 0:
        raise LowbitError("nothing to train: give --steps or --block-epochs")
    if not 0 <= a.max_overlap <= 1:
        raise LowbitError(f"--max-overlap is a fraction in [0, 1], got {a.max_overlap}")
    lrs = {k: v for k, v in (("lr", a.lr), ("scale_lr", a.scale_lr), ("zero_lr", a.zero_lr)) if v is not None}
    tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, loss="kd" if a.distill else "ce",
                     grad_checkpointing=a.grad_checkpointing, checkpoint_every=a.checkpoint_every,
                     compile=a.compile, autocast=None if a.train_dtype == "float32" else a.train_dtype,
                     seed=a.seed or 0, **lrs)
    blrs = {k: v for k, v in (("lr", a.block_lr), ("scale_lr", a.block_scale_lr)) if v is not None}
    bc = BlockConfig(epochs=a.block_epochs, samples=a.block_samples, compile=a.compile, seed=a.seed or 0,
                     autocast=None if a.train_dtype == "float32" else a.train_dtype, **blrs)
    return QATConfig(tc, bc, corpus=a.calib, samples=a.samples, seq_len=a.seq_len, train_weights=not a.freeze_weights,
                     init=a.init, eval_data=a.data, max_overlap=a.max_overlap)


def cmd_qat(a: argparse.Namespace) -> None:
    from lowbit.cli.quantize import recipe_from_args
    from lowbit.pipeline.engine import Engine
    from lowbit.qat.job import run

    recipe = recipe_from_args(a)
    config = config_from_args(a)
    gate = gate_from_args(a)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    engine = Engine(device=a.device, progress=not a.no_progress, threads=a.threads)
    res = run(a.model, recipe, a.out, config, gate=gate, engine=engine, force=a.force, resume=a.resume,
              progress=not a.no_progress)
    first = "-" if res.loss_first is None else f"{res.loss_first:.4f}"
    last = "-" if res.loss_last is None else f"{res.loss_last:.4f}"
    say(f"wrote {res.path}: {res.n_linears} linears, {res.bits_per_weight:.3f} bits/weight, "
        f"{res.size_bytes / 1e6:.1f} MB; PTQ {res.ptq_seconds:.0f} s, {res.steps} steps in {res.train_seconds:.0f} s, "
        f"loss {first} -> {last} (first/last 10 steps); kept in 16-bit: {', '.join(res.kept) or 'none'}")
    ov = res.overlap
    say(f"training text {ov['train_corpus']} vs evaluation text {ov['eval_corpus']}: {ov['shared']} of "
        f"{ov['train_ngrams']} {ov['ngram']}-grams shared")
    if res.gate:
        say(describe(res.gate))
