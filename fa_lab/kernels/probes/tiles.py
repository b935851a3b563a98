"""The kernels' parts on tiles, timed alone: one head, one thread, every block.

Tools time these to compare a micro-kernel with BLAS (or with the plain loops) on the
same tiles; they are the one door from the tools to jitted code besides the API
(docs/ARCHITECTURE.md), so the operands are built here too, in the layouts the kernels
use. Each loop returns a checksum, so nothing is optimized away.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fa_lab.kernels.ladder.flash import ensure_blas_threads, tile_gemms
from fa_lab.kernels.ladder.tiled_simd import scores_block
from fa_lab.kernels.lowprec import sage
from fa_lab.kernels.lowprec.int8 import scores_block_i8
from fa_lab.kernels.lowprec.microkernels import MR, MR_S, pv_tile
from fa_lab.kernels.lowprec.sage import scores
from fa_lab.kernels.lowprec.zmm import align64
from fa_lab.numerics.buffers import empty64
from fa_lab.settings.config import CACHE


def blas_tiles(x, n):
    """``n`` products ``x @ x`` of a square tile, one per thread slot, through the BLAS
    the ``flash`` kernel uses (warmed on every thread first): its block products' rate."""
    ensure_blas_threads()
    return tile_gemms(x, n)


def score_tile_operands(q8, sq, k8, sk, block_q, block_kv, path):
    """The packed operands of one head for :func:`qk_blocks_microkernel` (``sage``'s
    layout for score path ``path``, ``"vnni"`` or ``"i16"``): ``(Qx, rs, Kp, corr, skp,
    steps)`` from per-block quantized ``(1, 1, N, d)`` inputs."""
    d = q8.shape[-1]
    _, _, steps, _, _ = sage.layout(d, block_kv, path, "fp32")
    Qx, rs, Kp, corr, skp, _, _ = sage.pack(q8, sq, k8, sk, np.zeros(k8.shape, np.float32),
                                            1.0, block_q, block_kv, path, "fp32")
    return Qx, rs, Kp, corr, skp, steps


def pv_tile_operands(Tr, Tc, block_q, block_kv, d, rng):
    """64-byte aligned probability tiles ``Pt`` (Tr, Tc, Br, Bc) in [0, 1) and values
    ``V`` (Tc Bc, d), as :func:`pv_blocks_microkernel` and :func:`pv_blocks_blas` read them."""
    Pt = empty64(Tr * Tc * block_q * block_kv, np.float32).reshape(Tr, Tc, block_q, block_kv)
    Pt[...] = rng.random((Tr, Tc, block_q, block_kv), np.float32)
    V = empty64(Tc * block_kv * d, np.float32).reshape(Tc * block_kv, d)
    V[...] = rng.standard_normal((Tc * block_kv, d), np.float32)
    return Pt, V


@njit(cache=CACHE, nogil=True)
def qk_blocks_microkernel(Qx, rs, Kp, corr, skp, Nq, d, block_q, steps):
    """Every ``S = Qi Kj^T`` block of one packed head by the score micro-kernel (full
    blocks only), one thread: the throughput the kernel's score step gets. Returns a
    checksum."""
    Tc, bkp = corr.shape[1], corr.shape[2]
    dq = Qx.shape[0] // (Nq + MR_S - 1)
    S = align64(np.empty(block_q * bkp + 16, np.float32), block_q * bkp)
    total = 0.0
    for i0 in range(0, Nq - block_q + 1, block_q):
        for jb in range(Tc):
            scores(Qx, i0 * dq, dq, steps, Kp, jb * bkp * dq, corr[0, jb], skp[0, jb],
                    rs[i0:], S, block_q, bkp, bkp)
            total += S[0]
    return total


@njit(cache=CACHE, nogil=True)
def qk_blocks_blas(q, k, block_q, block_kv):
    """The same blocks in float32 through BLAS (``np.dot`` into a reused buffer, one
    thread: what ``flash``'s score step runs)."""
    S = np.empty((block_q, block_kv), dtype=q.dtype)
    total = 0.0
    for i0 in range(0, q.shape[0] - block_q + 1, block_q):
        for j0 in range(0, k.shape[0] - block_kv + 1, block_kv):
            np.dot(q[i0:i0 + block_q], k[j0:j0 + block_kv].T, S)
            total += S[0, 0]
    return total


@njit(cache=CACHE, nogil=True)
def pv_blocks_microkernel(Pt, V):
    """Every ``acc_i += P_ij V_j`` block of one head by the fp32 ``P V`` micro-kernel
    (``vfmadd231ps``, ``MR`` rows x 32 channels per call; sage's fp32 path), one thread:
    ``Pt`` (Tr, Tc, Br, Bc) float32, the probability tiles each contiguous as a kernel
    holds them, ``V`` (Tc Bc, dv) float32; ``Br`` a multiple of ``MR``, dv of 32 (the
    tiles have no edges here). Returns a checksum."""
    Tr, Tc, bq, bk = Pt.shape
    dv = V.shape[1]
    if bq % MR or dv % 32 or V.shape[0] != Tc * bk:
        raise ValueError("pv_blocks_microkernel: Br % MR, dv % 32 must be 0, V Tc*Bc rows")
    Pf, Vf = Pt.reshape(Tr * Tc * bq * bk), V.reshape(V.shape[0] * dv)
    acc = align64(np.empty(bq * dv + 16, np.float32), bq * dv)
    ones = np.ones(bq, np.float32)
    total = 0.0
    for it in range(Tr):
        acc[:] = 0
        for jt in range(Tc):
            for r0 in range(0, bq, MR):
                for g in range(0, dv, 32):
                    pv_tile(Pf, ((it * Tc + jt) * bq + r0) * bk, bk, bk, Vf, jt * bk * dv + g,
                            dv, ones, r0, acc, r0 * dv + g, dv)
        total += acc[0]
    return total


@njit(cache=CACHE, nogil=True)
def pv_blocks_blas(Pt, V):
    """The same blocks through BLAS, as ``flash``'s ``P V`` step: ``np.dot`` of the
    contiguous tile into a reused buffer, then added to the accumulator."""
    Tr, Tc, bq, bk = Pt.shape
    dv = V.shape[1]
    T = np.empty((bq, dv), dtype=Pt.dtype)
    acc = np.empty((bq, dv), dtype=Pt.dtype)
    total = 0.0
    for it in range(Tr):
        acc[:] = 0
        for jt in range(Tc):
            np.dot(Pt[it, jt], V[jt * bk:(jt + 1) * bk], T)
            acc += T
        total += acc[0, 0]
    return total


@njit(cache=CACHE, nogil=True)
def qk_all_blocks_i8(q8, k8, block_q, block_kv):
    """Every ``S = Qi Kj^T`` block of one head in int32, one thread (for the QK^T
    throughput comparison with :func:`qk_all_blocks_f32`); returns a checksum."""
    N, d = q8.shape
    S32 = np.empty((block_q, block_kv), dtype=np.int32)
    total = 0
    for i0 in range(0, N - block_q + 1, block_q):
        for j0 in range(0, k8.shape[0] - block_kv + 1, block_kv):
            scores_block_i8(q8[i0:i0 + block_q], k8[j0:j0 + block_kv], S32)
            total += S32[0, 0]
    return total


@njit(cache=CACHE, nogil=True)
def qk_all_blocks_f32(q, k, block_q, block_kv):
    """The same blocks in float32 through ``tiled_simd``'s score loop (the fp32 kernel of
    the same structure)."""
    N, d = q.shape
    S = np.empty((block_q, block_kv), dtype=q.dtype)
    KT = np.empty(d * block_kv, dtype=q.dtype)
    total = 0.0
    for i0 in range(0, N - block_q + 1, block_q):
        for j0 in range(0, k.shape[0] - block_kv + 1, block_kv):
            scores_block(q[i0:i0 + block_q], k[j0:j0 + block_kv], q.dtype.type(1), S, KT)
            total += S[0, 0]
    return total
