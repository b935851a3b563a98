"""Parallel INT8 quantization for :func:`fa_lab.attention_int8` (the rules of
:mod:`fa_lab.numerics.quant`, compiled).

``quant.quantize`` in NumPy (float64 temporaries) took 6.3 ms for one (1, 8, 2048, 64)
float32 array here, and ``quant.smooth_k`` 2.3 ms: with Q and K, ~15 ms, more than the
INT8 kernel's whole budget at that size. These compute the same values: per group of
``block`` rows, ``scale = max|x| / 127`` in float64 (1 for an all-zero group), ``xq =
clip(rint(x / scale), -127, 127)`` (by the reciprocal, division only near a tie:
:func:`_quantize_group`; 0.5 -> 0.22 ms per tensor above), and a flag for inf/NaN (so the
caller needs no separate ``isfinite`` pass); the smoothed K is ``k - mean`` (formed group by
group inside the quantizer, never as a whole copy) with the per-channel
mean over the tokens accumulated in float64 and rounded to k's dtype, as
:func:`fa_lab.numerics.quant.smooth_k` (the sum is taken in another order, so the mean may differ
from NumPy's pairwise sum in the last bit).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fa_lab.settings.config import CACHE


#: A quotient within this of a half-integer is recomputed by division (see
#: :func:`_quantize_group`): the product by the reciprocal is within ~3e-14 of the exact
#: quotient (|q| <= 127, two float64 roundings), so further from a tie it rounds alike.
NEAR_TIE = 1e-9


def abs_max(x):
    """``(max |x|, any inf or NaN)`` of a contiguous 1-D float array, on the float bits
    read as integers (sign cleared): one integer max that vectorizes (a float max
    reduction does not, without fastmath), and inf/NaN are exactly the keys at or above
    the all-ones exponent."""
    a = np.abs(x)
    return a.max(initial=0), not np.isfinite(x).all()


def _abs_max_impl(ity, exp_ones):
    def impl(x):
        b = x.view(ity)
        m = ity(0)
        for t in range(b.shape[0]):
            m = max(m, b[t] & ity(~(1 << (8 * b.itemsize - 1))))
        one = np.empty(1, ity)
        one[0] = m
        return np.float64(one.view(x.dtype)[0]), m >= exp_ones
    return impl


@overload(abs_max, jit_options={"error_model": "numpy"})
def _abs_max_overload(x):
    if x.dtype == types.float32:
        return _abs_max_impl(np.int32, np.int32(0x7F800000))
    if x.dtype == types.float64:
        return _abs_max_impl(np.int64, np.int64(0x7FF0000000000000))
    return None


@njit(cache=CACHE, error_model="numpy")
def _quantize_group(x, xq):
    """One group (``x`` flat, contiguous) -> ``xq``; returns ``(scale, underflow,
    nonfinite)``. ``rint(x * (1/scale))``: the same integers as ``rint(x / scale)``
    (division is ~3x slower here) except within :data:`NEAR_TIE` of a half-integer, where
    the group is redone by division."""
    n = x.shape[0]
    amax, nonfinite = abs_max(x)
    if nonfinite:
        return 1.0, 0, 1
    sc = amax / 127.0
    under = 1 if (amax > 0 and sc == 0) else 0
    if sc == 0:
        sc = 1.0
    inv = 1.0 / sc
    near = 0 if inv < np.inf else 1  # a subnormal scale: no finite reciprocal, divide
    for t in range(n if near == 0 else 0):
        y = np.float64(x[t]) * inv
        r = np.rint(y)
        near += 1 if abs(abs(y - r) - 0.5) < NEAR_TIE else 0
        xq[t] = np.int8(np.int32(min(max(r, -127.0), 127.0)))
    if near:
        for t in range(n):
            y = np.rint(np.float64(x[t]) / sc)
            xq[t] = np.int8(np.int32(min(max(y, -127.0), 127.0)))
    return sc, under, 0


@njit(cache=CACHE, parallel=True, error_model="numpy")
def quantize_blocks(x, block, xq, s, mean):
    """``x`` (R, N, d) C-contiguous -> ``xq`` int8 (R, N, d) and per-row float64 scales
    ``s`` (R, N), one scale per ``block`` consecutive rows. ``mean`` (R, d), or (0, d) for
    none: quantize ``x - mean`` (rounded to x's dtype, as :func:`channel_mean`'s caller
    would subtract it), computed group by group in a scratch that stays in cache instead
    of a smoothed copy of ``x``. Returns ``(underflow, nonfinite)``: how many groups need a
    scale float64 cannot hold (the caller then raises) and how many hold inf or NaN (the
    caller raises; nothing else is valid)."""
    R, N, d = x.shape
    rows = max(block, -(-128 // block) * block)  # rows per task: whole groups, >= 128
    nt = -(-N // rows)
    xf, qf = x.reshape(R, N * d), xq.reshape(R, N * d)
    smoothed = mean.shape[0] > 0
    under, bad = 0, 0
    for task in prange(R * nt):
        r, i0 = task // nt, (task % nt) * rows
        scratch = np.empty(block * d if smoothed else 0, x.dtype)
        for g0 in range(i0, min(i0 + rows, N), block):
            g1 = min(g0 + block, N)
            src = xf[r, g0 * d:g1 * d]
            if smoothed:
                src = _minus(src, mean[r], scratch[:(g1 - g0) * d])
            sc, u, nf = _quantize_group(src, qf[r, g0 * d:g1 * d])
            s[r, g0:g1] = sc
            under += u
            bad += nf
    return under, bad


@njit(cache=CACHE, error_model="numpy", inline="always")
def _minus(x, m, out):
    """``out`` = rows of ``x`` (flat, ``len(m)`` per row) minus ``m``, in x's dtype."""
    d = m.shape[0]
    for i in range(x.shape[0] // d):
        xi, oi = x[i * d:(i + 1) * d], out[i * d:(i + 1) * d]
        for t in range(d):
            oi[t] = xi[t] - m[t]
    return out


@njit(cache=CACHE, parallel=True, error_model="numpy")
def channel_mean(k, mean):
    """``mean`` (R, d) = the per-channel mean of ``k`` (R, N, d) over N, summed in float64
    and rounded to k's dtype (as :func:`fa_lab.numerics.quant.smooth_k`); the smoothed
    keys ``k - mean`` are formed by :func:`quantize_blocks` group by group."""
    R, N, d = k.shape
    for r in prange(R):
        acc = np.zeros(d, np.float64)
        for i in range(N):
            ki = k[r, i]
            for t in range(d):
                acc[t] += ki[t]
        for t in range(d):
            mean[r, t] = acc[t] / max(N, 1)
