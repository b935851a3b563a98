"""Parallel INT8 quantization for :func:`fa_lab.attention_int8` (the rules of
:mod:`fa_lab.quant`, compiled).

``quant.quantize`` in NumPy (float64 temporaries) took 6.3 ms for one (1, 8, 2048, 64)
float32 array here, and ``quant.smooth_k`` 2.3 ms: with Q and K, ~15 ms, more than the
INT8 kernel's whole budget at that size. These compute the same values: per group of
``block`` rows, ``scale = max|x| / 127`` in float64 (1 for an all-zero group), ``xq =
clip(rint(x / scale), -127, 127)``; the smoothed K is ``k - mean`` with the per-channel
mean over the tokens accumulated in float64 and rounded to k's dtype, as
:func:`fa_lab.quant.smooth_k` (the sum is taken in another order, so the mean may differ
from NumPy's pairwise sum in the last bit).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fa_lab.config import CACHE


@njit(cache=CACHE, error_model="numpy")
def _quantize_rows(x, i0, i1, xq, s):
    """Rows ``i0:i1`` of ``x`` (N, d) as one group; returns 1 if its scale underflows."""
    d = x.shape[1]
    amax = 0.0
    for i in range(i0, i1):
        xi = x[i]
        for t in range(d):
            amax = max(amax, abs(np.float64(xi[t])))
    sc = amax / 127.0
    bad = 1 if (amax > 0 and sc == 0) else 0
    if sc == 0:
        sc = 1.0
    for i in range(i0, i1):
        xi, qi = x[i], xq[i]
        s[i] = sc
        for t in range(d):
            y = np.rint(np.float64(xi[t]) / sc)
            qi[t] = np.int8(min(max(y, -127.0), 127.0))
    return bad


@njit(cache=CACHE, parallel=True, error_model="numpy")
def quantize_blocks(x, block, xq, s):
    """``x`` (R, N, d) -> ``xq`` int8 (R, N, d) and per-row float64 scales ``s`` (R, N),
    one scale per ``block`` consecutive rows. Returns how many groups needed a scale
    float64 cannot hold (the caller then raises)."""
    R, N, _ = x.shape
    nb = -(-N // block)
    bad = 0
    for task in prange(R * nb):
        r, i0 = task // nb, (task % nb) * block
        bad += _quantize_rows(x[r], i0, min(i0 + block, N), xq[r], s[r])
    return bad


@njit(cache=CACHE, parallel=True, error_model="numpy")
def smooth(k, ks, mean):
    """``ks = k - mean`` with ``mean`` (R, d) the per-channel mean of ``k`` (R, N, d) over
    N, summed in float64 and rounded to k's dtype (as :func:`fa_lab.quant.smooth_k`)."""
    R, N, d = k.shape
    for r in prange(R):
        acc = np.zeros(d, np.float64)
        for i in range(N):
            ki = k[r, i]
            for t in range(d):
                acc[t] += ki[t]
        for t in range(d):
            mean[r, t] = acc[t] / max(N, 1)
        mr = mean[r]
        for i in range(N):
            ki, ksi = k[r, i], ks[r, i]
            for t in range(d):
                ksi[t] = ki[t] - mr[t]
