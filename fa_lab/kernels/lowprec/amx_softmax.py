"""The online softmax of the AMX kernels (:mod:`.amx`), in explicit 512-bit vectors.

The score tiles leave ``Q K^T`` in memory as raw products: int32 (INT8 path) or fp32
(bf16 path), one row of ``Bc`` per query. The score of key ``c`` is then ``S[c] rs sk[c]``
(``rs``: the row's scale times the softmax scale, ``sk``: the key's scale, 1 for bf16).

Two ways through a block:

* **fused** (no additive mask, ``rs > 0``, one key scale for the whole block, as
  per-block quantization with the kernel's ``Bc`` gives): two passes over the raw row,
  never writing fp32 scores: (1) every row's max of the raw ``S`` (``vpmaxsd`` on the
  int32 products: INT8 scores have no NaN; order-preserving keys for fp32), times ``rs
  sk`` (positive: the order is kept), (2) ``p = 2^(S (rs sk log2 e) - m log2 e)``: the
  conversion and one FMA, the exponential, the row sum, and P written as bf16
  (``vcvtne2ps2bf16``), the form the ``P V`` tiles read. On the causal diagonal each row
  stops at its own last visible key (a scalar tail, then zeros);
* **general** (a mask, a negative scale, keys scaled one by one): dequantize to fp32
  scores (:func:`dequantize`), apply the mask, then sage's softmax
  (:func:`fa_lab.kernels.lowprec.vsoftmax.softmax`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from fa_lab.settings.config import CACHE
from fa_lab.kernels.common import LOG2E, NEG_INF
from fa_lab.kernels.ladder.flash import f32_bits
from fa_lab.kernels.lowprec.microkernels import bf16_bits
from fa_lab.kernels.lowprec.vsoftmax import row_max as fp32_row_max
from fa_lab.kernels.lowprec.vsoftmax import vexp2_frac
from fa_lab.kernels.lowprec.zmm import (hmax_i32, hsum_f32, vadd, vcvt2bf16, vcvt_f32, vfloor, vfma,
                                vload_f32, vload_i32, vmax_i32, vmax_nan, vscalef,
                                vsplat_f32, vstore, vsub, vzero_f32)


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


def vexp2(t, S):
    """``2^t`` in 16 lanes, degree-4 fraction (P is rounded to bf16). fp32 scores (``S``
    float32) may be infinite: ``t`` is clamped at -160 first (0 after scaling); INT8
    scores are finite, and ``vscalefps`` alone underflows to 0."""
    return t


def _vexp2_int(t, S):
    ti = vfloor(t)
    return vscalef(vexp2_frac(vsub(t, ti), _BF16_TAG), ti)


def _vexp2_clamped(t, S):
    t = vmax_nan(vsplat_f32(np.float32(-160.0)), t)
    ti = vfloor(t)
    return vscalef(vexp2_frac(vsub(t, ti), _BF16_TAG), ti)


@overload(vexp2, inline="always")
def _vexp2_overload(t, S):
    return _vexp2_int if S.dtype == types.int32 else _vexp2_clamped


#: A uint16 array: selects the degree-4 fraction of :func:`~.vsoftmax.vexp2_frac`.
_BF16_TAG = np.zeros(1, np.uint16)


def row_max(Sr, n):
    """The largest of ``Sr[:n]`` as float32 (``-inf`` for ``n = 0``)."""
    return Sr[0]


def _row_max_i32(Sr, n):
    n32 = n - n % 32
    k0 = vload_i32(_INT_MIN, 0)
    k1 = k0
    for c in range(0, n32, 32):
        k0 = vmax_i32(k0, vload_i32(Sr, c))
        k1 = vmax_i32(k1, vload_i32(Sr, c + 16))
    top = hmax_i32(vmax_i32(k0, k1))
    for c in range(n32, n):
        top = max(top, Sr[c])
    return np.float32(top) if n > 0 else np.float32(-np.inf)


def _row_max_f32(Sr, n):
    return fp32_row_max(Sr[:n])


@overload(row_max, inline="always")
def _row_max_overload(Sr, n):
    return _row_max_i32 if Sr.dtype == types.int32 else _row_max_f32


_INT_MIN = np.full(16, np.iinfo(np.int32).min, np.int32)


@njit(cache=CACHE, error_model="numpy", inline="always")
def row_exp(Sr, n, nz, a, b, Pr):
    """``Pr[c]`` = bf16 bits of ``2^(Sr[c] a - b)`` for ``c < n``, 0 for ``n <= c < nz``;
    returns the sum of the unrounded values (fp32)."""
    n32 = n - n % 32
    av, bv = vsplat_f32(a), vsplat_f32(-b)
    s0 = vzero_f32()
    s1 = s0
    for c in range(0, n32, 32):
        p0 = vexp2(vfma(bv, vload_score(Sr, c), av), Sr)
        p1 = vexp2(vfma(bv, vload_score(Sr, c + 16), av), Sr)
        s0, s1 = vadd(s0, p0), vadd(s1, p1)
        vstore(Pr, c, vcvt2bf16(p0, p1))
    total = hsum_f32(vadd(s0, s1))
    for c in range(n32, n):
        t = np.float32(Sr[c]) * a - b
        p = np.float32(math.exp(t * LN2)) if t > -160 or t != t else np.float32(0)
        Pr[c] = bf16_of(p)
        total += p
    for c in range(n, nz):
        Pr[c] = 0
    return total


LN2 = np.float32(0.6931471805599453)


@njit(cache=CACHE, error_model="numpy", inline="always")
def bf16_of(x):
    """float32 ``x`` -> its bf16 bits (uint16), rounded to nearest even, NaN -> 0x7FC0:
    the micro-kernels' one rounding (:func:`~.microkernels.bf16_bits`) on its bits."""
    return np.uint16(bf16_bits(np.uint32(f32_bits(np.float32(x)))))


@njit(cache=CACHE, error_model="numpy", inline="always")
def new_max(x, m_old):
    """``(m_new, alpha)`` of the online softmax: NaN stays NaN, a row that saw only
    ``-inf`` keeps ``-inf`` (and uses 0 in the exponentials), alpha = 1 needs no exp."""
    mx = x if (x > m_old or x != x) else m_old
    m_use = mx if mx != NEG_INF else np.float32(0)
    return mx, np.float32(1) if m_old == m_use else np.float32(math.exp(m_old - m_use))


@njit(cache=CACHE, error_model="numpy")
def softmax_fused(Sraw, ld, br, bc, nz, ks, rs, first_hidden, m, l, alpha, P, skip=0):
    """The fused path (module docstring) over rows ``r < br`` of stride ``ld``: key scale
    ``ks`` for the whole block; row ``r`` sees keys ``c < min(bc, first_hidden + r)``
    (``first_hidden`` large when there is no causal cut) and gets P = 0 up to ``nz``. All
    rows' maxima first, then their exponentials (no row waits on its own reduction).
    ``skip`` (timing ablations only, the result is then not a softmax): 1 no exp pass,
    2 no max pass (a row's first score stands in for its max)."""
    for r in range(br):
        n = max(0, min(bc, first_hidden + r))
        if skip == 2:
            x = np.float32(Sraw[r * ld]) if n > 0 else np.float32(NEG_INF)
        else:
            x = row_max(Sraw[r * ld:r * ld + n], n)
        mx, al = new_max(x * (rs[r] * ks) if n > 0 else x, m[r])
        m[r], alpha[r] = mx, al
        l[r] *= al
    for r in range(br if skip != 1 else 0):
        n = max(0, min(bc, first_hidden + r))
        m_use = m[r] if m[r] != NEG_INF else np.float32(0)
        l[r] += row_exp(Sraw[r * ld:r * ld + nz], n, nz, rs[r] * ks * LOG2E, m_use * LOG2E,
                        P[r * ld:r * ld + nz])


@njit(cache=CACHE, error_model="numpy")
def dequantize(Sraw, ld, br, bc, sk, rs, S):
    """The general path's fp32 scores: ``S[r, c] = Sraw[r, c] rs[r] sk[c]`` (flat, stride
    ``ld``)."""
    for r in range(br):
        Sr, Rr, x = S[r * ld:r * ld + bc], Sraw[r * ld:r * ld + bc], rs[r]
        for c in range(bc):
            Sr[c] = np.float32(Rr[c]) * x * sk[c]
