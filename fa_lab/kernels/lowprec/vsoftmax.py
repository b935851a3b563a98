"""Sage's online softmax of one block: explicit 512-bit vectors (:mod:`.zmm`).

Per row of a block, ``flash``'s two fused passes: the row's max (on order-preserving
int32 keys, so a NaN wins), then ``p = 2^((s - m) log2 e)``, the row sum, and P written
as fp32 or as the bf16 bits the ``P V`` micro-kernel reads. The vector pass per 16
scores: subtract, multiply, clamp from below (``vmaxps``, keeping NaN), ``floor``,
the fraction's polynomial (4 FMAs for bf16 P, 6 for fp32), ``vscalefps`` (``p 2^floor``:
exactly 0 below 2^-149, so masked ``-inf`` scores give 0 with no compare) and one
``vcvtne2ps2bf16`` per 32 scores. A row's last ``bc mod 32`` scores run in the scalar
loop of the same rules (:func:`_row_tail`).

Measured on one core of the shared AMD EPYC (Zen 4) VM, one head, N=2048, d=64, bf16 P:
LLVM's auto-vectorized loop of the scalar code (integer bf16 rounding, two compares and
blends for the underflow/NaN rule, exponent built by shift and add) took 1.8 ms of the
head's softmax, this one 1.2 ms. On one 128 x 256 block (min of 15): 10.5 us with each
row's max then its exponentials as separate calls, 8.6 us with the row functions
inlined and all maxima first. In a row of 32K scores the exp pass alone runs at ~8
cycles per 16 scores (4.7 us) and the max pass at ~2 (1.1 us): the rest is per-row
work (reductions, loop set-up), which is why rows of 256 cost more.

Tiny values: the vector pass clamps at ``2^-160`` and ``vcvtne2ps2bf16`` flushes fp32
denormals to 0, where the scalar loop returns 0 below ``e^-87``: both are below any
value a row with its max at ``p = 1`` can notice (fully masked rows still give P = 0).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from fa_lab.settings.config import CACHE, FASTMATH
from fa_lab.kernels.common import (B0, B1, B2, B3, B4, E0, E1, E2, E3, E4, E5, E6, LOG2E,
                                   NEG_INF, exp2_poly)
from fa_lab.kernels.ladder.flash import bits_f32, f32_bits
from fa_lab.kernels.lowprec.microkernels import bf16_bits
from fa_lab.kernels.lowprec.zmm import (hmax_i32, hsum_f32, vadd, vcvt2bf16, vfloor, vfma, vload_f32,
                                vmax_i32, vmax_nan, vmul, vorder_key, vscalef, vsplat_f32,
                                vstore, vsub, vzero_f32)

def exp2_frac(f, Pr):
    """``2^f`` for f in [0, 1): degree 6 (fp32 ``Pr``) or degree 4 (bf16 ``Pr``)."""
    return 2.0 ** f


def _exp2_deg6(f, Pr):
    return exp2_poly(f)


def _exp2_deg4(f, Pr):
    p = B4  # Horner on EXP2_COEFFS_BF16, highest degree first
    p = p * f + B3
    p = p * f + B2
    p = p * f + B1
    return p * f + B0


@overload(exp2_frac, inline="always")
def _exp2_frac_overload(f, Pr):
    return _exp2_deg4 if Pr.dtype == types.uint16 else _exp2_deg6


def store_p(Pr, c, p):
    """``Pr[c] = p``: fp32 as is, or its bf16 bits (uint16 ``Pr``), rounded to nearest
    even as :func:`~fa_lab.kernels.lowprec.microkernels.round_bf16` (p >= 0 or NaN here)."""
    Pr[c] = p


def _store_f32(Pr, c, p):
    Pr[c] = p


def _store_bf16(Pr, c, p):
    Pr[c] = np.uint16(bf16_bits(np.uint32(f32_bits(p))))


@overload(store_p, inline="always")
def _store_p_overload(Pr, c, p):
    if Pr.dtype == types.uint16:
        return _store_bf16
    return _store_f32


def vexp2_frac(f, Pr):
    """``2^f`` for f in [0, 1) in 16 lanes: degree 6 (fp32 ``Pr``) or 4 (bf16 ``Pr``)."""
    return 2.0 ** f


def _vexp2_deg6(f, Pr):
    p = vfma(vsplat_f32(E5), f, vsplat_f32(E6))
    p = vfma(vsplat_f32(E4), p, f)
    p = vfma(vsplat_f32(E3), p, f)
    p = vfma(vsplat_f32(E2), p, f)
    p = vfma(vsplat_f32(E1), p, f)
    return vfma(vsplat_f32(E0), p, f)


def _vexp2_deg4(f, Pr):
    p = vfma(vsplat_f32(B3), f, vsplat_f32(B4))
    p = vfma(vsplat_f32(B2), p, f)
    p = vfma(vsplat_f32(B1), p, f)
    return vfma(vsplat_f32(B0), p, f)


@overload(vexp2_frac, inline="always")
def _vexp2_frac_overload(f, Pr):
    return _vexp2_deg4 if Pr.dtype == types.uint16 else _vexp2_deg6


def store_p32(Pr, c, p0, p1):
    """``Pr[c:c + 32]`` = the 32 values of ``p0, p1``: fp32 as they are, or bf16 bits."""
    Pr[c] = p0


def _store32_f32(Pr, c, p0, p1):
    vstore(Pr, c, p0)
    vstore(Pr, c + 16, p1)


def _store32_bf16(Pr, c, p0, p1):
    vstore(Pr, c, vcvt2bf16(p0, p1))


@overload(store_p32, inline="always")
def _store_p32_overload(Pr, c, p0, p1):
    return _store32_bf16 if Pr.dtype == types.uint16 else _store32_f32


@njit(cache=CACHE, inline="always")
def _vexp2(t, Pr):
    """``2^t`` in 16 lanes; ``t`` clamped at -160 (the result then underflows to 0)."""
    t = vmax_nan(vsplat_f32(np.float32(-160.0)), t)
    ti = vfloor(t)
    return vscalef(vexp2_frac(vsub(t, ti), Pr), ti)


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _row_tail(Sr, c0, m_use, Pr):
    """Scores ``c0:`` of a row in scalar code (the same rules); returns their sum."""
    total = np.float32(0)
    for c in range(c0, Sr.shape[0]):
        y = Sr[c] - m_use
        t = max(y * LOG2E, np.float32(-126.0))
        ti = np.floor(t)
        f = t - ti
        p = exp2_frac(f, Pr) * bits_f32((np.int32(ti) + np.int32(127)) << np.int32(23))
        p = p if y >= np.float32(-87.0) else (np.float32(0) if y < np.float32(-87.0) else y)
        store_p(Pr, c, p)
        total += p
    return total


@njit(cache=CACHE, error_model="numpy", inline="always")
def row_max(Sr):
    """The largest of ``Sr`` (1-D, from index 0), on order-preserving int32 keys: a NaN
    (sign clear) wins; ``-inf`` for an empty row."""
    bc = Sr.shape[0]
    n32 = bc - bc % 32
    k0 = vorder_key(vsplat_f32(np.float32(-np.inf)))
    k1 = k0
    for c in range(0, n32, 32):
        k0 = vmax_i32(k0, vorder_key(vload_f32(Sr, c)))
        k1 = vmax_i32(k1, vorder_key(vload_f32(Sr, c + 16)))
    top = hmax_i32(vmax_i32(k0, k1))
    for c in range(n32, bc):
        i = f32_bits(Sr[c])
        top = max(top, np.int32(i ^ ((i >> np.int32(31)) & np.int32(0x7FFFFFFF))))
    return bits_f32(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=CACHE, error_model="numpy", inline="always")
def row_exp(Sr, m_use, Pr):
    """``Pr = 2^((Sr - m_use) log2 e)`` (fp32 or bf16 bits); returns the sum (fp32)."""
    bc = Sr.shape[0]
    n32 = bc - bc % 32
    mv, lv = vsplat_f32(m_use), vsplat_f32(LOG2E)
    s0 = vzero_f32()
    s1 = s0
    for c in range(0, n32, 32):
        p0 = _vexp2(vmul(vsub(vload_f32(Sr, c), mv), lv), Pr)
        p1 = _vexp2(vmul(vsub(vload_f32(Sr, c + 16), mv), lv), Pr)
        s0, s1 = vadd(s0, p0), vadd(s1, p1)
        store_p32(Pr, c, p0, p1)
    total = hsum_f32(vadd(s0, s1))
    if n32 < bc:
        total += _row_tail(Sr, n32, m_use, Pr)
    return total


@njit(cache=CACHE, error_model="numpy", inline="always")
def _new_max(x, m_old):
    """``(m_new, m_use, alpha)``: a row that saw only ``-inf`` uses 0 (P = 0); NaN stays
    NaN; once the running max settles it stays, and alpha = 1 needs no ``exp``."""
    mx = x if (x > m_old or x != x) else m_old
    m_use = mx if mx != NEG_INF else np.float32(0)
    return mx, m_use, np.float32(1) if m_old == m_use else np.float32(math.exp(m_old - m_use))


@njit(cache=CACHE, error_model="numpy")
def softmax_row(Sr, m_old, Pr):
    """One row of a block (``Sr``, ``Pr``: 1-D, ``bc`` long, from index 0): returns
    ``(m_new, alpha, rowsum)``; a row that saw only ``-inf`` uses 0 as its max (P = 0,
    and alpha = 0 while m_old is ``-inf``: acc and l are 0 then); NaN stays NaN."""
    mx, m_use, al = _new_max(row_max(Sr), m_old)
    return mx, al, row_exp(Sr, m_use, Pr)


@njit(cache=CACHE, error_model="numpy")
def softmax(S, ld, br, bc, m, l, alpha, P):
    """The online softmax of a block held in rows of stride ``ld`` (S and P flat),
    ``P`` zero past ``bc`` (the micro-kernel reads whole 32-key chunks). ``P`` float32,
    or uint16: the ``P V`` operand's bf16 bits, written in the same pass.

    All rows' maxima first, then all rows' exponentials: no row waits for its own max
    (a reduction) before its exp pass, so the CPU overlaps one row's work with the next
    (per row, max then exp: 1.39 ms per head; this order: see :mod:`.sage`)."""
    for r in range(br):
        mx, m_use, al = _new_max(row_max(S[r * ld:r * ld + bc]), m[r])
        m[r] = mx
        alpha[r] = al
        l[r] = al * l[r]
    for r in range(br):
        Pr = P[r * ld:(r + 1) * ld]
        m_use = m[r] if m[r] != NEG_INF else np.float32(0)
        l[r] += row_exp(S[r * ld:r * ld + bc], m_use, Pr[:bc])
        if bc < ld:
            Pr[bc:] = 0
