"""Block-wise QAT (EfficientQAT's Block-AP, Chen et al. 2024): each decoder block's fake-quant layers trained
to reproduce the float block, one block at a time, before (or instead of) end-to-end training.

For block ``i`` with float inputs ``X_f`` (the float model's) and quantized inputs ``X_q`` (what the
already-trained quantized blocks before it produce), over the training windows::

    Y_f = block_i^float(X_f)                                   targets, computed once
    min over the block's latent weights, scales, zero points:  mean || block_i^quant(X_q) - Y_f ||^2

then ``X_q <- block_i^quant(X_q)``, ``X_f <- Y_f``. Aiming at the float output from the quantized input
lets each block correct the error the blocks before it left (as GPTQ's asymmetric calibration does).
Local targets make each step cheap (one block, no output head, no teacher forward) and its gradient far
less noisy than the end-to-end loss; ``epochs`` passes over the windows, AdamW with the three groups of
:mod:`lowbit.qat.train`, a cosine to zero per block.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.models.archs import get_arch, get_blocks
from lowbit.pipeline.capture import capture_inputs
from lowbit.qat.fakequant import compiled
from lowbit.qat.train import TrainConfig, batch_rows, lr_factor, param_groups

log = logging.getLogger("lowbit.qat")


@dataclass(frozen=True)
class BlockConfig:
    """Block-wise training: ``epochs`` passes over the first ``samples`` training windows per block."""

    epochs: int = 2
    samples: int = 64
    lr: float = 1e-4
    scale_lr: float = 1e-4
    zero_lr: float = 1e-3
    batch_size: int = 1
    max_grad_norm: float = 1.0
    autocast: str | None = "bfloat16"
    compile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.samples < 1 or self.batch_size < 1:
            raise LowbitError("block-wise training needs epochs >= 0, samples >= 1 and batch size >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BlockResult:
    """Per block: mean loss of the first and last epoch, and seconds."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps_per_block(self) -> int:
        return int(self.blocks[0]["steps"]) if self.blocks else 0


def _plain(x: Any) -> Any:
    """A tensor captured under inference mode, as a normal tensor autograd can save (recursively)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def train_blocks(model: nn.Module, teacher: nn.Module, tokens: torch.Tensor, cfg: BlockConfig,
                 progress: bool = True) -> BlockResult:
    """Train the fake-quant layers of ``model`` block by block against ``teacher`` (the float model) on the
    windows ``tokens (n, T)`` (the first ``cfg.samples``); see the module docstring."""
    res = BlockResult()
    if cfg.epochs == 0:
        return res
    t0 = time.perf_counter()
    tokens = tokens[: cfg.samples]
    spec = get_arch(model)
    dev = next(model.parameters()).device
    sblocks, tblocks = get_blocks(model, spec), get_blocks(teacher, spec)
    hq, kwargs = capture_inputs(model, tokens, spec, dev)
    hf, tkwargs = capture_inputs(teacher, tokens, spec, dev)
    hq, hf, kwargs, tkwargs = _plain(hq), _plain(hf), _plain(kwargs), _plain(tkwargs)
    amp = torch.autocast(dev.type, dtype=getattr(torch, cfg.autocast or "bfloat16"), enabled=cfg.autocast is not None)
    n = len(hq)
    steps = max(1, cfg.epochs * n // cfg.batch_size)
    tc = TrainConfig(steps=steps, lr=cfg.lr, scale_lr=cfg.scale_lr, zero_lr=cfg.zero_lr, batch_size=cfg.batch_size,
                     warmup=0.0, seed=cfg.seed)
    model.eval()
    with compiled(cfg.compile):
        for i, (sb, tb) in enumerate(zip(sblocks, tblocks, strict=True)):
            tb_ = time.perf_counter()
            with torch.no_grad(), amp:
                targets = [_out(tb(x, **tkwargs[i])).float() for x in hf]
            groups = param_groups(sb, tc)
            opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
            trainable = [p for g in groups for p in g["params"]]
            losses = []
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(step, tc)
                rows = batch_rows(step, n, tc)
                x = torch.cat([hq[r] for r in rows])
                with amp:
                    y = _out(sb(x, **kwargs[i]))
                loss = F.mse_loss(y.float(), torch.cat([targets[r] for r in rows]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                opt.step()
                losses.append(loss.item())
            with torch.no_grad(), amp:
                hq = [_out(sb(x, **kwargs[i])).float() for x in hq]
            hf = targets
            per = max(1, n // cfg.batch_size)
            entry = {"block": i, "steps": steps, "loss_first_epoch": sum(losses[:per]) / len(losses[:per]),
                     "loss_last_epoch": sum(losses[-per:]) / len(losses[-per:]),
                     "seconds": round(time.perf_counter() - tb_, 2)}
            res.blocks.append(entry)
            if progress:
                el = time.perf_counter() - t0
                log.info("qat block %d/%d: mse %.4g -> %.4g, %.1f s, elapsed %.0f s, ETA %.0f s", i + 1, len(sblocks),
                         entry["loss_first_epoch"], entry["loss_last_epoch"], entry["seconds"], el,
                         el / (i + 1) * (len(sblocks) - i - 1))
    res.seconds = time.perf_counter() - t0
    return res
