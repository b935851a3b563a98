"""Peak loops and timed tiles: how many operations per second each 512-bit instruction of
:mod:`fa_lab.kernels.microkernels` reaches when nothing but it runs (register-resident
accumulators, no memory traffic in the loop): the ceilings of lesson 10's roofline per
precision (fp32 FMA, INT8 ``vpdpbusd``, INT16 ``vpmaddwd``, BF16 ``vdpbf16ps``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fa_lab.config import CACHE
from fa_lab.kernels.sage import _scores
from fa_lab.kernels.zmm import align64
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from fa_lab.kernels.microkernels import (MR, MR_S, dpbf16, dpbusd, f32x16, i32x16, madd16, pv_tile,
                                         s_tile, vfma, vload_f32, vload_i32, vzero_f32,
                                         vzero_i32)


@intrinsic
def vsum_i32(typingctx, x):
    """The sum of the 16 int32 lanes (for peak loops' checksums; not in hot loops)."""
    if x != i32x16:
        return None

    def codegen(context, builder, sig, args):
        total = ir.Constant(ir.IntType(32), 0)
        for i in range(16):
            total = builder.add(total, builder.extract_element(args[0], ir.Constant(ir.IntType(32), i)))
        return total

    return types.int32(x), codegen


@intrinsic
def vsum_f32(typingctx, x):
    """The sum of the 16 float32 lanes (checksums only)."""
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        total = ir.Constant(ir.FloatType(), 0.0)
        for i in range(16):
            total = builder.fadd(total, builder.extract_element(args[0], ir.Constant(ir.IntType(32), i)))
        return total

    return types.float32(x), codegen


def probe_scores(Qx, ldq, Kp, steps, corr, sk, rs, S):
    """One score micro-kernel call on an 8 x 32 tile (for reading its assembly: compile
    it fresh with ``numba.njit(probe_scores)``, cached code has none)."""
    s_tile(Qx, 0, ldq, Kp, 0, steps, corr, sk, 0, rs, 0, S, 0, 32)


def probe_pv(Px, ldp, n, Vx, ldv, alpha, acc):
    """One ``P V`` micro-kernel call on an ``MR`` x 32 tile (8 rows: ``acc`` holds
    ``MR * 32`` floats, ``Px`` ``MR`` rows of ``ldp``; see :func:`probe_scores`)."""
    pv_tile(Px, 0, ldp, n, Vx, 0, ldv, alpha, 0, acc, 0, 32)


#: Independent accumulators in the peak loops: enough to cover each instruction's
#: latency (4-5 cycles) at its throughput (1-2 per cycle), few enough for 32 registers.
PEAK_ACCUMULATORS = 12


def _peak_impl(zero, load, step, total):
    def loop(x, y, n):
        """``n`` rounds of 12 independent dot-product instructions on register values
        (no memory traffic in the loop); returns a checksum."""
        a = load(x, 0)
        b = load(y, 0)
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = zero()
        for _ in range(n):
            c0 = step(c0, a, b)
            c1 = step(c1, a, b)
            c2 = step(c2, a, b)
            c3 = step(c3, a, b)
            c4 = step(c4, a, b)
            c5 = step(c5, a, b)
            c6 = step(c6, a, b)
            c7 = step(c7, a, b)
            c8 = step(c8, a, b)
            c9 = step(c9, a, b)
            c10 = step(c10, a, b)
            c11 = step(c11, a, b)
        return (total(c0) + total(c1) + total(c2) + total(c3) + total(c4) + total(c5)
                + total(c6) + total(c7) + total(c8) + total(c9) + total(c10) + total(c11))
    return loop


#: The register-resident loops, per instruction: (jitted loop, operations per round,
#: operand dtypes). Ops count a multiply and an add as 2 (FLOP or integer op).
peak_vnni = njit(cache=CACHE, nogil=True)(_peak_impl(vzero_i32, vload_i32, dpbusd, vsum_i32))
@njit(cache=CACHE, inline="always")
def _madd16_chain(c, a, b):
    # c feeds itself: LLVM knows vpmaddwd and would hoist a loop-invariant a*b; on a CPU
    # with VNNI it fuses vpmaddwd + vpaddd into one vpdpwssd
    return madd16(c, a, c)


peak_i16 = njit(cache=CACHE, nogil=True)(_peak_impl(vzero_i32, vload_i32, _madd16_chain,
                                                     vsum_i32))
peak_bf16 = njit(cache=CACHE, nogil=True)(_peak_impl(vzero_f32, vload_i32, dpbf16, vsum_f32))
peak_fp32 = njit(cache=CACHE, nogil=True)(_peak_impl(vzero_f32, vload_f32, vfma, vsum_f32))
OPS_PER_ROUND = {"vnni": PEAK_ACCUMULATORS * 16 * 4 * 2, "i16": PEAK_ACCUMULATORS * 16 * 2 * 2,
                 "bf16": PEAK_ACCUMULATORS * 16 * 2 * 2, "fp32": PEAK_ACCUMULATORS * 16 * 2}


# ---------------------------------------------------------------- score tiles, timed

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
            _scores(Qx, i0 * dq, dq, steps, Kp, jb * bkp * dq, corr[0, jb], skp[0, jb],
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
