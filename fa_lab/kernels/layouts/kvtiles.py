"""The ``quantized`` KV-cache kernel's tile products in explicit 512-bit vectors
(:mod:`.quantized` holds the kernel): a cached row's 16-channel chunk dequantized in a
register (:func:`chunk`, compiled per cache dtype: float32 read as it is, int8 widened and
scaled, int4's nibbles shifted out), the scores of four query rows at a time in fp32 FMAs
(:func:`vscores`) or in int8 dot products against the int8 keys (:func:`vscores_vnni`,
``vpdpbusd``; the queries quantized per row by :func:`quantize_queries`), ``P V`` with
eight accumulators in registers (:func:`vaccumulate`), and software prefetch of the rows
read next. The generic vector operations compile on any x86 CPU; ``vpdpbusd`` only when
the VNNI variant is called (the query dtype picks it).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from fa_lab.settings.config import CACHE
from fa_lab.kernels.lowprec.zmm import (dpbusd, hsum4, hsum_f32, prefetch, vbcast32,
                                        vcvt_f32, vfma, vload_bytes, vload_f32, vload_i32,
                                        vmul, vnib_hi, vnib_lo, vsplat_f32, vstore,
                                        vxor_i32, vzero_f32, vzero_i32)


def chunk(x, sk, c, b, hi):
    """f32x16: channels ``c .. c + 15`` of the flat cached row ``x``, dequantized with
    their group's scale ``sk``: float32 reads ``x[c]``; int8 the 16 bytes at ``c``; int4 the
    low (``hi`` False) or high nibbles of the 16 bytes at ``b`` (compiled per dtype like
    :func:`load_tile`; the caller keeps group arithmetic, and its divisions, out of the
    inner loops)."""


@njit(cache=CACHE, inline="always")
def chunk_f32(x, sk, c, b, hi):
    return vload_f32(x, c)


@njit(cache=CACHE, inline="always")
def chunk_int8(x, sk, c, b, hi):
    return vmul(vcvt_f32(vload_bytes(x, c)), vsplat_f32(sk))


@njit(cache=CACHE, inline="always")
def chunk_int4(x, sk, c, b, hi):
    v = vload_bytes(x, b)
    return vmul(vcvt_f32(vnib_hi(v) if hi else vnib_lo(v)), vsplat_f32(sk))


@overload(chunk, jit_options={"cache": CACHE})
def _chunk_overload(x, sk, c, b, hi):
    if x.dtype == types.int8:
        return lambda x, sk, c, b, hi: chunk_int8(x, sk, c, b, hi)
    if x.dtype == types.uint8:
        return lambda x, sk, c, b, hi: chunk_int4(x, sk, c, b, hi)
    return lambda x, sk, c, b, hi: chunk_f32(x, sk, c, b, hi)


@njit(cache=CACHE, inline="always")
def _where(c, g):
    """Chunk ``c``'s group, its byte in an int4 row, and whether it is the high half."""
    k = c // g
    j, half = c - k * g, g // 2
    hi = j >= half
    return k, k * half + (j - half if hi else j), hi


@njit(cache=CACHE, inline="always")
def _prefetch_rows(X, t, n):
    """Prefetch rows ``t .. t + n - 1`` of the C-contiguous tile ``X`` (rows past its end
    too: the next tile's), line by line: the hardware prefetcher alone left a 32k-token
    int8 decode 1.5x slower."""
    row = X.shape[1]
    for c in range(t * row, (t + n) * row, 64 // X.itemsize):
        prefetch(X, c)


@njit(cache=CACHE, error_model="numpy")
def vscores(Qf, d, K, Ks, g, S, V):
    """``S[r, t] = Q[r] . K[t]``: two keys by four rows at a time in eight zmm
    accumulators (each key's chunk dequantized once, in a register; two keys give the
    FMA chains room: one key's four chains ran at half the speed), then the rest."""
    R, bc = S.shape
    R4, bc2 = R - R % 4, bc - bc % 2
    G, half = d // g, g // 2
    for t in range(0, bc2, 2):
        x, s, y, u = K[t], Ks[t], K[t + 1], Ks[t + 1]
        _prefetch_rows(K, t + 16, 2)  # what this task reads next: keys 16 rows on (the next
        _prefetch_rows(V, t, 2)  # tile's first ones at the end), this tile's values
        for r0 in range(0, R4, 4):
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = vzero_f32()
            for k in range(G):
                sk, uk = s[k], u[k]
                for j in range(0, g, 16):
                    c, hi = k * g + j, j >= half
                    bj = k * half + (j - half if hi else j)
                    kx, ky = chunk(x, sk, c, bj, hi), chunk(y, uk, c, bj, hi)
                    q = vload_f32(Qf, r0 * d + c)
                    a0, b0 = vfma(a0, q, kx), vfma(b0, q, ky)
                    q = vload_f32(Qf, (r0 + 1) * d + c)
                    a1, b1 = vfma(a1, q, kx), vfma(b1, q, ky)
                    q = vload_f32(Qf, (r0 + 2) * d + c)
                    a2, b2 = vfma(a2, q, kx), vfma(b2, q, ky)
                    q = vload_f32(Qf, (r0 + 3) * d + c)
                    a3, b3 = vfma(a3, q, kx), vfma(b3, q, ky)
            S[r0, t], S[r0 + 1, t], S[r0 + 2, t], S[r0 + 3, t] = hsum4(a0, a1, a2, a3)
            S[r0, t + 1], S[r0 + 1, t + 1], S[r0 + 2, t + 1], S[r0 + 3, t + 1] = \
                hsum4(b0, b1, b2, b3)
    for t in range(bc):
        x, s = K[t], Ks[t]
        for r in range(0 if t >= bc2 else R4, R):
            a0 = vzero_f32()
            for k in range(G):
                sk = s[k]
                for j in range(0, g, 16):
                    c, hi = k * g + j, j >= half
                    kv = chunk(x, sk, c, k * half + (j - half if hi else j), hi)
                    a0 = vfma(a0, vload_f32(Qf, r * d + c), kv)
            S[r, t] = hsum_f32(a0)


#: Four bytes of 0x80: ``k ^ 0x80`` is ``k + 128`` as an unsigned byte (vpdpbusd's left
#: operand).
_FLIP = np.full(4, 0x80, np.uint8)


@njit(cache=CACHE, error_model="numpy")
def vscores_vnni(Q8, qsc, corr, d, K, Ks, S, V):
    """``S[r, t]`` from int8 dot products (``vpdpbusd``, 64 per instruction): keys as
    ``k + 128`` (unsigned), queries quantized per row (``Q8``, scale ``qsc``); ``corr[r] =
    128 sum_c Q8[r, c]`` removes the offset; ``S = (dot - corr) qsc[r] Ks[t]``. One scale
    per key (``Ks`` ``(bc, 1)``), ``d % 64 == 0``."""
    R, bc = S.shape
    R4 = R - R % 4
    flip = vbcast32(_FLIP, 0)
    for t in range(bc):
        x, st = K[t], Ks[t, 0]
        _prefetch_rows(K, t + 16, 1)
        _prefetch_rows(V, t, 1)
        for r0 in range(0, R4, 4):
            a0 = a1 = a2 = a3 = vzero_i32()
            for c in range(0, d, 64):
                kv = vxor_i32(vload_i32(x, c), flip)
                a0 = dpbusd(a0, kv, vload_i32(Q8, r0 * d + c))
                a1 = dpbusd(a1, kv, vload_i32(Q8, (r0 + 1) * d + c))
                a2 = dpbusd(a2, kv, vload_i32(Q8, (r0 + 2) * d + c))
                a3 = dpbusd(a3, kv, vload_i32(Q8, (r0 + 3) * d + c))
            s0, s1, s2, s3 = hsum4(vcvt_f32(a0), vcvt_f32(a1), vcvt_f32(a2), vcvt_f32(a3))
            S[r0, t] = (s0 - corr[r0]) * qsc[r0] * st
            S[r0 + 1, t] = (s1 - corr[r0 + 1]) * qsc[r0 + 1] * st
            S[r0 + 2, t] = (s2 - corr[r0 + 2]) * qsc[r0 + 2] * st
            S[r0 + 3, t] = (s3 - corr[r0 + 3]) * qsc[r0 + 3] * st
        for r in range(R4, R):
            a0 = vzero_i32()
            for c in range(0, d, 64):
                a0 = dpbusd(a0, vxor_i32(vload_i32(x, c), flip), vload_i32(Q8, r * d + c))
            S[r, t] = (hsum_f32(vcvt_f32(a0)) - corr[r]) * qsc[r] * st


def scores_tile(Qf, Q8, qsc, corr, d, K, Ks, g, S, V):
    """The scores of one tile on the explicit-vector path: fp32 FMAs on dequantized
    chunks (``Q8`` a float32 placeholder), or int8 dot products (``Q8`` the int8
    queries: the VNNI variant, compiled only when called so)."""


@overload(scores_tile, jit_options={"cache": CACHE})
def _scores_tile_overload(Qf, Q8, qsc, corr, d, K, Ks, g, S, V):
    if Q8.dtype == types.int8:
        return lambda Qf, Q8, qsc, corr, d, K, Ks, g, S, V: vscores_vnni(
            Q8, qsc, corr, d, K, Ks, S, V)
    return lambda Qf, Q8, qsc, corr, d, K, Ks, g, S, V: vscores(Qf, d, K, Ks, g, S, V)


@njit(cache=CACHE, error_model="numpy")
def vaccumulate(accf, d_v, alpha, P, V, Vs, g):
    """``acc[r] = alpha[r] acc[r] + sum_t P[r, t] V[t]``, 32 channels of four rows (eight
    zmm accumulators) held in registers across the tile's keys, the rest row by row."""
    R, bc = P.shape
    R4 = R - R % 4
    for c0 in range(0, d_v, 32):
        ka, ba, ha = _where(c0, g)
        kb, bb, hb = _where(c0 + 16, g)
        for r0 in range(0, R4, 4):
            o0, o1, o2, o3 = r0 * d_v + c0, (r0 + 1) * d_v + c0, (r0 + 2) * d_v + c0, \
                (r0 + 3) * d_v + c0
            s0, s1 = vsplat_f32(alpha[r0]), vsplat_f32(alpha[r0 + 1])
            s2, s3 = vsplat_f32(alpha[r0 + 2]), vsplat_f32(alpha[r0 + 3])
            x0, y0 = vmul(vload_f32(accf, o0), s0), vmul(vload_f32(accf, o0 + 16), s0)
            x1, y1 = vmul(vload_f32(accf, o1), s1), vmul(vload_f32(accf, o1 + 16), s1)
            x2, y2 = vmul(vload_f32(accf, o2), s2), vmul(vload_f32(accf, o2 + 16), s2)
            x3, y3 = vmul(vload_f32(accf, o3), s3), vmul(vload_f32(accf, o3 + 16), s3)
            for t in range(bc):
                x, s = V[t], Vs[t]
                va, vb = chunk(x, s[ka], c0, ba, ha), chunk(x, s[kb], c0 + 16, bb, hb)
                p = vsplat_f32(P[r0, t])
                x0, y0 = vfma(x0, p, va), vfma(y0, p, vb)
                p = vsplat_f32(P[r0 + 1, t])
                x1, y1 = vfma(x1, p, va), vfma(y1, p, vb)
                p = vsplat_f32(P[r0 + 2, t])
                x2, y2 = vfma(x2, p, va), vfma(y2, p, vb)
                p = vsplat_f32(P[r0 + 3, t])
                x3, y3 = vfma(x3, p, va), vfma(y3, p, vb)
            vstore(accf, o0, x0)
            vstore(accf, o0 + 16, y0)
            vstore(accf, o1, x1)
            vstore(accf, o1 + 16, y1)
            vstore(accf, o2, x2)
            vstore(accf, o2 + 16, y2)
            vstore(accf, o3, x3)
            vstore(accf, o3 + 16, y3)
        for r in range(R4, R):
            o = r * d_v + c0
            sr = vsplat_f32(alpha[r])
            x0, y0 = vmul(vload_f32(accf, o), sr), vmul(vload_f32(accf, o + 16), sr)
            for t in range(bc):
                x, s = V[t], Vs[t]
                p = vsplat_f32(P[r, t])
                x0 = vfma(x0, p, chunk(x, s[ka], c0, ba, ha))
                y0 = vfma(y0, p, chunk(x, s[kb], c0 + 16, bb, hb))
            vstore(accf, o, x0)
            vstore(accf, o + 16, y0)


@njit(cache=CACHE, error_model="numpy")
def _quantize_rows_int8(Q):
    """Each row of ``Q`` as int8 (flat), its scale ``max|row| / 127`` and ``128 sum(row)``."""
    R, d = Q.shape
    Q8 = np.empty(R * d, np.int8)
    qsc = np.ones(R, np.float32)
    corr = np.zeros(R, np.float32)
    for r in range(R):
        top = np.float32(0)
        for c in range(d):
            top = max(top, abs(Q[r, c]))
        s = top / np.float32(127) if top > 0 else np.float32(1)
        total = 0
        for c in range(d):
            v = np.int8(np.rint(Q[r, c] / s))
            Q8[r * d + c] = v
            total += np.int32(v)
        qsc[r], corr[r] = s, np.float32(128 * total)
    return Q8, qsc, corr


@njit(cache=CACHE)
def _no_int8_rows(Q):
    one = np.ones(1, np.float32)
    return np.zeros(1, np.float32), one, one


def quantize_queries(Q, q8_like):
    """``(Q8, qsc, corr)`` for the VNNI variant (``q8_like`` int8), or float32
    placeholders for the fp32 path (compiled per ``q8_like``'s dtype)."""


@overload(quantize_queries, jit_options={"cache": CACHE})
def _quantize_queries_overload(Q, q8_like):
    if q8_like.dtype == types.int8:
        return lambda Q, q8_like: _quantize_rows_int8(Q)
    return lambda Q, q8_like: _no_int8_rows(Q)
