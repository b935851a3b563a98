"""Intel AMX tiles from Numba: the tile instructions as ``@intrinsic``s, the tile
configuration, and small tile GEMMs (exact INT8, BF16) for tests and peaks.

AMX adds eight 2-D registers, *tiles*, of up to 16 rows x 64 bytes (1 KiB each), and a
matrix unit (TMUL) that multiplies them: ``tdpbssd C, A, B`` adds to the 16 x 16 int32
tile ``C`` the product of ``A`` (16 x 64 int8) and ``B`` (64 x 16 int8, stored in the
*VNNI layout*: 16 rows of 16 columns x 4 consecutive k's), 16384 multiply-adds in one
instruction; ``tdpbusd`` is the same with unsigned ``A``; ``tdpbf16ps`` does it for
bf16 (``A`` 16 x 32, ``B`` 16 rows of 16 columns x 2 k's) into fp32.

The *palette* says how the tiles are shaped: palette 1 is eight tiles of at most 16 rows
x 64 bytes; :func:`make_tilecfg` writes the 64-byte configuration that ``ldtilecfg``
loads (byte 0 the palette, bytes 16..47 the bytes per row of each tile, 48..63 their
rows). Every tile here is the full 16 x 64 (:data:`FULL_CFG`); partial problems are
padded with zeros instead.

Rules, each one a crash or a slowdown when broken (measured on an Intel Xeon with AMX,
numba 0.68, LLVM 22):

* the process asks Linux for the tile state once, ``arch_prctl(ARCH_REQ_XCOMP_PERM,
  XFEATURE_XTILEDATA)`` (:func:`fa_lab.settings.cpu_features.amx_permission`), else the first
  tile instruction raises SIGILL;
* the configuration is per thread: every parallel body runs ``ldtilecfg`` first and
  ``tilerelease`` last (a worker that skipped it crashed with SIGILL);
* the tile numbers are LLVM immediates: the intrinsics take literal ints only;
* ``tileloadd`` reads ``rows x stride`` bytes with no bounds check, and a row that
  straddles two cache lines makes it ~6x slower: operands start on 64-byte boundaries
  (:func:`fa_lab.numerics.buffers.empty64`) with strides that are multiples of 64;
* LLVM aborts the process (not an exception) when asked to compile a tile intrinsic for
  a CPU without AMX, so nothing here is compiled before a caller checked
  :func:`fa_lab.settings.cpu_features.detect` (the functions are compiled lazily, at first call).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fa_lab.settings.config import CACHE

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_I8P = _I8.as_pointer()

#: Bytes per tile row and rows per tile (palette 1).
TILE_BYTES, TILE_ROWS = 64, 16


def _decl(builder, name, argtys):
    return cgutils.get_or_insert_function(builder.module,
                                          ir.FunctionType(ir.VoidType(), argtys), name)


def _ptr(context, builder, aty, aval, off, off_ty):
    """``i8*`` to the array's data plus a byte offset."""
    ary = context.make_array(aty)(context, builder, aval)
    return builder.gep(builder.bitcast(ary.data, _I8P),
                       [context.cast(builder, off, off_ty, types.int64)])


@intrinsic
def ldtilecfg(typingctx, cfg):
    """``ldtilecfg``: load the tile configuration from a 64-byte uint8 array."""
    if not isinstance(cfg, types.Array):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0), types.int64)
        builder.call(_decl(builder, "llvm.x86.ldtilecfg", [_I8P]), [p])
        return context.get_dummy_value()
    return types.none(cfg), codegen


@intrinsic
def tilerelease(typingctx):
    """``tilerelease``: back to the initial state (a tile op after it needs ldtilecfg)."""
    def codegen(context, builder, sig, args):
        builder.call(_decl(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic(prefer_literal=True)
def tilezero(typingctx, t):
    """``tilezero tmm<t>`` (``t`` a literal int)."""
    if not isinstance(t, types.IntegerLiteral):
        return None
    n = t.literal_value

    def codegen(context, builder, sig, args):
        builder.call(_decl(builder, "llvm.x86.tilezero", [_I8]), [ir.Constant(_I8, n)])
        return context.get_dummy_value()
    return types.none(t), codegen


def _memory_op(llname, doc):
    @intrinsic(prefer_literal=True)
    def op(typingctx, t, arr, offset, stride):
        if not (isinstance(t, types.IntegerLiteral) and isinstance(arr, types.Array)
                and isinstance(offset, types.Integer) and isinstance(stride, types.Integer)):
            return None
        n = t.literal_value

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2])
            st = context.cast(builder, args[3], sig.args[3], types.int64)
            builder.call(_decl(builder, llname, [_I8, _I8P, _I64]), [ir.Constant(_I8, n), p, st])
            return context.get_dummy_value()
        return types.none(t, arr, offset, stride), codegen
    op.__doc__ = doc
    return op


tileloadd = _memory_op("llvm.x86.tileloadd64", "``tileloadd tmm<t>, [arr + offset], stride`` "
                       "(offset and stride in bytes): 16 rows of 64 bytes.")
tilestored = _memory_op("llvm.x86.tilestored64", "``tilestored [arr + offset], stride, "
                        "tmm<t>`` (bytes).")


def _dot_op(llname, doc):
    @intrinsic(prefer_literal=True)
    def op(typingctx, c, a, b):
        if not all(isinstance(x, types.IntegerLiteral) for x in (c, a, b)):
            return None
        regs = [x.literal_value for x in (c, a, b)]

        def codegen(context, builder, sig, args):
            builder.call(_decl(builder, llname, [_I8] * 3), [ir.Constant(_I8, r) for r in regs])
            return context.get_dummy_value()
        return types.none(c, a, b), codegen
    op.__doc__ = doc
    return op


tdpbssd = _dot_op("llvm.x86.tdpbssd", "``tmm<c> += tmm<a> (s8) . tmm<b> (s8, VNNI)``, int32.")
tdpbusd = _dot_op("llvm.x86.tdpbusd", "``tmm<c> += tmm<a> (u8) . tmm<b> (s8, VNNI)``, int32.")
tdpbf16ps = _dot_op("llvm.x86.tdpbf16ps", "``tmm<c> += tmm<a> (bf16) . tmm<b> (bf16 pairs)``, "
                    "fp32.")


def make_tilecfg(shapes) -> np.ndarray:
    """``{tile: (rows, bytes per row)}`` -> the 64-byte palette-1 configuration."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1  # palette 1; byte 1 (start row) 0
    colsb, rows = cfg[16:48].view(np.uint16), cfg[48:64]
    for t, (r, cb) in shapes.items():
        if not (0 <= t < 8 and 1 <= r <= TILE_ROWS and 1 <= cb <= TILE_BYTES):
            raise ValueError(f"shapes: tile {t} of {r} x {cb} bytes is not in palette 1")
        colsb[t], rows[t] = cb, r
    return cfg


#: All eight tiles 16 rows x 64 bytes.
FULL_CFG = make_tilecfg({t: (TILE_ROWS, TILE_BYTES) for t in range(8)})


def vnni_i8(B: np.ndarray) -> np.ndarray:
    """B (K x N) int8, K a multiple of 4 -> the VNNI layout (K/4 x 4N):
    ``out[r, 4n + j] = B[4r + j, n]`` (NumPy; for tests and teaching)."""
    K, N = B.shape
    return np.ascontiguousarray(B.reshape(K // 4, 4, N).transpose(0, 2, 1)).reshape(K // 4, 4 * N)


def vnni_bf16(B: np.ndarray) -> np.ndarray:
    """B (K x N) bf16 bits (uint16), K even -> pairs (K/2 x 2N): ``out[r, 2n + j] =
    B[2r + j, n]``."""
    K, N = B.shape
    return np.ascontiguousarray(B.reshape(K // 2, 2, N).transpose(0, 2, 1)).reshape(K // 2, 2 * N)


@njit(cache=CACHE, inline="always")
def dot_2x2(bf16):
    """The 2 x 2 block of tile products: accumulators 0-3 += A tiles 4, 5 times B tiles
    6, 7 (``tdpbf16ps`` for bf16, else ``tdpbssd``)."""
    if bf16:
        tdpbf16ps(0, 4, 6)
        tdpbf16ps(1, 4, 7)
        tdpbf16ps(2, 5, 6)
        tdpbf16ps(3, 5, 7)
    else:
        tdpbssd(0, 4, 6)
        tdpbssd(1, 4, 7)
        tdpbssd(2, 5, 6)
        tdpbssd(3, 5, 7)


@njit(cache=CACHE, nogil=True)
def tile_gemm(cfg, A, Bv, C, op):
    """One tile product ``C (16 x 16) += A . B`` (each a 64-byte aligned 1-D array of
    16 x 64 bytes): ``op`` 0 ``tdpbssd``, 1 ``tdpbusd`` (A unsigned), 2 ``tdpbf16ps``."""
    ldtilecfg(cfg)
    tileloadd(0, C, 0, 64)
    tileloadd(1, A, 0, 64)
    tileloadd(2, Bv, 0, 64)
    if op == 0:
        tdpbssd(0, 1, 2)
    elif op == 1:
        tdpbusd(0, 1, 2)
    else:
        tdpbf16ps(0, 1, 2)
    tilestored(0, C, 0, 64)
    tilerelease()


@njit(cache=CACHE, nogil=True)
def peak_body(cfg, buf, steps, bf16):
    """One thread's register-resident tile loop (:func:`peak_loop`) on one 8 KiB buffer."""
    ldtilecfg(cfg)
    tileloadd(4, buf, 4096, 64)
    tileloadd(5, buf, 5120, 64)
    tileloadd(6, buf, 6144, 64)
    tileloadd(7, buf, 7168, 64)
    tilezero(0)
    tilezero(1)
    tilezero(2)
    tilezero(3)
    for _ in range(steps):  # 2 x 2 accumulators: no instruction waits for another
        dot_2x2(bf16)
    tilestored(0, buf, 0, 64)
    tilestored(3, buf, 1024, 64)
    tilerelease()


@njit(cache=CACHE, parallel=True, nogil=True)
def peak_loop(cfg, bufs, steps, bf16):
    """The register-resident peak: per row of ``bufs`` (a 64-byte aligned (threads, 8192)
    uint8 array) ``4 steps`` tile products (``steps`` a multiple of 16), in 16 chunks per
    row so that every scheduler spreads them over the threads (TBB ran a ``prange`` of 2
    on one thread); operations per step: 4 x 16 x 16 x 64 x 2 (int8) or x 32 x 2 (bf16)."""
    n = bufs.shape[0]
    for i in prange(16 * n):
        peak_body(cfg, bufs[i % n], steps // 16, bf16)


#: Operations (multiply + add = 2) per step of :func:`peak_loop`, per thread.
PEAK_OPS = {"int8": 4 * 16 * 16 * 64 * 2, "bf16": 4 * 16 * 16 * 32 * 2}
