"""Peak loops and timed tiles: how many operations per second each 512-bit instruction of
:mod:`fa_lab.kernels.lowprec.microkernels` reaches when nothing but it runs (register-resident
accumulators, no memory traffic in the loop): the ceilings of lesson 10's roofline per
precision (fp32 FMA, INT8 ``vpdpbusd``, INT16 ``vpmaddwd``, BF16 ``vdpbf16ps``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from fa_lab.kernels.lowprec.microkernels import (MR, dpbf16, dpbusd, f32x16, i32x16, madd16,
                                                 pv_tile, s_tile, vfma, vload_f32, vload_i32,
                                                 vzero_f32, vzero_i32)
from fa_lab.kernels.lowprec import amx_tiles
from fa_lab.numerics.buffers import empty64
from fa_lab.numerics.quant import to_bf16
from fa_lab.settings.config import CACHE


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


def peak_operands(precision):
    """The operand vector a peak loop of ``precision`` (``"fp32"``, ``"int8"``,
    ``"int16"``, ``"bf16"``) streams: small values, so nothing overflows."""
    if precision == "fp32":
        return np.full(16, 1e-3, np.float32)
    if precision == "bf16":
        return to_bf16(np.full(32, 1e-3))
    return np.ones(64, np.int8)


def instruction_probes(features):
    """``(path, wanted instruction regex, compiled on this CPU?, probe, arguments)`` for
    each micro-kernel path: a tool compiles the probe fresh and reads its assembly."""
    z = np.zeros
    return [
        ("Q K^T, vnni", "vpdpbusd", features.vnni, probe_scores,
         (z(512, np.uint8), 64, z(2048, np.int8), 16, z(32, np.int32), np.ones(32, np.float32),
          np.ones(8, np.float32), z(256, np.float32))),
        ("Q K^T, int16", "vpmaddwd|vpdpwssd", features.score_path is not None, probe_scores,
         (z(512, np.int16), 64, z(2048, np.int16), 32, z(32, np.int32),
          np.ones(32, np.float32), np.ones(8, np.float32), z(256, np.float32))),
        ("P V, bf16", "vdpbf16ps", features.bf16, probe_pv,
         (z(8 * MR, np.uint16), 8, 4, z(512, np.uint16), 64, np.ones(MR, np.float32),
          z(32 * MR, np.float32))),
        ("P V, fp32", "vfmadd\\w*ps", features.avx512f, probe_pv,
         (z(8 * MR, np.float32), 8, 8, z(512, np.float32), 32, np.ones(MR, np.float32),
          z(32 * MR, np.float32)))]


def amx_peak_call(precision, threads, steps):
    """``(fn, ops)``: ``fn()`` runs the register-resident AMX tile loop (2 x 2 accumulator
    tiles, :func:`fa_lab.kernels.lowprec.amx_tiles.peak_loop`) of ``precision``
    (``"int8"``: ``tdpbssd``, ``"bf16"``: ``tdpbf16ps``) ``steps`` times on ``threads``
    threads; ``ops`` counts its operations. Compiles tile instructions: call only where
    the CPU has AMX and Linux granted the tile state."""
    bufs = empty64(threads * 8192, np.uint8).reshape(threads, 8192)
    bufs[:] = 0
    bufs[:, 4096:] = 1 if precision == "int8" else 0
    bf16 = precision == "bf16"
    if threads == 1:  # one thread: no prange at all
        def fn():
            return amx_tiles.peak_body(amx_tiles.FULL_CFG, bufs[0], steps, bf16)
    else:
        def fn():
            return amx_tiles.peak_loop(amx_tiles.FULL_CFG, bufs, steps, bf16)
    return fn, amx_tiles.PEAK_OPS[precision] * steps * threads


#: The plain AMX tile product (C += A B over tiles), whose assembly lesson 10 reads.
amx_tile_product = amx_tiles.tile_gemm
