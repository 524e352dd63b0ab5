"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023). For a linear layer ``y = x W^T`` with ``W (out, in)`` and
calibration inputs ``X (n, in)``, GPTQ minimises ``||X W^T - X W_hat^T||^2`` row by row, whose
Hessian is ``H = 2 X^T X (in, in)``. Columns are quantized one at a time; after column ``j`` the
error is spread over the columns not yet quantized (Optimal Brain Quantization)::

    q_j    = quant(w_j)                          (round to nearest on the group's grid)
    e_j    = (w_j - q_j) / [H^-1]_jj
    w_k   -= e_j [H^-1]_jk        for k > j     (rows of the upper Cholesky factor of H^-1)

Implementation as in the reference code: ``H^-1`` is taken through the Cholesky factorisation
``H^-1 = U^T U`` (upper ``U``, whose row ``j`` restricted to ``k >= j`` is exactly the update
above), and updates are applied lazily in blocks of ``block_size`` columns (one rank-B update of
the remaining columns per block). ``H`` is damped by ``damp * mean(diag H)`` on its diagonal;
when the factorisation fails the damping is multiplied by 10 and retried (reported). Columns that
never saw a non-zero input (``H_jj = 0``) are dead: their weights are set to 0 and ``H_jj = 1``.

Options: ``act_order`` quantizes columns in order of decreasing ``H_jj``. With ``static_groups``
(the default) each group's scale is fitted on the original weights of its contiguous columns
before any update, so the checkpoint keeps the plain group layout (compressed-tensors
``actorder: weight``); without it groups follow the permuted order and the layer carries a group
index ``g_idx`` (``actorder: group``). ``search`` fits each group's clipping range by the MSE
search of :func:`lowbit.methods.rtn.fit_groups`, with static groups weighted by ``H_jj`` (the
error of column ``j`` costs ``H_jj`` in the layer output, to first order).

Shapes: ``W (out, in)``, ``H (in, in)`` float32, groups along ``in``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.core.errors import SchemeError
from lowbit.core.inplace import flip_, invert_upper_, permute_columns_, permute_symmetric_, transpose_
from lowbit.core.qweight import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.methods import gptq_triton
from lowbit.methods.gptaq import shift_with_factor_
from lowbit.methods.gptq_block import run_block_columns
from lowbit.methods.gptq_refit import refit_scales
from lowbit.methods.rtn import fit_groups, fit_params

log = logging.getLogger(__name__)


#: groups aimed at the float model's output under asymmetric calibration: every group; every group but
#: the block's last (the MLP's down projection); or only those fed by a norm of the residual stream
ASYM_SCOPES = ("all", "skip-last", "residual")


@dataclass(frozen=True)
class GPTQConfig:
    """Options of GPTQ. Defaults follow llm-compressor (damp 0.01, blocks of 128, act-order with static
    groups, which costs nothing at inference), plus asymmetric calibration (GPTAQ) at strength 0.5 on
    every group of linears but the block's last; docs/decisions.md gives the measurements behind them.

    ``true_sequential`` is read by the block engine (one run of the block per group of linears).
    ``cuda_graphs`` and ``triton`` choose how the column loop runs on a GPU, never its result."""

    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    block_size: int = 128  # columns per lazy update
    act_order: bool = True  # columns by decreasing Hessian diagonal
    static_groups: bool = True  # group scales fitted before the updates (plain group layout, no g_idx)
    search: bool = False  # MSE clipping search of each group's range
    max_damp_tries: int = 8  # damping x10 per failed factorisation, at most this often
    cuda_graphs: bool = True  # replay the column loop of static-group blocks as CUDA graphs on GPUs
    triton: bool = True  # on GPUs with Triton: one kernel per block of static-group columns (else graphs)
    refit: bool = False  # after the columns, refit static group scales to the layer output error (gptq_refit)
    search_power: float = 1.0  # importance of column j in the clipping search: (H_jj / mean H_jj) ** power
    asym_alpha: float = 0.5  # asymmetric calibration towards the float model's outputs (gptaq); 0 = plain GPTQ
    asym_scope: str = "skip-last"  # the groups aimed at the float output (ASYM_SCOPES)
    search_guard: int = 0  # > 0: keep the search per layer only if the worst top-token error does not grow
    true_sequential: bool = True  # one run of the block per group of linears, each seeing the previous quantized

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise SchemeError(f"GPTQ damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise SchemeError(f"GPTQ block size must be >= 1, got {self.block_size}")
        if self.search_guard < 0:
            raise SchemeError(f"GPTQ search guard must be a token count >= 0, got {self.search_guard}")
        if not self.search and (self.search_guard or self.search_power != 1.0):
            raise SchemeError("the search guard and the search power shape the clipping search: turn it on "
                              "(search=True, CLI --mse) or leave them at their defaults")
        if self.search_power < 0:
            raise SchemeError(f"GPTQ search power must be >= 0, got {self.search_power}")
        if not 0 <= self.asym_alpha <= 1:
            raise SchemeError(f"GPTQ asymmetric calibration strength must be in [0, 1], got {self.asym_alpha}")
        if self.asym_scope not in ASYM_SCOPES:
            raise SchemeError(f"GPTQ asymmetric calibration scope must be one of {', '.join(ASYM_SCOPES)}, "
                              f"got {self.asym_scope!r}")


@dataclass
class GPTQStats:
    """What happened to one layer: the summed OBQ error and the damping finally used."""

    loss: float
    damp: float
    dead_columns: int
    row_loss: torch.Tensor | None = None  # (out,) error of each output row, on the CPU
    searched: bool | None = None  # with a search guard: whether the clipping search was kept


class HessianConsumed(SchemeError):
    """The factorisation failed on a Hessian the caller let GPTQ overwrite: retry with a fresh one."""


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _inverse_cholesky_(Hw: torch.Tensor, source: Callable[[], None] | None, mean_diag: float, damp: float,
                       tries: int, name: str) -> float:
    """Turn ``Hw`` in place into the upper Cholesky factor ``U`` of ``(Hw + lambda I)^-1``.

    ``lambda = damp * mean(diag H)``, multiplied by 10 after each failed factorisation (``source``
    restores ``Hw`` first; without one, :class:`HessianConsumed` is raised). Working in place keeps
    one ``in x in`` buffer instead of five.
    Returns the damping fraction that succeeded.
    """
    info = torch.empty((), dtype=torch.int32, device=Hw.device)
    for attempt in range(tries):
        frac = damp * 10**attempt
        if attempt:
            if source is None:
                raise HessianConsumed(f"{name}: Hessian not positive definite at damp {damp:.3g}, and it was "
                                      "factorised in place: call again with a fresh copy")
            source()
        Hw.diagonal().add_(frac * mean_diag)
        # U = J L^-1 J where J H J = L L^T (J reverses the order): then U^T U = J (JHJ)^-1 J = H^-1; U
        # is upper with a positive diagonal, so it is the factor. One Cholesky (on the column-major
        # view, which cuSOLVER factorises in place; the row-major storage then holds L^T) and one
        # triangular inverse: half the work of Cholesky -> inverse -> Cholesky, and no in x in copy.
        flip_(Hw)
        M = Hw.mT
        torch.linalg.cholesky_ex(M, out=(M, info))
        if int(info) == 0:
            invert_upper_(Hw)  # (L^T)^-1 = (L^-1)^T
            flip_(Hw)  # J (L^-1)^T J = U^T
            transpose_(Hw)
            if int(info) == 0 and bool(torch.isfinite(Hw.diagonal()).all()):
                if attempt:
                    log.warning("%s: Hessian not positive definite at damp %.3g; succeeded with damp %.3g",
                                name, damp, frac)
                return frac
    raise SchemeError(f"{name}: the Hessian stays singular up to damp {damp * 10 ** (tries - 1):.3g}; "
                      "use more (or more varied) calibration samples")


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig = GPTQConfig(),
                  *, scale_dtype: torch.dtype = torch.float32, name: str = "layer",
                  timers: dict[str, float] | None = None, consume_hessian: bool = False,
                  consume_weight: bool = False, wd: torch.Tensor | None = None
                  ) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize ``weight (out, in)`` given the Hessian ``H (in, in)`` of its inputs.

    With ``timers`` the seconds of the phases (``cholesky``, ``columns``) are added to it. With
    ``consume_hessian`` a float32 ``H`` on ``weight``'s device is factorised in place (no second
    ``in x in`` buffer); if the factorisation then fails, :class:`HessianConsumed` asks the caller
    for a fresh ``H`` (the retry needs the original). With ``consume_weight`` a float32 ``weight``
    is the working copy (overwritten; no second ``out x in`` float32 buffer). With ``wd = W D (out, in)``
    (``D = (X - X~)^T X~``: float minus quantized-model inputs, scaled like ``H``) and
    ``cfg.asym_alpha > 0`` the target is the float model's output (:mod:`lowbit.methods.gptaq`).
    """
    out, cols = weight.shape
    consume_hessian = consume_hessian and not cfg.refit  # the refit needs H after the columns
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    groups = scheme.n_groups(cols)
    gs = cols // groups
    Hd = H.to(device=weight.device, dtype=torch.float32)
    diag = Hd.diagonal().clone()
    dead = diag == 0
    mean_diag = float(torch.where(dead, torch.ones_like(diag), diag).mean())
    perm = torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True) if cfg.act_order else None
    own = consume_weight and weight.dtype == torch.float32 and not cfg.refit  # the refit re-reads the weight
    W = weight.detach() if own else weight.detach().to(torch.float32, copy=True)
    W[:, dead] = 0
    dead_p = dead if perm is None else dead[perm]

    def to_order_(M: torch.Tensor) -> None:  # in processing order, dead columns set to 1, in place
        if perm is not None:
            permute_symmetric_(M, perm)
        M.diagonal()[dead_p] = 1

    Hw = Hd.clone() if Hd is H and not consume_hessian else Hd  # the caller's H stays intact unless consumed

    def refill() -> None:  # restore Hw from the caller's H (a retry after a failed factorisation)
        Hw.copy_(H)
        to_order_(Hw)

    source: Callable[[], None] | None = None if Hw is H else refill
    to_order_(Hw)
    timed = timers is not None  # synchronise the device for phase timings only when asked
    t0 = _sync_time(W.device) if timed else 0.0
    damp = _inverse_cholesky_(Hw, source, mean_diag, cfg.damp, cfg.max_damp_tries, name)
    U = Hw
    t1 = _sync_time(W.device) if timed else 0.0
    if wd is not None and cfg.asym_alpha > 0:  # GPTAQ: aim at the float output, through GPTQ's own factor
        shift_with_factor_(W, wd, U, cfg.asym_alpha, perm)
        W[:, dead] = 0

    static: tuple[torch.Tensor, torch.Tensor] | None = None
    if scheme.group_size is None or cfg.static_groups:  # fitted once, on the original weights
        a = None
        if cfg.search:  # clipping search weighted by H_jj = 2 E[x_j^2], as importance-weighted RTN does
            a = (torch.where(dead, torch.zeros_like(diag), diag) / mean_diag).pow(cfg.search_power) + 1e-6
            a = a.reshape(1, groups, gs)
        s, z = fit_params(W.reshape(out, groups, gs), scheme, a, search=cfg.search, scale_dtype=scale_dtype)
        static = (s[..., 0], z[..., 0])  # (out, G); no W-sized codes are made
    if perm is not None:
        permute_columns_(W, perm)

    col_group = torch.arange(cols, device=W.device) // gs  # group of each original column
    proc = col_group if perm is None or static is None else col_group[perm]
    bs = cfg.block_size
    if static is not None and cfg.triton and gptq_triton.available(W) and bs & (bs - 1) == 0 and bs <= 256:
        codes, losses = gptq_triton.static_columns(W, U, static[0], static[1], proc, scheme.qmax, bs)
        scales, zeros = static
    else:
        codes, scales, zeros, losses = _columns_torch(W, U, scheme, cfg, static, proc, gs, scale_dtype)
    if timers is not None:
        t2 = _sync_time(W.device)
        timers["cholesky"] = timers.get("cholesky", 0.0) + t1 - t0
        timers["columns"] = timers.get("columns", 0.0) + t2 - t1
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if static is None:
            g_idx = col_group[inv].to(torch.int32)  # original column c was processed at position inv[c]
    if cfg.refit and static is not None:
        W0 = weight.detach().to(torch.float32, copy=True)
        W0[:, dead] = 0
        scales = refit_scales(W0, codes, scales, zeros, H, scale_dtype=scale_dtype)
    qw = QuantizedWeight(codes.to(torch.uint8), scales.to(scale_dtype), zeros.to(torch.uint8), scheme, g_idx)
    stats = GPTQStats(float(losses.sum()), damp, int(dead.sum()), losses.cpu())
    log.debug("%s: GPTQ loss %.4g (damp %.3g, %d dead columns)", name, stats.loss, damp, stats.dead_columns)
    return qw, stats


def _columns_torch(W: torch.Tensor, U: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig,
                   static: tuple[torch.Tensor, torch.Tensor] | None, proc: torch.Tensor, gs: int,
                   scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column loop in torch ops (CPU, or GPUs without Triton; dynamic groups everywhere).

    Returns ``(codes, scales (out, G), zeros (out, G), row losses)`` with ``codes`` in processing order.
    """
    out, cols = W.shape
    groups = scheme.n_groups(cols)
    codes = torch.zeros_like(W)
    scales = torch.zeros(out, groups, device=W.device)
    zeros = torch.zeros(out, groups, device=W.device)
    proc_group = proc.tolist()  # host ints: no device syncs in the loop
    losses = torch.zeros(out, device=W.device)
    scale = zero = torch.zeros(out, device=W.device)
    qmax = scheme.qmax
    bs = cfg.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if static is not None:  # fixed per-column parameters: one (graph-replayable) call per block
            Q1 = torch.empty_like(W1)
            idx = proc[i1:i2]
            run_block_columns(W1, U1, static[0][:, idx], static[1][:, idx], qmax, Q1, Err1, cfg.cuda_graphs)
            codes[:, i1:i2] = Q1
        else:
            for i in range(i2 - i1):
                j = i1 + i
                g = proc_group[j]
                if j % gs == 0:  # dynamic group: fit on the current (already updated) columns j .. j+gs
                    cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs].unsqueeze(1)
                    s, z, _ = fit_groups(cur, scheme, search=cfg.search, scale_dtype=scale_dtype)
                    scale, zero = s[:, 0, 0], z[:, 0, 0]
                    scales[:, g], zeros[:, g] = scale, zero
                w = W1[:, i]
                q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
                codes[:, j] = q
                err = (w - scale * (q - zero)) / U1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
        losses += Err1.square().sum(1) / 2
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if static is not None:
        scales, zeros = static
    return codes, scales, zeros, losses
