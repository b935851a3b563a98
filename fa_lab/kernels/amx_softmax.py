"""The online softmax of the AMX kernels (:mod:`.amx`), in explicit 512-bit vectors.

The score tiles leave ``Q K^T`` in memory as raw products: int32 (INT8 path) or fp32
(bf16 path), one row of ``Bc`` per query. The score of key ``c`` is then ``S[c] rs sk[c]``
(``rs``: the row's scale times the softmax scale, ``sk``: the key's scale, 1 for bf16).

Two ways through a block:

* **fused** (a block with no mask and ``Bc`` a multiple of 32, ``rs > 0``): two passes
  over the raw row, never writing fp32 scores: (1) every row's max of ``S sk`` (then
  times ``rs``, which keeps the order since ``rs > 0``), (2) ``p = 2^(S sk (rs log2 e) -
  m log2 e)``, one FMA on top of the conversion, the row sum, and P written as bf16
  (``vcvtne2ps2bf16``): the form the ``P V`` tiles read;
* **general** (masks, the causal diagonal, a ragged last block): dequantize to fp32
  scores (:func:`dequantize`), apply the mask, then sage's softmax
  (:func:`fa_lab.kernels.vsoftmax.softmax`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from fa_lab.config import CACHE
from fa_lab.kernels.common import NEG_INF
from fa_lab.kernels.flash import bits_f32
from fa_lab.kernels.vsoftmax import vexp2_frac
from fa_lab.kernels.zmm import (hmax_i32, hsum_f32, vadd, vcvt2bf16, vcvt_f32, vfloor, vfma,
                                vload_f32, vload_i32, vmax_i32, vmax_nan, vmul, vorder_key,
                                vscalef, vsplat_f32, vstore, vsub, vzero_f32)

LOG2E = np.float32(1.4426950408889634)


def vload_score(S, c):
    """16 raw scores ``S[c:c + 16]`` as float32 (int32 converted, fp32 as they are)."""
    return S[c]


def _vload_i32_scores(S, c):
    return vcvt_f32(vload_i32(S, c))


def _vload_f32_scores(S, c):
    return vload_f32(S, c)


@overload(vload_score, inline="always")
def _vload_score_overload(S, c):
    return _vload_i32_scores if S.dtype == types.int32 else _vload_f32_scores


@njit(cache=CACHE, inline="always")
def vexp2_bf16(t, Pr):
    """``2^t`` in 16 lanes, ``t`` clamped at -160 (0 after scaling); degree-4 fraction."""
    t = vmax_nan(vsplat_f32(np.float32(-160.0)), t)
    ti = vfloor(t)
    return vscalef(vexp2_frac(vsub(t, ti), Pr), ti)


@njit(cache=CACHE, error_model="numpy", inline="always")
def row_max_scaled(Sr, sk, n):
    """The largest ``Sr[c] sk[c]`` for ``c < n`` (n a multiple of 32), on
    order-preserving int32 keys (a NaN wins)."""
    k0 = vorder_key(vsplat_f32(np.float32(-np.inf)))
    k1 = k0
    for c in range(0, n, 32):
        k0 = vmax_i32(k0, vorder_key(vmul(vload_score(Sr, c), vload_f32(sk, c))))
        k1 = vmax_i32(k1, vorder_key(vmul(vload_score(Sr, c + 16), vload_f32(sk, c + 16))))
    top = hmax_i32(vmax_i32(k0, k1))
    return bits_f32(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=CACHE, error_model="numpy", inline="always")
def row_exp_scaled(Sr, sk, n, a, b, Pr):
    """``Pr[c]`` = bf16 bits of ``2^(Sr[c] sk[c] a - b)`` for ``c < n`` (a multiple of
    32); returns their sum (fp32, before rounding)."""
    av, bv = vsplat_f32(a), vsplat_f32(-b)
    s0 = vzero_f32()
    s1 = s0
    for c in range(0, n, 32):
        p0 = vexp2_bf16(vfma(bv, vmul(vload_score(Sr, c), vload_f32(sk, c)), av), Pr)
        p1 = vexp2_bf16(vfma(bv, vmul(vload_score(Sr, c + 16), vload_f32(sk, c + 16)), av), Pr)
        s0, s1 = vadd(s0, p0), vadd(s1, p1)
        vstore(Pr, c, vcvt2bf16(p0, p1))
    return hsum_f32(vadd(s0, s1))


@njit(cache=CACHE, error_model="numpy", inline="always")
def new_max(x, m_old):
    """``(m_new, alpha)`` of the online softmax: NaN stays NaN, a row that saw only
    ``-inf`` keeps ``-inf`` (and uses 0 in the exponentials), alpha = 1 needs no exp."""
    mx = x if (x > m_old or x != x) else m_old
    m_use = mx if mx != NEG_INF else np.float32(0)
    return mx, np.float32(1) if m_old == m_use else np.float32(math.exp(m_old - m_use))


@njit(cache=CACHE, error_model="numpy")
def softmax_fused(Sraw, ld, br, n, sk, rs, m, l, alpha, P):
    """The fused path (module docstring) over rows ``r < br`` of stride ``ld``: all rows'
    maxima first, then their exponentials (no row waits on its own reduction)."""
    for r in range(br):
        mx, al = new_max(row_max_scaled(Sraw[r * ld:r * ld + n], sk, n) * rs[r], m[r])
        m[r], alpha[r] = mx, al
        l[r] *= al
    for r in range(br):
        m_use = m[r] if m[r] != NEG_INF else np.float32(0)
        l[r] += row_exp_scaled(Sraw[r * ld:r * ld + n], sk, n, rs[r] * LOG2E, m_use * LOG2E,
                               P[r * ld:r * ld + n])


@njit(cache=CACHE, error_model="numpy")
def dequantize(Sraw, ld, br, bc, sk, rs, S):
    """The general path's fp32 scores: ``S[r, c] = Sraw[r, c] rs[r] sk[c]`` (flat, stride
    ``ld``)."""
    for r in range(br):
        Sr, Rr, x = S[r * ld:r * ld + bc], Sraw[r * ld:r * ld + bc], rs[r]
        for c in range(bc):
            Sr[c] = np.float32(Rr[c]) * x * sk[c]
