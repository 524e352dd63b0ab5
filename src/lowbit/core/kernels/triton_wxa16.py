"""Triton W4A16 / W8A16 matmuls on tile-interleaved weights (:mod:`lowbit.core.kernels.tiles`).

``y (M, N) = x (M, K) W_hat^T + b`` with ``W_hat[n, k] = s[g, n] (q[n, k] - z[g, n])``, ``g = k // GS``
(``GS = Kp`` per channel), bf16 or fp16 activations, float32 accumulation, output in ``x``'s dtype.

Unpacking (both kernels): a tile row is 32 int32 words; slot ``s`` of those words holds the 32
consecutive codes ``k = t*TILE + 32 s + w``. Code ``s`` of a word sits at bit ``b s``; a word's high
half-word is ``hi = w >> 16`` (one shift per word), so every code is a masked field of ``w`` or
``hi`` at bit ``b p``, ``p = s mod 16/b``. OR-ing the float32 bits of ``2^23`` (``0x4B000000``)
into the masked field gives the float ``2^23 + q 2^(b p)`` exactly (the field stays inside the
23-bit mantissa), and subtracting ``2^23 + z 2^(b p)`` leaves ``(q - z) 2^(b p)`` exactly: one
LOP3 and one FADD a weight, no shift, no int-to-float conversion (a quarter-rate unit on Hopper).
The factor ``2^(b p)`` is undone on the activations (``x 2^(-b p)``, exact: a power of two).
Every 32-element chunk lies in one group (group sizes are multiples of 32), so each chunk's
partial sums are scaled once::

    part  = sum_{chunks c of group g} (q_c - z_g) * x_c        exact integers times x, float32
    acc  += part * s_g                                          once per group (CPG chunks)

With ``EVEN`` (``K`` a whole number of tiles, ``N`` of row blocks, every split's tiles of steps)
the kernels load without masks, so activation loads are vectorised too.

* GEMV (``M = 1``, CUDA cores): a program owns ``BN`` rows and ``U`` tiles per step; ``part`` and
  ``acc`` are ``(BN, U, 32)`` element-wise accumulators, reduced across lanes once at the end.
* GEMM (``M >= 2``, tensor cores): a program owns a ``(BM, BN)`` output tile; each chunk's
  ``q - z`` (small integers, exact in bf16/fp16) goes through ``tl.dot`` with the activations.

Split-K (``n_splits > 1``): programs along K add float32 partials into a shared workspace with
atomics; the last to arrive (an atomic counter per output tile) writes ``y`` and zeroes the
workspace and its counter again, so no memset is needed between calls (one stream at a time).
"""

from __future__ import annotations

import torch

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _field(lo, hi, S: tl.constexpr, BITS: tl.constexpr):
        """``2^23 + q 2^(BITS p)`` as float32, exactly, for slot ``S`` (``p = S mod 16/BITS``; module docstring)."""
        PER: tl.constexpr = 16 // BITS
        mask: tl.constexpr = ((1 << BITS) - 1) << (BITS * (S % PER))
        if S < PER:
            f = ((lo & mask) | 0x4B000000).to(tl.float32, bitcast=True)
        else:
            f = ((hi & mask) | 0x4B000000).to(tl.float32, bitcast=True)
        return f

    @triton.jit
    def _finish(y, offs, mask, rn, nm, y_ptr, ws_ptr, wsi_ptr, cnt_ptr, b_ptr, tile_id, n_splits,
                SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Store ``y`` (float32, any 2-D shape ``(R, BN)``), directly or through the split-K workspace."""
        if SPLIT:
            tl.atomic_add(ws_ptr + offs, y, mask=mask)  # acq_rel: complete before the counter below
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile_id, 1)
            if arrived == n_splits - 1:  # the last program of this tile: every partial is in
                # read-and-zero through the workspace's int32 view (bit pattern of 0.0 is 0)
                y = tl.atomic_xchg(wsi_ptr + offs, tl.zeros_like(offs), mask=mask).to(tl.float32, bitcast=True)
                if HAS_BIAS:
                    y += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile_id, 0)
        else:
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                     N, K, G, n_tiles, tiles_per_split, n_splits,
                     BITS: tl.constexpr, GS: tl.constexpr, CPG: tl.constexpr, ASYM: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BN: tl.constexpr, U: tl.constexpr, SPLIT: tl.constexpr,
                     EVEN: tl.constexpr):
        T: tl.constexpr = 32
        E: tl.constexpr = 32 // BITS
        PER: tl.constexpr = 16 // BITS
        TILE: tl.constexpr = E * T
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        nm = rn < N
        ou = tl.arange(0, U)
        ow = tl.arange(0, T)
        wrow = w_ptr + rn.to(tl.int64)[:, None, None] * (n_tiles * T) + ow[None, None, :]
        acc = tl.zeros((BN, U, T), dtype=tl.float32)
        t_lo = pid_k * tiles_per_split
        t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
        # register double buffer: the next step's words are in flight while this step computes
        if EVEN:
            nxt = tl.load(wrow + ((t_lo + ou) * T)[None, :, None])
        else:
            nmask = nm[:, None, None] & ((t_lo + ou) < t_hi)[None, :, None]
            nxt = tl.load(wrow + ((t_lo + ou) * T)[None, :, None], mask=nmask, other=0)
        for t0 in range(t_lo, t_hi, U):
            lo = nxt
            tiles = t0 + ou  # (U,)
            tm = tiles < t_hi
            pre = tl.minimum(t0 + U, t_hi - U) + ou  # clamped: the last step reloads its own tiles (EVEN)
            if EVEN:
                nxt = tl.load(wrow + (pre * T)[None, :, None])
            else:
                nxt = tl.load(wrow + ((t0 + U + ou) * T)[None, :, None],
                              mask=nm[:, None, None] & ((t0 + U + ou) < t_hi)[None, :, None], other=0)
            hi = (lo.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)  # logical shift
            part = tl.zeros((BN, U, T), dtype=tl.float32)
            for s in tl.static_range(E):
                kk = tiles[:, None] * TILE + s * T + ow[None, :]  # (U, T)
                if EVEN:
                    xs = tl.load(x_ptr + kk).to(tl.float32)
                else:
                    xs = tl.load(x_ptr + kk, mask=(kk < K) & tm[:, None], other=0.0).to(tl.float32)
                xs = xs * (1.0 / (1 << (BITS * (s % PER))))  # undo the field's 2^(b p), exactly
                g = (tiles * TILE + s * T) // GS  # (U,) group of this chunk
                gm = nm[:, None] & (tm & (g < G))[None, :]  # padding past K has no group
                if ASYM:
                    if s % CPG == 0:
                        if EVEN:
                            z = tl.load(z_ptr + g[None, :] * N + rn[:, None]).to(tl.float32)
                        else:
                            z = tl.load(z_ptr + g[None, :] * N + rn[:, None], mask=gm, other=0.0).to(tl.float32)
                    q = _field(lo, hi, s, BITS) - (8388608.0 + z * (1 << (BITS * (s % PER))))[:, :, None]
                else:
                    q = _field(lo, hi, s, BITS) - (8388608.0 + (1 << (BITS - 1 + BITS * (s % PER))))
                part += q * xs[None, :, :]
                if (s + 1) % CPG == 0:
                    if EVEN:
                        sc = tl.load(s_ptr + g[None, :] * N + rn[:, None]).to(tl.float32)
                    else:
                        sc = tl.load(s_ptr + g[None, :] * N + rn[:, None], mask=gm, other=0.0).to(tl.float32)
                    acc += part * sc[:, :, None]
                    part = tl.zeros((BN, U, T), dtype=tl.float32)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # (1, BN)
        _finish(y, rn[None, :], nm[None, :], rn, nm, y_ptr, ws_ptr, ws_ptr.to(tl.pointer_type(tl.int32)), cnt_ptr,
                b_ptr, pid_n, n_splits, SPLIT, HAS_BIAS)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                     M, N, K, G, stride_xm, n_tiles, tiles_per_split, n_splits,
                     BITS: tl.constexpr, GS: tl.constexpr, CPG: tl.constexpr, ASYM: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                     DOT_F32: tl.constexpr, EVEN: tl.constexpr):
        T: tl.constexpr = 32
        E: tl.constexpr = 32 // BITS
        PER: tl.constexpr = 16 // BITS
        TILE: tl.constexpr = E * T
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        nm = rn < N
        ow = tl.arange(0, T)
        wrow = w_ptr + rn.to(tl.int64)[:, None] * (n_tiles * T) + ow[None, :]
        xrow = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        t_lo = pid_k * tiles_per_split
        t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
        for t in range(t_lo, t_hi):  # no manual double buffer here: it measured slower (Triton pipelines this load)
            if EVEN:
                lo = tl.load(wrow + t * T)  # (BN, T)
            else:
                lo = tl.load(wrow + t * T, mask=nm[:, None], other=0)
            hi = (lo.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)  # logical shift
            part = tl.zeros((BM, BN), dtype=tl.float32)
            for s in tl.static_range(E):
                kk = t * TILE + s * T + ow  # (T,)
                xs = tl.load(xrow + kk[None, :], mask=mm[:, None] & (kk < K)[None, :], other=0.0)
                xs = (xs.to(tl.float32) * (1.0 / (1 << (BITS * (s % PER))))).to(xs.dtype)  # exact: a power of 2
                g = (t * TILE + s * T) // GS
                gm = nm & (rn * 0 + g < G)  # padding past K has no group
                if ASYM:
                    if s % CPG == 0:
                        z = tl.load(z_ptr + g * N + rn, mask=gm, other=0.0).to(tl.float32)
                    q = _field(lo, hi, s, BITS) - (8388608.0 + z * (1 << (BITS * (s % PER))))[:, None]
                else:
                    q = _field(lo, hi, s, BITS) - (8388608.0 + (1 << (BITS - 1 + BITS * (s % PER))))
                if DOT_F32:  # Triton's CPU interpreter: its bf16 dot is wrong (3.9), float32 is exact here too
                    part = tl.dot(xs.to(tl.float32), tl.trans(q), part)
                else:  # (q - z) 2^(b p): at most 8 significant bits, exact in bf16 / fp16
                    part = tl.dot(xs, tl.trans(q.to(xs.dtype)), part)
                if (s + 1) % CPG == 0:
                    sc = tl.load(s_ptr + g * N + rn, mask=gm, other=0.0).to(tl.float32)
                    acc += part * sc[None, :]
                    part = tl.zeros((BM, BN), dtype=tl.float32)
        offs = rm[:, None] * N + rn[None, :]
        mask = mm[:, None] & nm[None, :]
        _finish(acc, offs, mask, rn, nm, y_ptr, ws_ptr, ws_ptr.to(tl.pointer_type(tl.int32)), cnt_ptr, b_ptr,
                pid_m * tl.num_programs(0) + pid_n, n_splits, SPLIT, HAS_BIAS)


def _split(n_tiles: int, split: int, step: int) -> tuple[int, int]:
    """(tiles a split, splits): about ``split`` ranges of whole ``step``s of tiles."""
    per = -(-n_tiles // split)
    per = -(-per // step) * step
    return per, -(-n_tiles // per)


def launch_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, *,
                bits: int, gs: int, k: int, bn: int, u: int, split: int, num_warps: int,
                num_stages: int = 1) -> None:
    """One GEMV launch (``x (1, K)`` contiguous); ``split`` programs along K at most."""
    n, n_tiles = y.shape[-1], w.shape[1] // 32
    per, splits = _split(n_tiles, split, u)
    even = k * bits == w.shape[1] * 32 and n % bn == 0 and n_tiles % u == 0
    grid = (triton.cdiv(n, bn), splits)
    _gemv_kernel[grid](x, w, scales, scales if zeros is None else zeros, scales if bias is None else bias, y, ws, cnt,
                       n, k, scales.shape[0], n_tiles, per, splits, BITS=bits, GS=gs, CPG=min(gs // 32, 32 // bits),
                       ASYM=zeros is not None, HAS_BIAS=bias is not None, BN=bn, U=u, SPLIT=splits > 1, EVEN=even,
                       num_warps=num_warps, num_stages=num_stages)


def launch_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, *,
                bits: int, gs: int, k: int, bm: int, bn: int, split: int, num_warps: int,
                num_stages: int = 2) -> None:
    """One GEMM launch (``x (M, K)``, unit stride along K)."""
    m, n, n_tiles = x.shape[0], y.shape[-1], w.shape[1] // 32
    per, splits = _split(n_tiles, split, 1)
    even = k * bits == w.shape[1] * 32 and n % bn == 0
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
    _gemm_kernel[grid](x, w, scales, scales if zeros is None else zeros, scales if bias is None else bias, y, ws, cnt,
                       m, n, k, scales.shape[0], x.stride(0), n_tiles, per, splits, BITS=bits, GS=gs,
                       CPG=min(gs // 32, 32 // bits), ASYM=zeros is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn,
                       SPLIT=splits > 1, DOT_F32=x.device.type == "cpu", EVEN=even, num_warps=num_warps,
                       num_stages=num_stages)
