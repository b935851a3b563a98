"""SageAttention-style INT8 attention on the micro-kernels of :mod:`.microkernels`.

Per (b, h, query block of ``Br`` rows), over key blocks of ``Bc`` keys (causal blocks past
the diagonal skipped), FlashAttention-2's loop with:

1. ``S32 = Qi Kj^T`` in int32 by the score micro-kernel (8 rows x 32 keys in registers):
   ``vpdpbusd`` on uint8 ``Q + 128`` and int8 ``K``, the accumulators starting at
   ``-128 sum_t K[c, t]`` (precomputed per key when packing), or ``vpmaddwd`` on int16;
2. ``S = S32 * (s_q scale) * s_k`` in fp32 in registers (per-block scales matched to
   the tiles, as SageAttention), then the mask and causal diagonal (``mask_block``);
3. the online softmax in fp32 in explicit zmm ops (:mod:`.vsoftmax`: all rows' maxima,
   then their exponentials; P written as bf16 bits);
4. ``acc = alpha acc + P Vj`` by the ``P V`` micro-kernel (8 rows x 32 channels): P
   rounded to bf16 and ``V`` stored bf16 (``vdpbf16ps``, fp32 accumulate), or fp32 FMAs.

On a causal diagonal block each strip of 8 rows computes only the keys its last row sees
(a strip that sees none is skipped).

Packing (once per call, parallel; every packed operand and scratch tile 64-byte aligned,
:func:`~.zmm.align64`): Q to its row layout, K and V per key block padded to
32 keys (so any ``Bc`` works), the key scales and corrections beside them, and one flag per
V block saying whether it holds NaN/inf. A masked block (causal diagonal, or a mask)
whose V holds NaN/inf uses a loop that skips hidden keys (the NaN rule of
:mod:`fa_lab.numerics.reference`: a hidden value never reaches a row, ``0 * NaN`` is NaN).

float32 only; which instructions run is chosen by :mod:`fa_lab.settings.cpu_features` (the
packed dtypes then select the compiled micro-kernel).

Why each choice (lesson 10 measures each part on the reader's machine, with
:func:`fa_lab.tools.lowprec.speed.breakdown`): tiles of 128 x 256 keep a strip's S and P
(8 rows) in L1; the score and ``P V`` tiles of 8 rows x 32 columns keep 16 accumulators
in registers; the softmax takes all rows' maxima before any row's exponentials, so no
row waits on its own reduction; every operand starts on a 64-byte boundary, so no zmm
load or store straddles two cache lines; quantization multiplies by the scale's
reciprocal (:mod:`.quantize`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fa_lab.settings import cpu_features
from fa_lab.settings import config
from fa_lab.settings.config import CACHE, FASTMATH
from fa_lab.kernels.common import (NEG_INF, Stage, NRT_ARRAY_OVERHEAD, finalize_row, mask_block,
                                   task_coords, visible_end)
from fa_lab.kernels.lowprec.microkernels import (MR, MR_S, NR, bf16_bits, pv_tile, round_bf16,
                                                 s_tile)
from fa_lab.kernels.lowprec.vsoftmax import softmax
from fa_lab.kernels.lowprec.zmm import align64
from fa_lab.numerics.buffers import empty64
from fa_lab.numerics.masks import causal_offset

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
        _pack_q_rows(q8[b, h], Qx[bh * rows * dq:(bh + 1) * rows * dq], shift)
        for i in range(Nq):
            rs[bh * rows + i] = np.float32(sq[b, h, i] * scale)
        rs[bh * rows + Nq:(bh + 1) * rows] = 0


@njit(cache=CACHE, error_model="numpy")
def _pack_q_rows(q, qx, shift):
    """Rows ``q`` (Nq, d) int8 -> ``qx`` (rows, dq) flat, ``+ shift``; pad with ``shift``."""
    Nq, d = q.shape
    dq = qx.shape[0] // (Nq + MR_S - 1)
    qx[:] = shift
    for i in range(Nq):
        src, dst = q[i], qx[i * dq:i * dq + d]
        for t in range(d):
            dst[t] = src[t] + shift


@njit(cache=CACHE, error_model="numpy")
def _row_sum(row):
    total = 0
    for t in range(row.shape[0]):
        total += np.int32(row[t])
    return total


@njit(cache=CACHE, error_model="numpy")
def _pack_k_bytes(k, kb, dq, w):
    """Keys ``k`` (n, d) int8 into one zeroed block ``kb`` of ``Kp`` (:func:`pack_kv`):
    ``w`` bytes (vnni, uint8 ``kb``) or int16s (vpmaddwd) per group, any d and n."""
    kb[:] = 0
    for c in range(k.shape[0]):
        krow = k[c]
        o = (c // 16) * 16 * dq + (c % 16) * w  # group of 16 keys, key within it
        for t in range(k.shape[1]):
            kb[o + (t // w) * 16 * w + t % w] = krow[t]


@njit(cache=CACHE, error_model="numpy")
def _pack_k_words(k32, kw):
    """The same for a whole block with d a multiple of 4: 4-byte words ``k32`` (n, d/4)
    moved as int32 (``kw``: the block of ``Kp`` viewed as int32)."""
    steps = k32.shape[1]
    for c in range(k32.shape[0]):
        o = (c // 16) * 16 * steps + c % 16
        for p in range(steps):
            kw[o + 16 * p] = k32[c, p]


@njit(cache=CACHE, error_model="numpy")
def _pack_v_pairs(v, vw):
    """V (n, d) float32, n even, d = dv, as bf16 pairs of keys per channel: ``vw`` (the
    block of ``Vp`` viewed as uint32) gets ``bf16(v[2i, t]) | bf16(v[2i + 1, t]) << 16``,
    rounded by :func:`~fa_lab.kernels.lowprec.microkernels.bf16_bits`. Returns the count of
    non-finite values."""
    n, d = v.shape
    bits = v.view(np.uint32)
    bad = 0
    for i in range(n // 2):
        x0, x1, o = bits[2 * i], bits[2 * i + 1], i * d
        for t in range(d):
            a, b = x0[t], x1[t]
            vw[o + t] = bf16_bits(a) | (bf16_bits(b) << np.uint32(16))
            na, nb = (a & np.uint32(0x7FFFFFFF)), (b & np.uint32(0x7FFFFFFF))
            bad += 1 if (na >= np.uint32(0x7F800000)) | (nb >= np.uint32(0x7F800000)) else 0
    return bad


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
    Kw, Vw = Kp.view(np.int32), Vp.view(np.uint32)  # 4 bytes of K; a pair of bf16
    for task in prange(BH * Tc):
        bh, jb = task // Tc, task % Tc
        b, hk = bh // Hkv, bh % Hkv
        n = min(bk, Nk - jb * bk)
        for c in range(n):
            corr[bh, jb, c] = -128 * _row_sum(k8[b, hk, jb * bk + c]) if vnni else 0
            skp[bh, jb, c] = sk[b, hk, jb * bk + c]
        corr[bh, jb, n:] = 0
        skp[bh, jb, n:] = 0
        if vnni and d == dq and n == bkp:  # whole block, d a multiple of 4: 4 bytes at once
            _pack_k_words(k8[b, hk, jb * bk:jb * bk + n].view(np.int32),
                          Kw[task * bkp * dq // 4:(task + 1) * bkp * dq // 4])
        else:
            _pack_k_bytes(k8[b, hk, jb * bk:jb * bk + n],
                          Kp[task * bkp * dq:(task + 1) * bkp * dq], dq, w)
        if bf16 and d == dv and n == bkp:  # whole block, d a multiple of 32
            bad = _pack_v_pairs(v[b, hk, jb * bk:jb * bk + n],
                                Vw[task * bkp * dv // 2:(task + 1) * bkp * dv // 2])
            vfin[bh, jb] = bad == 0
            continue
        vb = Vp[task * bkp * dv:(task + 1) * bkp * dv]
        vb[:] = 0
        rowb = np.zeros(dv, np.uint16)
        rowf = np.zeros(dv, np.float32)
        bad = 0
        for c in range(n):
            vrow = v[b, hk, jb * bk + c]
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


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def pv_select(S, P, V, j0, alpha, acc, dv):
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
def scores(Qx, qo, dq, steps, Kp, ko, corr_j, sk_j, rs, S, brp, bc, bkp):
    """``S`` (brp x bkp, flat) = the dequantized scores of a block, tile by tile."""
    for r0 in range(0, brp, MR_S):
        for ch in range(0, bc, NR):
            s_tile(Qx, qo + r0 * dq, dq, Kp, ko + ch * dq, steps, corr_j, sk_j, ch, rs, r0, S,
                   r0 * bkp + ch, bkp)


def pv_block(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp, stage):
    """The softmax of the block (:func:`~.vsoftmax.softmax`; ``stage`` >= 2), then ``acc =
    alpha acc + P Vj`` by the micro-kernel over all row strips and channel tiles (``stage``
    >= 3). bf16 (uint16 ``Vp``): the softmax writes P's bf16 bits into ``Px``, ``(bc + 1)
    // 2`` key pairs; fp32: P, ``bc`` keys. Chosen by ``Vp``'s dtype when compiled."""
    raise NotImplementedError("micro-kernels need the JIT (NUMBA_DISABLE_JIT is set)")


def _pv_block_bf16(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp, stage):
    if stage >= 2:
        softmax(S, ld, br, bc, m, l, alpha, Px)
    if stage < 3:
        return
    for r0 in range(0, brp, MR):
        for g in range(0, dv, 32):
            pv_tile(Px, r0 * ld, ld, (bc + 1) // 2, Vp, vo + 2 * g, 2 * dv, alpha, r0, acc,
                    r0 * dv + g, dv)


def _pv_block_f32(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp, stage):
    if stage >= 2:
        softmax(S, ld, br, bc, m, l, alpha, P)
    if stage < 3:
        return
    for r0 in range(0, brp, MR):
        for g in range(0, dv, 32):
            pv_tile(P, r0 * ld, ld, bc, Vp, vo + g, dv, alpha, r0, acc, r0 * dv + g, dv)


@overload(pv_block, jit_options={"error_model": "numpy"})
def _pv_block_overload(S, P, Px, ld, br, bc, Vp, vo, dv, m, l, alpha, acc, brp, stage):
    return _pv_block_bf16 if Vp.dtype == types.uint16 else _pv_block_f32


@njit(cache=CACHE, error_model="numpy")
def _q_block(query, keys, where, tiles, work, Oi, lse_i, stage):
    """One query block against its visible key blocks (see the module docstring).

    Records (tuples): ``query = (Qx, qo, dq, steps, rs)``, the packed query rows from
    offset ``qo`` and their scales; ``keys = (Kp, corr, skp, Vp, vfin, v)``, the head's
    packed keys and values and its float values ``v``; ``where = (bias, has_bias, b, h,
    i0, br, causal, offset)``; ``tiles = (bk, bkp, dv)``; ``work = (S, P, Px, m, l,
    alpha, acc)``, this task's scratch and row state. ``stage`` < ``Stage.FULL``
    (:class:`~fa_lab.kernels.common.Stage`) stops each strip early (the breakdown only)."""
    Qx, qo, dq, steps, rs = query
    Kp, corr, skp, Vp, vfin, v = keys
    bias, has_bias, b, h, i0, br, causal, offset = where
    bk, bkp, dv = tiles
    S, P, Px, m, l, alpha, acc = work
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
            bs = bc  # keys this strip computes: on the diagonal, up to its last row's
            if diagonal:
                bs = min(bc, i0 + r0 + n + offset - j0)
                if bs <= 0:  # no row of the strip sees a key of this block
                    continue
            if stage < 1:
                continue
            scores(Qx, qo + r0 * dq, dq, steps, Kp, jb * bkp * dq, corr[jb], skp[jb],
                    rs[r0:], S[so:], MR_S, bs, bkp)
            if masked:
                mask_block(S[so:so + n * bkp].reshape((n, bkp))[:, :bs], bias, has_bias, b, h,
                           i0 + r0, j0, diagonal, offset)
            if masked and not vfin[jb]:  # a hidden NaN/inf value must not reach any row
                softmax(S[so:], bkp, n, bs, m[r0:], l[r0:], alpha[r0:], P[so:])
                pv_select(S[so:so + n * bkp].reshape((n, bkp))[:, :bs],
                           P[so:so + n * bkp].reshape((n, bkp))[:, :bs], v, j0, alpha[r0:],
                           acc[ao:], dv)
                continue
            pv_block(S[so:], P[so:], Px[so:], bkp, n, bs, Vp, jb * bkp * dv, dv, m[r0:],
                     l[r0:], alpha[r0:], acc[ao:], MR_S, stage)
    for r in range(br):
        lse_i[r] = finalize_row(acc[r * dv:r * dv + Oi.shape[1]], m[r], l[r], Oi[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def sage_forward(Qx, rs, Kp, corr, skp, Vp, vfin, v, bias, has_bias, causal, offset,
                 block_q, block_kv, out, lse, vnni, stage=3):
    """Parallel driver over (b, h, query block). ``vnni``: Q is uint8 (else int16); the
    ``P V`` path follows ``Vp``'s dtype (uint16: bf16 pairs, float32: fp32); ``stage``:
    see :class:`~fa_lab.kernels.common.Stage`."""
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
        S = align64(np.empty(brp * bkp + 16, np.float32), brp * bkp)
        P = align64(np.empty(brp * bkp + 16, np.float32), brp * bkp)
        Px = align64(np.empty(brp * bkp + 32 if bf16 else 32, np.uint16), brp * bkp if bf16 else 0)
        m = np.empty(brp, np.float32)
        l = np.empty(brp, np.float32)
        alpha = np.empty(brp, np.float32)
        acc = align64(np.empty(brp * dv + 16, np.float32), brp * dv)
        _q_block((Qx, (bh * rows + i0) * dq, dq, steps, rs[bh * rows + i0:]),
                 (Kp[bhk * Tc * bkp * dq:], corr[bhk], skp[bhk], Vp[bhk * Tc * bkp * dv:],
                  vfin[bhk], v[b, h // group]),
                 (bias, has_bias, b, h, i0, br, causal, offset), (block_kv, bkp, dv),
                 (S, P, Px, m, l, alpha, acc), out[b, h, i0:i0 + br], lse[b, h, i0:i0 + br],
                 stage)


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


def paths(pv_dtype="float32"):
    """``(score_path, pv_path)`` this CPU runs now (:mod:`fa_lab.settings.cpu_features`)."""
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
    Qx = empty64(B * H * (Nq + MR_S - 1) * dq, np.uint8 if vnni else np.int16)
    rs = empty64(B * H * (Nq + MR_S - 1), np.float32)
    pack_q(q8, sq, float(scale), Qx, rs, 128 if vnni else 0)
    Kp = empty64(B * Hkv * Tc * bkp * dq, np.int8 if vnni else np.int16)
    corr = empty64(B * Hkv * Tc * bkp, np.int32).reshape(B * Hkv, Tc, bkp)
    skp = empty64(B * Hkv * Tc * bkp, np.float32).reshape(B * Hkv, Tc, bkp)
    Vp = empty64(B * Hkv * Tc * bkp * dv, np.uint16 if pv_path == "bf16" else np.float32)
    vfin = np.empty((B * Hkv, Tc), np.bool_)
    pack_kv(k8, sk, v, bk, Kp, corr, skp, Vp, vfin, vnni, pv_path == "bf16")
    return Qx, rs, Kp, corr, skp, Vp, vfin


def packed_call(arrays, bias, scale, alignment, block_q=None, block_kv=None, *,
                pv_dtype="float32"):
    """Pack the canonical INT8 call (``arrays = (q8, sq, k8, sk, v)``) for this CPU's
    paths and return ``forward(stage=Stage.FULL) -> (out, lse)``, which runs
    :func:`sage_forward` on the packed operands."""
    q8, sq, k8, sk, v = arrays
    score_path, pv_path = paths(pv_dtype)
    if score_path is None:
        raise NotImplementedError(unavailable())
    B, H, Nq, d = q8.shape
    Nk = k8.shape[2]
    if Nk == 0:  # no key: zeros and lse = -inf (the convention of every kernel)
        return lambda stage=Stage.FULL: (np.zeros((B, H, Nq, d), np.float32),
                                   np.full((B, H, Nq), -np.inf, np.float32))
    bq, bk = int(block_q or config.SAGE_BLOCKS[0]), int(block_kv or config.SAGE_BLOCKS[1])
    packed = pack(q8, sq, k8, sk, v, scale, bq, bk, score_path, pv_path)
    offset = causal_offset(Nq, Nk, alignment) if alignment else 0
    has_bias = bias is not None
    bias = bias if has_bias else np.broadcast_to(np.zeros((), np.float32), (1, 1, 1, 1))

    def forward(stage=Stage.FULL):
        out = np.empty((B, H, Nq, d), np.float32)
        lse = np.empty((B, H, Nq), np.float32)
        sage_forward(*packed, v, bias, has_bias, alignment is not None, offset, bq, bk, out,
                     lse, score_path == "vnni", stage)
        return out, lse
    return forward


def run(arrays, bias, scale, alignment, block_q=None, block_kv=None, *, pv_dtype="float32",
        stage=Stage.FULL):
    """The registry's runner (the canonical INT8 call, ``arrays = (q8, sq, k8, sk, v)``):
    pack for this CPU's paths, then :func:`sage_forward` (``stage``: :class:`Stage`;
    ``Stage.PACK`` stops after packing: zeros, ``lse = -inf``, as if no key were seen)."""
    stage = Stage(stage)
    if stage > Stage.FULL:
        raise ValueError(f"stage: sage stops after a stage (PACK..FULL), got {stage!r}")
    forward = packed_call(arrays, bias, scale, alignment, block_q, block_kv,
                          pv_dtype=pv_dtype)
    if stage == Stage.PACK:
        q8 = arrays[0]
        return np.zeros(q8.shape, np.float32), np.full(q8.shape[:3], -np.inf, np.float32)
    return forward(int(stage))
