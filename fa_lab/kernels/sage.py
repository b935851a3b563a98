"""SageAttention-style INT8 attention on the micro-kernels of :mod:`.microkernels`.

Per (b, h, query block of ``Br`` rows), over key blocks of ``Bc`` keys (causal blocks past
the diagonal skipped), FlashAttention-2's loop with:

1. ``S32 = Qi Kj^T`` in int32 by the score micro-kernel (8 rows x 32 keys in registers):
   ``vpdpbusd`` on uint8 ``Q + 128`` and int8 ``K``, the accumulators starting at
   ``-128 sum_t K[c, t]`` (precomputed per key when packing), or ``vpmaddwd`` on int16;
2. ``S = S32 * (s_q scale) * s_k`` in fp32 in registers (per-block scales matched to
   the tiles, as SageAttention), then the mask and causal diagonal (``mask_block``);
3. the online softmax in fp32 (``flash``'s two fused passes; P written as bf16 bits);
4. ``acc = alpha acc + P Vj`` by the ``P V`` micro-kernel (4 rows x 32 channels): P
   rounded to bf16 and ``V`` stored bf16 (``vdpbf16ps``, fp32 accumulate), or fp32 FMAs.

Packing (once per call, parallel): Q to its row layout, K and V per key block padded to
32 keys (so any ``Bc`` works), the key scales and corrections beside them, and one flag per
V block saying whether it holds NaN/inf. A masked block (causal diagonal, or a mask)
whose V holds NaN/inf uses a loop that skips hidden keys (the NaN rule of
:mod:`fa_lab.reference`: a hidden value never reaches a row, ``0 * NaN`` is NaN).

float32 only; which instructions run is chosen by :mod:`fa_lab.cpu_features` (the
packed dtypes then select the compiled micro-kernel).

Versions, measured on one core of a shared AMD EPYC (Zen 4) VM, H=2, N=2048, d=64,
bf16 ``P V``, min of 11 calls (``flash``: 26.2 ms): first version (4 x 32 score tile, a
separate int32 -> float pass and a bf16 rounding pass, 64 x 128 tiles) 14.9 ms;
dequantizing in the micro-kernel's registers and writing bf16 from the softmax: no
measurable change; a degree-4 ``exp2`` when P is bf16: softmax 2.08 -> 1.82 ms per head;
8 x 32 score tile: scores 1.75 -> 1.56 ms per head; 128 x 256 tiles: 14.1 -> 13.2 ms;
each block processed strip by strip (scores, softmax and ``P V`` of 8 rows, so S and P
stay in L1): 14.5 -> 14.2 ms back to back (the VM drifts by ~1 ms between minutes).
Tried and reverted: taking each row's max from the micro-kernel's registers (skipping
the softmax's max pass): 14.1 ms, slower. Where a head's time goes now (one core):
scores 1.56 ms (~345 G op/s, 75% of the ``vpdpbusd`` loop's peak), softmax 1.8 ms (one
fp32 ``exp`` per score: INT8 does not shrink it), ``P V`` 2.5 ms (~215 GFLOP/s, 93% of
the ``vdpbf16ps`` peak), quantization and packing 0.8 ms.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fa_lab import cpu_features
from fa_lab.config import CACHE, FASTMATH
from fa_lab.kernels.common import (NEG_INF, NRT_ARRAY_OVERHEAD, finalize_row, mask_block,
                                   task_coords, visible_end)
from fa_lab.kernels.flash import bits_f32, f32_bits, softmax_block
from fa_lab.kernels.microkernels import MR, MR_S, NR, pv_tile, round_bf16, s_tile
from fa_lab.reference import causal_offset

#: Default tiles (Br, Bc).
DEFAULT_BLOCKS = (128, 256)


def _up(x, m):
    return -(-x // m) * m


def layout(d, bk, score_path, pv_path):
    """Sizes of the packed operands: ``(width, dq, steps, bkp, dv)``: bytes/int16s per
    broadcast group (4 vnni, 2 vpmaddwd), padded head dim of Q/K, micro-kernel steps,
    key slots per block (``Bc`` rounded up to 32), padded head dim of V (multiple of 32)."""
    width = 4 if score_path == "vnni" else 2
    dq = _up(d, width)
    return width, dq, dq // width, _up(bk, NR), _up(d, 32)


@njit(cache=CACHE, parallel=True, error_model="numpy")
def pack_q(q8, sq, scale, Qx, rs, shift):
    """Q rows (B, H, Nq, d) -> ``Qx`` (B*H, Nq + 7, dq) flat: uint8 ``q + 128`` or int16;
    ``rs`` (B*H, Nq + 7) = ``sq * scale`` in fp32 (7 pad rows for the 8-row tiles).
    ``shift``: 128 for uint8 (vnni), 0 for int16."""
    B, H, Nq, d = q8.shape
    rows = Nq + MR_S - 1
    dq = Qx.shape[0] // (B * H * rows)
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        for i in range(Nq):
            o = (bh * rows + i) * dq
            for t in range(d):
                Qx[o + t] = q8[b, h, i, t] + shift
            for t in range(d, dq):
                Qx[o + t] = shift
            rs[bh * rows + i] = np.float32(sq[b, h, i] * scale)
        for i in range(Nq, rows):
            o = (bh * rows + i) * dq
            for t in range(dq):
                Qx[o + t] = shift
            rs[bh * rows + i] = 0


@njit(cache=CACHE, parallel=True, error_model="numpy")
def pack_kv(k8, sk, v, bk, Kp, corr, skp, Vp, vfin, vnni, bf16):
    """K (B, Hkv, Nk, d) int8 and V per key block of ``bk`` keys, padded to ``bkp`` slots.

    ``Kp``: per chunk of 32 keys, 2 groups of 16, ``steps`` x (16 keys x 64/16 bytes):
    the right operand of :func:`s_tile`. ``corr`` = ``-128 sum_t k`` (vnni) or 0;
    ``skp``: the key scales (fp32). ``Vp``: bf16 pairs (uint16) or fp32 rows, ``vfin``:
    False for a V block holding NaN/inf. Pad slots are 0 everywhere.
    """
    BH, Tc, bkp = corr.shape
    Hkv, Nk, d = k8.shape[1], k8.shape[2], k8.shape[3]
    dq = Kp.shape[0] // (BH * Tc * bkp)
    dv = Vp.shape[0] // (BH * Tc * bkp)
    w = 4 if vnni else 2
    for task in prange(BH * Tc):
        bh, jb = task // Tc, task % Tc
        b, hk = bh // Hkv, bh % Hkv
        kb = Kp[task * bkp * dq:(task + 1) * bkp * dq]
        vb = Vp[task * bkp * dv:(task + 1) * bkp * dv]
        kb[:] = 0
        vb[:] = 0
        corr[bh, jb, :] = 0
        skp[bh, jb, :] = 0
        rowb = np.zeros(dv, np.uint16)
        rowf = np.zeros(dv, np.float32)
        bad = 0
        for c in range(min(bk, Nk - jb * bk)):
            j = jb * bk + c
            krow = k8[b, hk, j]
            o = (c // 16) * 16 * dq + (c % 16) * w  # group of 16 keys, key within it
            total = 0
            for t in range(d):
                total += krow[t]
                kb[o + (t // w) * 16 * w + t % w] = krow[t]
            corr[bh, jb, c] = -128 * total if vnni else 0
            skp[bh, jb, c] = sk[b, hk, j]
            vrow = v[b, hk, j]
            for t in range(d):
                rowf[t] = vrow[t]
                bad += 0 if abs(vrow[t]) < np.inf else 1
            if bf16:  # pairs of keys interleaved per channel: [pair][channel][2]
                round_bf16(rowf, rowb)
                po = (c - c % 2) * dv + c % 2
                for t in range(dv):
                    vb[po + 2 * t] = rowb[t]
            else:
                vb[c * dv:(c + 1) * dv] = rowf
        vfin[bh, jb] = bad == 0


#: Degree-4 polynomial for ``2^f`` on [0, 1) used when P is rounded to bf16 anyway:
#: max relative error 2.7e-6 in float32 (the same weighted fit as
#: :data:`fa_lab.kernels.flash.EXP2_COEFFS`), far below bf16's rounding (2^-9), two
#: FMAs per score fewer than the degree-6 one. (Degree 3, 7.7e-5, would also do for P,
#: but the row sum l uses the same values and the LSE then moved by up to 8e-5.)
EXP2_COEFFS_BF16 = (1.0000025181301353, 0.6930066206638741, 0.24142749325119936,
                    0.05203742877442215, 0.013520603197212263)


def exp2_frac(f, Pr):
    """``2^f`` for f in [0, 1): degree 6 (fp32 ``Pr``) or degree 4 (bf16 ``Pr``)."""
    return 2.0 ** f


def _exp2_deg6(f, Pr):
    p = np.float32(2.1690609170271546e-4)  # EXP2_COEFFS, highest degree first
    p = p * f + np.float32(1.2443081508389578e-3)
    p = p * f + np.float32(9.678472554453584e-3)
    p = p * f + np.float32(5.54835247239623e-2)
    p = p * f + np.float32(2.4022979581425047e-1)
    p = p * f + np.float32(6.931469870574726e-1)
    return p * f + np.float32(1.0000000018154935)


def _exp2_deg4(f, Pr):
    p = np.float32(0.013520603197212263)  # EXP2_COEFFS_BF16, highest degree first
    p = p * f + np.float32(0.05203742877442215)
    p = p * f + np.float32(0.24142749325119936)
    p = p * f + np.float32(0.6930066206638741)
    return p * f + np.float32(1.0000025181301353)


@overload(exp2_frac, inline="always")
def _exp2_frac_overload(f, Pr):
    return _exp2_deg4 if Pr.dtype == types.uint16 else _exp2_deg6


def store_p(Pr, c, p):
    """``Pr[c] = p``: fp32 as is, or its bf16 bits (uint16 ``Pr``), rounded to nearest
    even as :func:`~fa_lab.kernels.microkernels.round_bf16` (p >= 0 or NaN here)."""
    Pr[c] = p


def _store_f32(Pr, c, p):
    Pr[c] = p


def _store_bf16(Pr, c, p):
    b = f32_bits(p)
    r = (b + np.int32(0x7FFF) + ((b >> np.int32(16)) & np.int32(1))) >> np.int32(16)
    Pr[c] = np.uint16(0x7FC0) if p != p else np.uint16(r)


@overload(store_p, inline="always")
def _store_p_overload(Pr, c, p):
    if Pr.dtype == types.uint16:
        return _store_bf16
    return _store_f32


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _softmax_row(Sr, m_old, Pr):
    """``flash``'s fused block softmax on one row (1-D views, indexed from 0 so LLVM
    vectorizes): the max on order-preserving int32 keys, then ``p = 2^((s - m) log2 e)``
    (polynomial :data:`fa_lab.kernels.flash.EXP2_COEFFS`, or the degree-4
    :data:`EXP2_COEFFS_BF16` when P is stored as bf16) and the sum in one pass.
    Returns ``(m_new, alpha, rowsum)``; a row that saw only ``-inf`` uses 0 as its max
    (P = 0, alpha = 1); NaN stays NaN."""
    bc = Sr.shape[0]
    LOG2E = np.float32(1.4426950408889634)
    top = np.int32(-2147483648)
    for c in range(bc):
        i = f32_bits(Sr[c])
        top = max(top, np.int32(i ^ ((i >> np.int32(31)) & np.int32(0x7FFFFFFF))))
    x = bits_f32(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    mx = x if (x > m_old or x != x) else m_old
    m_use = mx if mx != NEG_INF else np.float32(0)
    total = np.float32(0)
    for c in range(bc):
        y = Sr[c] - m_use
        t = max(y * LOG2E, np.float32(-126.0))
        ti = np.floor(t)
        f = t - ti
        p = exp2_frac(f, Pr) * bits_f32((np.int32(ti) + np.int32(127)) << np.int32(23))
        p = p if y >= np.float32(-87.0) else (np.float32(0) if y < np.float32(-87.0) else y)
        store_p(Pr, c, p)
        total += p
    return mx, math.exp(m_old - m_use), total


@njit(cache=CACHE, error_model="numpy")
def _softmax(S, ld, br, bc, m, l, alpha, P):
    """The online softmax of a block held in rows of stride ``ld`` (S and P flat),
    ``P`` zero past ``bc`` (the micro-kernel reads whole 32-key chunks). ``P`` float32,
    or uint16: the ``P V`` operand's bf16 bits, written in the same pass."""
    for r in range(br):
        Pr = P[r * ld:(r + 1) * ld]
        mx, al, total = _softmax_row(S[r * ld:r * ld + bc], m[r], Pr[:bc])
        Pr[bc:] = 0
        l[r] = al * l[r] + total
        alpha[r] = al
        m[r] = mx


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _pv_select(S, P, V, j0, alpha, acc, dv):
    """``acc = alpha acc + P V`` over the *visible* keys only (score not ``-inf``), in
    fp32 with the original ``V``: a masked block whose V holds NaN/inf."""
    br, bc = P.shape
    d = V.shape[1]
    for r in range(br):
        a = acc[r * dv:r * dv + d]
        for t in range(d):
            a[t] *= alpha[r]
        for c in range(bc):
            if S[r, c] == NEG_INF:
                continue
            p = P[r, c]
            Vc = V[j0 + c]
            for t in range(d):
                a[t] += p * Vc[t]


@njit(cache=CACHE, error_model="numpy")
def _scores(Qx, qo, dq, steps, Kp, ko, corr_j, sk_j, rs, S, brp, bc, bkp):
    """``S`` (brp x bkp, flat) = the dequantized scores of a block, tile by tile."""
    for r0 in range(0, brp, MR_S):
        for ch in range(0, bc, NR):
            s_tile(Qx, qo + r0 * dq, dq, Kp, ko + ch * dq, steps, corr_j, sk_j, ch, rs, r0, S,
                   r0 * bkp + ch, bkp)


def pv_block(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp):
    """The softmax of the block (:func:`_softmax`), then ``acc = alpha acc + P Vj`` by
    the micro-kernel over all row strips and channel tiles. bf16 (uint16 ``Vp``): the
    softmax writes P's bf16 bits into ``Px``, ``(bc + 1) // 2`` key pairs; fp32: P,
    ``bc`` keys. Chosen by ``Vp``'s dtype when compiled."""
    raise NotImplementedError("micro-kernels need the JIT (NUMBA_DISABLE_JIT is set)")


def _pv_block_bf16(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp):
    _softmax(S, ld, br, bc, m, l, alpha, Px)
    for r0 in range(0, brp, MR):
        for g in range(0, dv, 32):
            pv_tile(Px, r0 * ld, ld, (bc + 1) // 2, Vp, vo + 2 * g, 2 * dv, alpha, r0, acc,
                    r0 * dv + g, dv)


def _pv_block_f32(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp):
    _softmax(S, ld, br, bc, m, l, alpha, P)
    for r0 in range(0, brp, MR):
        for g in range(0, dv, 32):
            pv_tile(P, r0 * ld, ld, bc, Vp, vo + g, dv, alpha, r0, acc, r0 * dv + g, dv)


@overload(pv_block, jit_options={"error_model": "numpy"})
def _pv_block_overload(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp):
    return _pv_block_bf16 if Vp.dtype == types.uint16 else _pv_block_f32


@njit(cache=CACHE, error_model="numpy")
def _q_block(Qx, qo, dq, steps, rs, Kp, corr, skp, Vp, vfin, v, bias, has_bias, b, h, i0,
             br, causal, offset, bk, bkp, dv, S, P, Px, m, l, alpha, acc, Oi, lse_i):
    """One query block against its visible key blocks (see the module docstring)."""
    Nk = v.shape[0]
    brp = -(-br // MR_S) * MR_S
    m[:] = NEG_INF
    l[:] = 0
    alpha[:] = 1
    acc[:] = 0
    P[:] = 0
    Px[:] = 0
    for j0 in range(0, visible_end(i0 + br - 1, Nk, causal, offset), bk):
        jb = j0 // bk
        bc = min(bk, Nk - j0)
        diagonal = causal and j0 + bc > i0 + offset + 1
        masked = has_bias or diagonal
        for r0 in range(0, brp, MR_S):  # strip by strip: S and P of 8 rows stay in L1
            n = min(MR_S, br - r0)
            so, ao = r0 * bkp, r0 * dv
            _scores(Qx, qo + r0 * dq, dq, steps, Kp, jb * bkp * dq, corr[jb], skp[jb],
                    rs[r0:], S[so:], MR_S, bc, bkp)
            if masked:
                mask_block(S[so:so + n * bkp].reshape((n, bkp))[:, :bc], bias, has_bias, b, h,
                           i0 + r0, j0, diagonal, offset)
            if masked and not vfin[jb]:  # a hidden NaN/inf value must not reach any row
                _softmax(S[so:], bkp, n, bc, m[r0:], l[r0:], alpha[r0:], P[so:])
                _pv_select(S[so:so + n * bkp].reshape((n, bkp))[:, :bc],
                           P[so:so + n * bkp].reshape((n, bkp))[:, :bc], v, j0, alpha[r0:],
                           acc[ao:], dv)
                continue
            pv_block(S[so:], P[so:], Px[so:], bkp, n, bc, Vp, jb * bkp * dv, dv, m[r0:],
                     l[r0:], alpha[r0:], acc[ao:], MR_S)
    for r in range(br):
        lse_i[r] = finalize_row(acc[r * dv:r * dv + Oi.shape[1]], m[r], l[r], Oi[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def sage_forward(Qx, rs, Kp, corr, skp, Vp, vfin, v, bias, has_bias, causal, offset,
                 block_q, block_kv, out, lse, vnni):
    """Parallel driver over (b, h, query block). ``vnni``: Q is uint8 (else int16); the
    ``P V`` path follows ``Vp``'s dtype (uint16: bf16 pairs, float32: fp32)."""
    B, H, Nq, d = out.shape
    Hkv = v.shape[1]
    group = H // Hkv
    BH = B * H
    rows = Nq + MR_S - 1
    dq = Qx.shape[0] // (BH * rows)
    steps = dq // (4 if vnni else 2)
    bf16 = Vp.itemsize == 2
    Tc, bkp = corr.shape[1], corr.shape[2]
    dv = Vp.shape[0] // (B * Hkv * Tc * bkp)
    Tr = (Nq + block_q - 1) // block_q
    for task in prange(BH * Tr):
        b, h, i0 = task_coords(task, H, Tr, block_q)
        br = min(block_q, Nq - i0)
        brp = -(-br // MR_S) * MR_S
        bh, bhk = b * H + h, b * Hkv + h // group
        S = np.empty(brp * bkp, np.float32)
        P = np.empty(brp * bkp, np.float32)
        Px = np.empty(brp * bkp if bf16 else 0, np.uint16)
        m = np.empty(brp, np.float32)
        l = np.empty(brp, np.float32)
        alpha = np.empty(brp, np.float32)
        acc = np.empty(brp * dv, np.float32)
        _q_block(Qx, (bh * rows + i0) * dq, dq, steps, rs[bh * rows + i0:], Kp[bhk * Tc * bkp * dq:],
                 corr[bhk], skp[bhk], Vp[bhk * Tc * bkp * dv:], vfin[bhk], v[b, h // group],
                 bias, has_bias, b, h, i0, br, causal, offset, block_kv, bkp, dv, S, P,
                 Px, m, l, alpha, acc, out[b, h, i0:i0 + br], lse[b, h, i0:i0 + br])


def scratch_bytes(*, B, H, Nq, d, block_q, block_kv, threads, **_):
    """Per running task: int32 scores, fp32 S and P, the P V operand (Br x Bc each,
    rounded up to the micro-kernel tiles), acc (Br x d) and three row vectors; plus the
    packed Q, K, V (about the size of the int8/bf16 inputs)."""
    a = NRT_ARRAY_OVERHEAD
    tasks = B * H * -(-Nq // block_q)
    live = max(1, min(threads, tasks))
    brp, bkp, dv = _up(block_q, MR_S), _up(block_kv, NR), _up(d, 32)
    per = (4 * brp * bkp + 8 * block_q * block_kv + 4 * brp * bkp + 4 * brp * dv
           + 12 * brp) + 8 * a
    return {f"tiles (S32, S, P, P operand, acc, row state) x {live} threads": live * per}


PV_DTYPES = ("float32", "bfloat16")


def paths(pv_dtype="float32"):
    """``(score_path, pv_path)`` this CPU runs now (:mod:`fa_lab.cpu_features`)."""
    f = cpu_features.detect()
    return f.score_path, f.pv_path(pv_dtype)


def unavailable() -> str | None:
    """Why this kernel cannot run on this CPU (None if it can): the registry's check."""
    f = cpu_features.detect()
    return None if f.score_path else ("kernel 'sage' needs AVX-512 (avx512f, avx512bw): "
                                      + f.note())


def pack(q8, sq, k8, sk, v, scale, bq, bk, score_path, pv_path):
    """Q, K, V in the micro-kernels' layouts (parallel): ``(Qx, rs, Kp, corr, skp, Vp,
    vfin)`` (see :func:`pack_q`, :func:`pack_kv`)."""
    B, H, Nq, d = q8.shape
    Hkv, Nk = k8.shape[1], k8.shape[2]
    width, dq, steps, bkp, dv = layout(d, bk, score_path, pv_path)
    Tc = -(-Nk // bk)
    vnni = score_path == "vnni"
    Qx = np.empty(B * H * (Nq + MR_S - 1) * dq, np.uint8 if vnni else np.int16)
    rs = np.empty(B * H * (Nq + MR_S - 1), np.float32)
    pack_q(q8, sq, float(scale), Qx, rs, 128 if vnni else 0)
    Kp = np.empty(B * Hkv * Tc * bkp * dq, np.int8 if vnni else np.int16)
    corr = np.empty((B * Hkv, Tc, bkp), np.int32)
    skp = np.empty((B * Hkv, Tc, bkp), np.float32)
    Vp = np.empty(B * Hkv * Tc * bkp * dv, np.uint16 if pv_path == "bf16" else np.float32)
    vfin = np.empty((B * Hkv, Tc), np.bool_)
    pack_kv(k8, sk, v, bk, Kp, corr, skp, Vp, vfin, vnni, pv_path == "bf16")
    return Qx, rs, Kp, corr, skp, Vp, vfin


def run(arrays, bias, scale, alignment, block_q=None, block_kv=None, *, pv_dtype="float32"):
    """The registry's runner (the canonical INT8 call, ``arrays = (q8, sq, k8, sk, v)``):
    pack for this CPU's paths, then :func:`sage_forward`."""
    q8, sq, k8, sk, v = arrays
    score_path, pv_path = paths(pv_dtype)
    if score_path is None:
        raise NotImplementedError(unavailable())
    B, H, Nq, d = q8.shape
    Nk = k8.shape[2]
    if Nk == 0:  # no key: zeros and lse = -inf (the convention of every kernel)
        return np.zeros((B, H, Nq, d), np.float32), np.full((B, H, Nq), -np.inf, np.float32)
    bq, bk = int(block_q or DEFAULT_BLOCKS[0]), int(block_kv or DEFAULT_BLOCKS[1])
    packed = pack(q8, sq, k8, sk, v, scale, bq, bk, score_path, pv_path)
    out = np.empty((B, H, Nq, d), np.float32)
    lse = np.empty((B, H, Nq), np.float32)
    offset = causal_offset(Nq, Nk, alignment) if alignment else 0
    has_bias = bias is not None
    bias = bias if has_bias else np.broadcast_to(np.zeros((), np.float32), (1, 1, 1, 1))
    sage_forward(*packed, v, bias, has_bias, alignment is not None, offset, bq, bk, out, lse,
                 score_path == "vnni")
    return out, lse
