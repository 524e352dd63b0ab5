"""llama.cpp's scale searches (``ggml-quants.c``), bit-exact and vectorised over blocks.

Every function takes element-major groups ``x (n, B)`` (``B`` blocks of ``n`` values, see ``qcommon``;
numpy on the CPU, torch elsewhere) and returns the codes ``L (n, B)`` as integer-valued float32 plus
per-block scales ``(B,)``. The trial scales of a search run in C's order, each over all blocks at once;
the codes of the winning trial are rebuilt once at the end from its ``iscale`` (and ``min``).
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.gguf.qcommon import (
    GROUP_MAX_EPS,
    Array,
    abs_,
    amax,
    any_,
    clamp_,
    copy,
    div,
    empty,
    first_absmax,
    first_min,
    like,
    mul,
    nearest_f,
    nonzero,
    positive_max,
    rint_,
    seq_sum,
    seq_sum_from_first,
    stack,
    sub,
    take,
    where,
    wrap_u8,
)


def make_qx_quants(x: Array, nmax: int, qw: Array | None) -> tuple[Array, Array]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric codes ``L = nmax + clamp(round(x / s))``.

    Weights ``w = qw`` or ``x*x``. Start from ``iscale = -nmax / max`` (``max`` the signed value of largest
    magnitude), score ``sumlx^2 / suml2`` with ``sumlx = sum w*x*l``, ``suml2 = sum w*l*l``, and try
    ``iscale = -(nmax + 0.1*is) / max`` for ``is`` in -9..9 (not 0), keeping the first strictly better one.
    Returns ``L (n, B)`` in 0..2*nmax-1 (all 0 for a block with ``amax < 1e-15``) and ``scale (B,)``.
    (``|iscale*x| <= nmax + 1`` here, so rounding with ``rint`` is ``nearest_int``.)
    """
    amx, mx = first_absmax(x)
    zero = amx < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    # trial 0 is the start, iscale = -nmax / max; trials 1..18 are is = -9..9 without 0
    nums = [np.float32(-nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(i)) for i in range(-9, 10) if i]
    isc = div(like(np.array(nums, dtype=np.float32), x)[:, None], mx[None])  # (S, B)
    n_trials = isc.shape[0]
    sums = empty((n_trials, 2) + x.shape[1:], x)  # per trial: sumlx = sum (w*x)*l, suml2 = sum (w*l)*l
    weights = stack([wx, w])  # (2, n, B): one multiply makes both products
    l, t = empty(x.shape, x), empty(weights.shape, x)
    for s in range(n_trials):  # the trials are independent: only their pick below is sequential
        clamp_(rint_(mul(x, isc[s], out=l)), -nmax, nmax - 1)
        mul(weights, l[None], out=t)
        t[1] *= l
        sums[s] = seq_sum(t, axis=1)
    slx, sl2 = sums[:, 0], sums[:, 1]
    # C: scale = suml2 ? sumlx/suml2 : 0, best = scale*sumlx; then per trial, in order:
    # if (suml2 > 0 && sumlx*sumlx > best*suml2) { scale = sumlx/suml2; best = scale*sumlx; }
    scales = div(slx, sl2)
    scales[0] = where(sl2[0] != 0, scales[0], 0.0)
    bests = scales * slx
    keys = where(sl2 > 0, slx * slx, float("-inf"))
    best, last = bests[0], where(zero, 0, 0)
    for s in range(1, n_trials):
        better = keys[s] > best * sl2[s]
        best = where(better, bests[s], best)
        last = where(better, s, last)
    scale = take(scales, last, 0)
    L = clamp_(rint_(mul(x, take(isc, last, 0))), -nmax, nmax - 1) + nmax
    return where(zero[None], 0.0, L), where(zero, 0.0, scale)


def make_q3_quants(x: Array, nmax: int) -> tuple[Array, Array]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: codes from ``iscale = -nmax / max``, then up to 5
    passes of coordinate descent (weights ``x*x``), each element moved to ``round(x * sl2 / slx)`` of the others
    when that raises ``sumlx^2 / suml2``. Returns ``L (n, B)`` in 0..2*nmax-1 (0 for an all-zero block) and
    ``scale = sumlx / suml2 (B,)``.
    """
    amx, mx = first_absmax(x)
    zero = amx < GROUP_MAX_EPS
    iscale = div(float(-nmax), mx)
    L0 = clamp_(rint_(x * iscale), -nmax, nmax - 1)
    w = x * x
    sumlx = seq_sum((w * x) * L0)
    suml2 = seq_sum((w * L0) * L0)
    L, sumlx, suml2 = _descend(x, w, L0, sumlx, suml2, -nmax, nmax - 1, q3=True)
    scale = where(suml2 > 0, div(sumlx, suml2), 0.0)
    return where(zero[None], 0.0, L + nmax), where(zero, 0.0, scale)


def _descend(x: Array, w: Array, L: Array, sumlx: Array, suml2: Array, lo: float | None, hi: float,
             q3: bool) -> tuple[Array, Array, Array]:
    """The coordinate descent of ``make_q3_quants`` (``q3``) / ``make_qp_quants``: up to 5 passes; in a pass
    each element i in turn gets ``new = clamp(nearest_int(x*sl2/slx))`` from the sums without it, kept when
    ``slx'^2 * suml2 > sumlx^2 * sl2'``. q3 requires ``slx > 0`` and ``sl2' > 0``; qp ``slx > 0``, ``sl2 > 0``
    and stores codes as ``uint8_t``. A block whose pass changed nothing stops (C's ``break``); only the blocks
    still moving take part in the next pass. ``L (n, B)`` codes (float), sums ``(B,)`` -> updated copies.
    """
    L, sumlx, suml2 = copy(L), copy(sumlx), copy(suml2)
    wx = w * x
    act = None  # the blocks in this pass: None = all
    for _ in range(5):
        xa, wa, wxa = (x, w, wx) if act is None else (x[:, act], w[:, act], wx[:, act])
        La = L if act is None else L[:, act]
        sx, s2 = (sumlx, suml2) if act is None else (sumlx[act], suml2[act])
        changed = sx < float("-inf")  # all False
        for i in range(x.shape[0]):
            slx = sx - wxa[i] * La[i]
            sl2 = s2 - (wa[i] * La[i]) * La[i]
            new_l = clamp_(nearest_f(div(xa[i] * sl2, slx)), lo, hi)
            slx2 = slx + wxa[i] * new_l
            sl2b = sl2 + (wa[i] * new_l) * new_l
            keep = (slx > 0) & (new_l != La[i]) & ((slx2 * slx2) * s2 > (sx * sx) * sl2b)
            keep &= (sl2b > 0) if q3 else (sl2 > 0)
            La[i] = where(keep, new_l if q3 else wrap_u8(new_l), La[i])
            sx = where(keep, slx2, sx)
            s2 = where(keep, sl2b, s2)
            changed |= keep
        if act is None:
            sumlx, suml2 = sx, s2
            act = nonzero(changed)
        else:
            L[:, act], sumlx[act], suml2[act] = La, sx, s2
            act = act[changed]
        if act.shape[0] == 0:
            break
    return L, sumlx, suml2


def make_qkx_quants(x: Array, w: Array, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, exact: bool = False) -> tuple[Array, Array, Array]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (identical for given weights): asymmetric codes ``0..nmax``.

    ``min = min(0, min x)``; start from ``iscale = nmax / (max - min)`` and its weighted error
    ``sum w * e(scale*L + min - x)`` (``e = |.|`` with ``use_mad``, else squared). For each step ``is`` in
    0..nstep: codes ``l = clamp(round((rmin + rdelta*is + nmax) / (max - min) * (x - min)), 0, nmax)``, the
    weighted least-squares scale and min of ``x ~ scale*l + min`` (min clamped to <= 0), and their error;
    a strictly smaller error replaces scale, min and codes. The C loop reads the *current* min in later
    steps, so the steps run in order. Returns ``L (n, B)``, ``scale (B,)`` and ``the_min = -min (B,)``.

    Rounding uses ``rint``, equal to ``nearest_int`` while ``|iscale*(x - min)| <= 4194303``; blocks where
    a step may leave that range (tiny ranges make ``iscale`` overflow) are redone with ``exact``, which
    uses the bit-exact ``nearest_int``.
    """
    mn = first_min(x)
    xmin = mn
    mn = where(mn > 0, 0.0, mn)
    mx = amax(x, 0)
    flat = mx == mn

    def rnd(v: Array) -> Array:
        if exact:
            v[...] = nearest_f(v)
            return v
        return rint_(v)

    sum_w = seq_sum_from_first(w)
    sum_x = seq_sum_from_first(w * x)
    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    xm = x - mn
    la = clamp_(rnd(xm * iscale), 0, nmax)
    e = mul(la, scale)
    e += mn
    e -= x
    best = seq_sum(mul(abs_(e) if use_mad else mul(e, e, out=e), w, out=e))

    nums = like((np.float32(rmin) + np.float32(rdelta) * np.arange(nstep + 1, dtype=np.float32)) + np.float32(nmax), x)
    wl, wll, wlx = empty(x.shape, x), empty(x.shape, x), empty(x.shape, x)
    iscs, mns, scales = [iscale], [mn], [scale]  # per step: the iscale and min it used, its scale
    last = where(flat, 0, 0)  # index into those lists of the last accepted step (0: the start)
    for s in range(1, nstep + 2):
        isc = div(nums[s - 1], mx - mn)
        sub(x, mn, out=xm)
        clamp_(rnd(mul(xm, isc, out=la)), 0, nmax)
        mul(w, la, out=wl)
        mul(wl, la, out=wll)
        mul(wl, x, out=wlx)
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wll), seq_sum(wlx)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = where(pos, 0.0, this_min)
        this_scale = where(pos, div(sum_xl, sum_l2), this_scale)
        mul(la, this_scale, out=e)
        e += this_min
        e -= x
        cur = seq_sum(mul(abs_(e) if use_mad else mul(e, e, out=e), w, out=e))
        accept = (D > 0) & (cur < best)
        best = where(accept, cur, best)
        last = where(accept, s, last)
        iscs.append(isc)
        mns.append(mn)
        scales.append(this_scale)
        mn = where(accept, this_min, mn)
    # a step's nearest_int argument is bounded by |iscale| * max(max - min, min - min(x)) (its min, not x's)
    isc_all, mn_all = stack(iscs), stack(mns)
    bound = abs(isc_all) * where(mx - mn_all > mn_all - xmin, mx - mn_all, mn_all - xmin)
    unsafe = ~flat & ~(amax(where(bound == bound, bound, float("inf")), 0) < 4.0e6)
    pick_isc, pick_mn = take(isc_all, last, 0), take(mn_all, last, 0)
    scale = where(flat, 0.0, take(stack(scales), last, 0))
    L = clamp_(rnd(mul(x - pick_mn, pick_isc)), 0, nmax)
    L = where(flat[None], 0.0, L)
    the_min = -mn
    if not exact and any_(unsafe):
        idx = nonzero(unsafe)
        L[:, idx], scale[idx], the_min[idx] = make_qkx_quants(x[:, idx], w[:, idx], nmax, rmin, rdelta, nstep,
                                                              use_mad, exact=True)
    return L, scale, the_min


def make_qp_quants(x: Array, nmax: int, qw: Array) -> tuple[Array, Array]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: codes ``0..nmax`` for non-negative ``x`` (block scales).

    ``iscale = nmax / max``; try ``(nmax + 0.1*is) / max`` for ``is`` in -4..4 by ``sum w*(x - l/iscale)^2``
    (first strictly smaller wins), then up to 5 passes of coordinate descent on ``sumlx^2 / suml2``.
    ``L`` is C's ``uint8_t`` (a negative code wraps mod 256). Returns ``L (n, B)`` and ``sumlx / suml2 (B,)``
    (0 for a block with ``max < 1e-15``).
    """
    mx = positive_max(x, 0)  # C: max = MAX(max, x[i]) from 0; only compared with 1e-15 when it is 0
    zero = mx < GROUP_MAX_EPS
    iscale = div(float(nmax), mx)
    Lq = wrap_u8(nearest_f(x * iscale))
    diff = x - div(1.0, iscale) * Lq
    best = seq_sum((qw * diff) * diff)
    for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = div(float(np.float32(0.1) * np.float32(is_) + np.float32(nmax)), mx)
        lt = clamp_(nearest_f(x * iscale_is), None, nmax)
        diff = x - div(1.0, iscale_is) * lt
        mse = seq_sum((qw * diff) * diff)
        better = mse < best
        best = where(better, mse, best)
        iscale = where(better, iscale_is, iscale)
    lint = clamp_(nearest_f(x * iscale), None, nmax)
    sumlx = seq_sum((qw * x) * lint)
    suml2 = seq_sum((qw * lint) * lint)
    L, sumlx, suml2 = _descend(x, qw, wrap_u8(lint), sumlx, suml2, None, nmax, q3=False)
    scale = where(suml2 > 0, div(sumlx, suml2), 0.0)
    return where(zero[None], 0.0, L), where(zero, 0.0, scale)
