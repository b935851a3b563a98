"""Register-blocked micro-kernels from Python: 512-bit vectors and target intrinsics.

Plain Numba loops never produce ``vpdpbusd`` and do not keep a tile of accumulators in
registers (a 4 x 32 tile as small arrays or 128 scalars ran at
~20 GFLOP/s). Here a zmm register is a Numba *type* (:data:`~.zmm.i32x16`,
:data:`~.zmm.f32x16`, whose LLVM type is ``<16 x i32>`` / ``<16 x float>``), and a
handful of ``numba.extending.intrinsic`` functions (:mod:`.zmm`) emit the LLVM IR that
loads, broadcasts and multiplies them, including the x86 target intrinsics:

* ``llvm.x86.avx512.vpdpbusd.512``: 16 lanes, each ``acc += sum of 4 u8 x s8 products``
  (64 multiply-adds per instruction, AVX512-VNNI); it multiplies UNSIGNED by signed
  bytes, so Q is shifted by +128 to uint8 and ``128 * sum_t k[c, t]`` is subtracted per
  key (the accumulators start at that correction, so it costs nothing in the loop);
* ``llvm.x86.avx512.pmaddw.d.512`` (``vpmaddwd``): 32 s16 x s16 products summed in
  pairs into 16 int32 lanes, the fallback without VNNI (Q and K widened to int16);
* ``llvm.x86.avx512bf16.dpbf16ps.512`` (``vdpbf16ps``): 16 float lanes, each ``acc +=
  a0 b0 + a1 b1`` with bf16 pairs (AVX512-BF16);
* ``llvm.fma.v16f32`` (``vfmadd231ps``): the fp32 fallback.

A micro-kernel (BLIS's word) is the innermost loop: a small tile of the output held in
registers (scores: 8 rows x 32 keys = 16 zmm accumulators; ``P V``: 8 rows x 32
channels = 16) updated by rank-4 (or rank-2, rank-1) steps over the reduction axis: per
step of the score tile, broadcast one 4-byte group of each of the 8 rows of Q, load 2 zmm
of packed K, 16 dot-product instructions. The right operand is *packed* so each load is
contiguous::

    Q K^T (vnni):  Kp[chunk of 32 keys][2 groups of 16][d/4][16 keys][4 bytes]
    P V   (bf16):  Vp[pair of keys][d/16 groups][16 channels][2 keys]

LLVM refuses an intrinsic that the target CPU lacks, so each path is a separate function
chosen at compile time by the operand dtypes (uint8 Q: vnni; int16 Q: vpmaddwd; uint16 P:
bf16; float32 P: fp32), and :mod:`fa_lab.settings.cpu_features` decides which may be compiled.
Tests find each instruction in the assembly. None of this runs with
``NUMBA_DISABLE_JIT=1`` (intrinsics only exist compiled).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from fa_lab.settings.config import CACHE
from fa_lab.kernels.lowprec.zmm import (Vec512, dpbf16, dpbusd, f32x16, i32x16, madd16,  # noqa: F401
                                vbcast32, vcvt_f32, vfma, vload_f32, vload_i32, vmul,
                                vsplat_f32, vstore, vzero_f32, vzero_i32)

# ---------------------------------------------------------------- the score micro-kernels

#: Rows x keys of one score micro-kernel call (16 zmm accumulators), and rows of one
#: ``P V`` call (8 rows x 32 channels, 16 accumulators). Measured on one core (N=2048,
#: d=64, one head, sage's score step): 4 x 32 tiles 1.75 ms (~307 G op/s), 8 x 32 tiles
#: 1.56 ms (~345 G op/s; the register-resident vpdpbusd loop: ~460). ``P V`` in bf16,
#: 4 x 32 tiles: 2.8 ms, 8 x 32: 2.66 ms (the vdpbf16ps loop's peak: 2.4 ms).
MR_S, NR = 8, 32
MR = 8


def s_tile(Qx, q0, ldq, Kp, k0, steps, corr, sk, c0, rs, r0, S, s0, lds):
    """The score micro-kernel, 8 rows x 32 keys: the integer dot products
    ``corr[c0 + c] + sum_t Qx[q0 + r*ldq + t] K[c, t]`` accumulated exactly in int32
    registers, then written as ``S[s0 + r*lds + c] = float(that) * rs[r0 + r] *
    sk[c0 + c]`` (the dequantization, 8 vector conversions and multiplies per tile).
    ``steps`` = d/4 (vnni, uint8 Q) or d/2 (vpmaddwd, int16 Q); ``Kp`` holds the 32 keys
    at ``k0`` in 2 groups of 16 (``steps`` x 64 bytes each). Compiled per Q dtype."""
    raise NotImplementedError("micro-kernels need the JIT (NUMBA_DISABLE_JIT is set)")


def _s_tile_impl(step_fn, width):
    def impl(Qx, q0, ldq, Kp, k0, steps, corr, sk, c0, rs, r0, S, s0, lds):
        x0 = vload_i32(corr, c0)
        y0 = vload_i32(corr, c0 + 16)
        x1 = x2 = x3 = x4 = x5 = x6 = x7 = x0
        y1 = y2 = y3 = y4 = y5 = y6 = y7 = y0
        w = 64 // Kp.itemsize  # elements per 64-byte group of 16 keys
        for p in range(steps):
            ka = vload_i32(Kp, k0 + p * w)
            kc = vload_i32(Kp, k0 + (steps + p) * w)  # the second group of 16 keys
            q = q0 + width * p
            a = vbcast32(Qx, q)
            x0, y0 = step_fn(x0, a, ka), step_fn(y0, a, kc)
            a = vbcast32(Qx, q + ldq)
            x1, y1 = step_fn(x1, a, ka), step_fn(y1, a, kc)
            a = vbcast32(Qx, q + 2 * ldq)
            x2, y2 = step_fn(x2, a, ka), step_fn(y2, a, kc)
            a = vbcast32(Qx, q + 3 * ldq)
            x3, y3 = step_fn(x3, a, ka), step_fn(y3, a, kc)
            a = vbcast32(Qx, q + 4 * ldq)
            x4, y4 = step_fn(x4, a, ka), step_fn(y4, a, kc)
            a = vbcast32(Qx, q + 5 * ldq)
            x5, y5 = step_fn(x5, a, ka), step_fn(y5, a, kc)
            a = vbcast32(Qx, q + 6 * ldq)
            x6, y6 = step_fn(x6, a, ka), step_fn(y6, a, kc)
            a = vbcast32(Qx, q + 7 * ldq)
            x7, y7 = step_fn(x7, a, ka), step_fn(y7, a, kc)
        ska, skb = vload_f32(sk, c0), vload_f32(sk, c0 + 16)
        _dequant_store(S, s0, rs[r0], ska, skb, x0, y0)
        _dequant_store(S, s0 + lds, rs[r0 + 1], ska, skb, x1, y1)
        _dequant_store(S, s0 + 2 * lds, rs[r0 + 2], ska, skb, x2, y2)
        _dequant_store(S, s0 + 3 * lds, rs[r0 + 3], ska, skb, x3, y3)
        _dequant_store(S, s0 + 4 * lds, rs[r0 + 4], ska, skb, x4, y4)
        _dequant_store(S, s0 + 5 * lds, rs[r0 + 5], ska, skb, x5, y5)
        _dequant_store(S, s0 + 6 * lds, rs[r0 + 6], ska, skb, x6, y6)
        _dequant_store(S, s0 + 7 * lds, rs[r0 + 7], ska, skb, x7, y7)
    return impl


@njit(cache=CACHE, inline="always")
def _dequant_store(S, o, r, ska, skb, x, y):
    rv = vsplat_f32(r)
    vstore(S, o, vmul(vmul(vcvt_f32(x), rv), ska))
    vstore(S, o + 16, vmul(vmul(vcvt_f32(y), rv), skb))


_S_TILE_VNNI = _s_tile_impl(dpbusd, 4)
_S_TILE_I16 = _s_tile_impl(madd16, 2)


@overload(s_tile, jit_options={"error_model": "numpy"}, inline="always")
def _s_tile_overload(Qx, q0, ldq, Kp, k0, steps, corr, sk, c0, rs, r0, S, s0, lds):
    if Qx.dtype == types.uint8:
        return _S_TILE_VNNI
    if Qx.dtype == types.int16:
        return _S_TILE_I16
    return None


# ---------------------------------------------------------------- the P V micro-kernels

def pv_tile(Px, p0, ldp, n, Vx, v0, ldv, alpha, r0, acc, a0, lda):
    """``acc[a0 + r*lda + t] = alpha[r0 + r] acc[...] + sum_c P[r, c] V[c, t]`` for r < 8,
    t < 32 (two groups of 16 channels): the ``P V`` micro-kernel. bf16 (uint16 ``Px``):
    ``n`` key pairs, ``Vx`` packed pairs (``ldv`` = elements per pair of keys, the pair
    at ``v0 + c*ldv``); fp32 (float32 ``Px``): ``n`` keys, ``Vx`` rows of ``ldv`` floats."""
    raise NotImplementedError("micro-kernels need the JIT (NUMBA_DISABLE_JIT is set)")


@njit(cache=CACHE, inline="always")
def _scaled(acc, a0, alpha, r):
    s = vsplat_f32(alpha[r])
    return vmul(vload_f32(acc, a0), s), vmul(vload_f32(acc, a0 + 16), s)


@njit(cache=CACHE, inline="always")
def _store2(acc, a0, x, y):
    vstore(acc, a0, x)
    vstore(acc, a0 + 16, y)


@njit(cache=CACHE, inline="always")
def _bcast_f32(Px, i):
    return vsplat_f32(Px[i])


def _pv_tile_impl(load, bcast, step_fn, width):
    """The ``P V`` micro-kernel for one path: ``load`` reads 16 lanes of V, ``bcast``
    broadcasts one row's P (a bf16 pair or one float), ``width`` keys per step."""
    def impl(Px, p0, ldp, n, Vx, v0, ldv, alpha, r0, acc, a0, lda):
        x0, y0 = _scaled(acc, a0, alpha, r0)
        x1, y1 = _scaled(acc, a0 + lda, alpha, r0 + 1)
        x2, y2 = _scaled(acc, a0 + 2 * lda, alpha, r0 + 2)
        x3, y3 = _scaled(acc, a0 + 3 * lda, alpha, r0 + 3)
        x4, y4 = _scaled(acc, a0 + 4 * lda, alpha, r0 + 4)
        x5, y5 = _scaled(acc, a0 + 5 * lda, alpha, r0 + 5)
        x6, y6 = _scaled(acc, a0 + 6 * lda, alpha, r0 + 6)
        x7, y7 = _scaled(acc, a0 + 7 * lda, alpha, r0 + 7)
        w = 64 // Vx.itemsize  # elements per 16 lanes: the second group of channels
        for c in range(n):
            va = load(Vx, v0 + c * ldv)
            vb = load(Vx, v0 + c * ldv + w)
            q = p0 + width * c
            p = bcast(Px, q)
            x0, y0 = step_fn(x0, p, va), step_fn(y0, p, vb)
            p = bcast(Px, q + ldp)
            x1, y1 = step_fn(x1, p, va), step_fn(y1, p, vb)
            p = bcast(Px, q + 2 * ldp)
            x2, y2 = step_fn(x2, p, va), step_fn(y2, p, vb)
            p = bcast(Px, q + 3 * ldp)
            x3, y3 = step_fn(x3, p, va), step_fn(y3, p, vb)
            p = bcast(Px, q + 4 * ldp)
            x4, y4 = step_fn(x4, p, va), step_fn(y4, p, vb)
            p = bcast(Px, q + 5 * ldp)
            x5, y5 = step_fn(x5, p, va), step_fn(y5, p, vb)
            p = bcast(Px, q + 6 * ldp)
            x6, y6 = step_fn(x6, p, va), step_fn(y6, p, vb)
            p = bcast(Px, q + 7 * ldp)
            x7, y7 = step_fn(x7, p, va), step_fn(y7, p, vb)
        _store_acc(acc, a0, lda, x0, y0, x1, y1, x2, y2, x3, y3, x4, y4, x5, y5, x6, y6, x7,
                   y7)
    return impl


_PV_TILE_BF16 = _pv_tile_impl(vload_i32, vbcast32, dpbf16, 2)
_PV_TILE_F32 = _pv_tile_impl(vload_f32, _bcast_f32, vfma, 1)


@njit(cache=CACHE, inline="always")
def _store_acc(acc, a0, lda, x0, y0, x1, y1, x2, y2, x3, y3, x4, y4, x5, y5, x6, y6, x7, y7):
    _store2(acc, a0, x0, y0)
    _store2(acc, a0 + lda, x1, y1)
    _store2(acc, a0 + 2 * lda, x2, y2)
    _store2(acc, a0 + 3 * lda, x3, y3)
    _store2(acc, a0 + 4 * lda, x4, y4)
    _store2(acc, a0 + 5 * lda, x5, y5)
    _store2(acc, a0 + 6 * lda, x6, y6)
    _store2(acc, a0 + 7 * lda, x7, y7)


@overload(pv_tile, jit_options={"error_model": "numpy"})
def _pv_tile_overload(Px, p0, ldp, n, Vx, v0, ldv, alpha, r0, acc, a0, lda):
    if Px.dtype == types.uint16:
        return _PV_TILE_BF16
    if Px.dtype == types.float32:
        return _PV_TILE_F32
    return None


# ---------------------------------------------------------------- bf16 rounding

@njit(cache=CACHE, error_model="numpy", inline="always")
def bf16_bits(b):
    """The bf16 bits (in a uint32) of the float32 whose bits are the uint32 ``b``,
    rounded to nearest even; NaN becomes the quiet NaN 0x7FC0. The one bf16 rounding of
    the compiled code (:func:`fa_lab.numerics.quant.to_bf16` is its NumPy twin)."""
    r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint32(0x7FC0) if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r


@njit(cache=CACHE, error_model="numpy")
def round_bf16(x, out):
    """``out[i]`` = the bf16 bits of float32 ``x[i]`` (:func:`bf16_bits`). A plain integer
    loop; it vectorizes."""
    xi = x.view(np.uint32)
    for i in range(x.shape[0]):
        out[i] = np.uint16(bf16_bits(xi[i]))
