"""512-bit vectors as a Numba type, and the LLVM operations on them (``@intrinsic``).

A zmm register is a Numba *type* here (:data:`i32x16`, :data:`f32x16`, whose LLVM type
is ``<16 x i32>`` / ``<16 x float>``), and each function below is a
``numba.extending.intrinsic`` that emits one or a few LLVM instructions on it: loads,
stores, broadcasts, arithmetic, and the x86 target intrinsics the micro-kernels
(:mod:`.microkernels`) and sage's vector softmax (:mod:`.vsoftmax`) are made of:

* ``llvm.x86.avx512.vpdpbusd.512`` (AVX512-VNNI), ``llvm.x86.avx512.pmaddw.d.512``
  (``vpmaddwd``), ``llvm.x86.avx512bf16.dpbf16ps.512`` (AVX512-BF16), ``llvm.fma.v16f32``;
* ``llvm.x86.avx512.mask.scalef.ps.512`` (``vscalefps``: ``x 2^floor(y)``, which
  underflows to 0 and keeps NaN), ``llvm.floor.v16f32`` (``vrndscaleps``),
  ``llvm.x86.avx512.max.ps.512`` (``vmaxps``, NaN from its second operand) and
  ``llvm.x86.avx512bf16.cvtne2ps2bf16.512`` (two fp32 vectors to 32 bf16, rounded to
  nearest even).

LLVM refuses an intrinsic the target CPU lacks: a function using one must be compiled only
where :mod:`fa_lab.settings.cpu_features` says it exists. None of this runs with
``NUMBA_DISABLE_JIT=1`` (intrinsics only exist compiled).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.datamodel import models, register_default
from numba.extending import intrinsic

from fa_lab.numerics.buffers import ALIGN
from fa_lab.settings.config import CACHE

_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_VI32 = ir.VectorType(_I32, 16)
_VF32 = ir.VectorType(_F32, 16)


class Vec512(types.Type):
    """A 512-bit vector value (one zmm register): 16 int32 or 16 float32 lanes."""

    def __init__(self, lane):
        self.lane = lane
        super().__init__(name=f"{lane}x16")


i32x16 = Vec512("i32")
f32x16 = Vec512("f32")


@register_default(Vec512)
class _Vec512Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI32 if fe_type.lane == "i32" else _VF32)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it; only its name is needed)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_VBF16 = ir.VectorType(_BFloat(), 32)


def _addr(context, builder, aty, arr, idx, elem):
    """Pointer to ``arr[idx]`` (1-D array, element units) cast to ``elem*``."""
    a = context.make_array(aty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [idx]), ir.PointerType(elem))


def _is_1d(arr):
    return isinstance(arr, types.Array) and arr.ndim == 1


@intrinsic
def vzero_i32(typingctx):
    """A zmm of int32 zeros."""
    return i32x16(), lambda c, b, s, a: cgutils.get_null_value(_VI32)


@intrinsic
def vzero_f32(typingctx):
    """A zmm of float32 zeros."""
    return f32x16(), lambda c, b, s, a: cgutils.get_null_value(_VF32)


@intrinsic
def vload_i32(typingctx, arr, idx):
    """64 bytes from ``arr[idx]`` (any 1-D array, ``idx`` in its elements) as 16 int32."""
    if not _is_1d(arr):
        return None
    return i32x16(arr, idx), lambda c, b, s, a: b.load(
        _addr(c, b, s.args[0], a[0], a[1], _VI32), align=1)


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint that the cache line of ``arr.flat[idx]`` will be read soon (``prefetcht0``;
    ``arr`` C-contiguous, ``idx`` in elements from its start, and may lie past the end:
    a prefetch never faults)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]], inbounds=False),
                              ir.PointerType(ir.IntType(8)))
        i32 = ir.IntType(32)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(),
              [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)],
              [ptr.type, i32, i32, i32])
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


@intrinsic
def vload_bytes(typingctx, arr, idx):
    """16 bytes from ``arr[idx]`` (a 1-D int8 or uint8 array) widened to 16 int32 lanes:
    sign-extended for int8 (``vpmovsxbd``), zero-extended for uint8 (``vpmovzxbd``)."""
    if not _is_1d(arr) or arr.dtype not in (types.int8, types.uint8):
        return None
    signed = arr.dtype == types.int8

    def codegen(context, builder, sig, args):
        v = builder.load(_addr(context, builder, sig.args[0], args[0], args[1],
                               ir.VectorType(ir.IntType(8), 16)), align=1)
        return builder.sext(v, _VI32) if signed else builder.zext(v, _VI32)

    return i32x16(arr, idx), codegen


def _nibble(shift):
    """The signed 4-bit value at bit ``shift`` of each byte lane (``shl`` then ``sar``)."""
    def typer(typingctx, x):
        if x != i32x16:
            return None

        def codegen(context, builder, sig, args):
            up = builder.shl(args[0], ir.Constant(_VI32, [28 - shift] * 16))
            return builder.ashr(up, ir.Constant(_VI32, [28] * 16))
        return i32x16(x), codegen
    return typer


#: The signed low / high nibble of each zero-extended byte lane (int4 caches).
vnib_lo = intrinsic(_nibble(0))
vnib_hi = intrinsic(_nibble(4))


@intrinsic
def vload_f32(typingctx, arr, idx):
    """16 float32 from ``arr[idx]`` (a 1-D float32 array)."""
    if not _is_1d(arr) or arr.dtype != types.float32:
        return None
    return f32x16(arr, idx), lambda c, b, s, a: b.load(
        _addr(c, b, s.args[0], a[0], a[1], _VF32), align=1)


@intrinsic
def vstore(typingctx, arr, idx, v):
    """Store a zmm at ``arr[idx]``: f32x16 into a float32 array; i32x16 (64 bytes, e.g.
    32 bf16 bits from :func:`vcvt2bf16`) into any integer array, ``idx`` in its elements."""
    if not _is_1d(arr) or v not in (i32x16, f32x16):
        return None
    if (arr.dtype != types.float32) if v == f32x16 else not isinstance(arr.dtype, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        elem = _VI32 if sig.args[2] == i32x16 else _VF32
        builder.store(args[2], _addr(context, builder, sig.args[0], args[0], args[1], elem),
                      align=1)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


def _splat(builder, x, vty):
    v = builder.insert_element(cgutils.get_null_value(vty), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))


@intrinsic
def vbcast32(typingctx, arr, idx):
    """The 4 bytes at ``arr[idx]`` (e.g. 4 uint8, 2 int16 or 2 bf16) in all 16 lanes."""
    if not _is_1d(arr):
        return None
    return i32x16(arr, idx), lambda c, b, s, a: _splat(
        b, b.load(_addr(c, b, s.args[0], a[0], a[1], _I32), align=1), _VI32)


@intrinsic
def vsplat_f32(typingctx, x):
    """A float32 scalar in all 16 lanes."""
    if x != types.float32:
        return None
    return f32x16(x), lambda c, b, s, a: _splat(b, a[0], _VF32)


def _call(builder, name, ret, args, argtys=None):
    fnty = ir.FunctionType(ret, argtys or [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


@intrinsic
def dpbusd(typingctx, acc, u8, s8):
    """``vpdpbusd``: lane i of ``acc`` += sum_{u<4} u8[4i+u] * s8[4i+u] (u8 unsigned)."""
    if (acc, u8, s8) != (i32x16,) * 3:
        return None
    return i32x16(acc, u8, s8), lambda c, b, s, a: _call(
        b, "llvm.x86.avx512.vpdpbusd.512", _VI32, list(a))


@intrinsic
def madd16(typingctx, acc, x, y):
    """``vpmaddwd`` + ``vpaddd``: lane i of ``acc`` += x[2i] y[2i] + x[2i+1] y[2i+1] (s16)."""
    if (acc, x, y) != (i32x16,) * 3:
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(16), 32)
        x16, y16 = (builder.bitcast(a, v16) for a in args[1:])
        return builder.add(args[0], _call(builder, "llvm.x86.avx512.pmaddw.d.512", _VI32,
                                          [x16, y16]))

    return i32x16(acc, x, y), codegen


@intrinsic
def dpbf16(typingctx, acc, x, y):
    """``vdpbf16ps``: lane i of ``acc`` += x[2i] y[2i] + x[2i+1] y[2i+1] (bf16 pairs held
    in int32 lanes, fp32 accumulate)."""
    if (acc, x, y) != (f32x16, i32x16, i32x16):
        return None

    def codegen(context, builder, sig, args):
        xb, yb = (builder.bitcast(a, _VBF16) for a in args[1:])
        return _call(builder, "llvm.x86.avx512bf16.dpbf16ps.512", _VF32, [args[0], xb, yb])

    return f32x16(acc, x, y), codegen


@intrinsic
def vfma(typingctx, acc, x, y):
    """``acc + x * y`` in 16 float32 lanes, one rounding (``vfmadd231ps``)."""
    if (acc, x, y) != (f32x16,) * 3:
        return None
    return f32x16(acc, x, y), lambda c, b, s, a: _call(
        b, "llvm.fma.v16f32", _VF32, [a[1], a[2], a[0]])


@intrinsic
def vmul(typingctx, x, y):
    """``x * y`` in 16 float32 lanes."""
    if (x, y) != (f32x16, f32x16):
        return None
    return f32x16(x, y), lambda c, b, s, a: b.fmul(a[0], a[1])


@intrinsic
def vcvt_f32(typingctx, x):
    """int32 lanes to float32 (``vcvtdq2ps``)."""
    if x != i32x16:
        return None
    return f32x16(x), lambda c, b, s, a: b.sitofp(a[0], _VF32)


@intrinsic
def vadd(typingctx, x, y):
    """``x + y`` in 16 float32 lanes."""
    if (x, y) != (f32x16, f32x16):
        return None
    return f32x16(x, y), lambda c, b, s, a: b.fadd(a[0], a[1])


@intrinsic
def vsub(typingctx, x, y):
    """``x - y`` in 16 float32 lanes."""
    if (x, y) != (f32x16, f32x16):
        return None
    return f32x16(x, y), lambda c, b, s, a: b.fsub(a[0], a[1])


@intrinsic
def vmax_nan(typingctx, x, y):
    """``vmaxps``: the larger of ``x`` and ``y``, and ``y`` where either is NaN (so
    ``vmax_nan(limit, t)`` clamps ``t`` from below and keeps its NaN)."""
    if (x, y) != (f32x16, f32x16):
        return None
    return f32x16(x, y), lambda c, b, s, a: _call(
        b, "llvm.x86.avx512.max.ps.512", _VF32, [a[0], a[1], ir.Constant(_I32, 4)])


@intrinsic
def vfloor(typingctx, x):
    """``floor(x)`` in 16 float32 lanes (``vrndscaleps``)."""
    if x != f32x16:
        return None
    return f32x16(x), lambda c, b, s, a: _call(b, "llvm.floor.v16f32", _VF32, [a[0]])


@intrinsic
def vscalef(typingctx, x, y):
    """``vscalefps``: ``x 2^floor(y)`` in 16 float32 lanes: 0 when that underflows (e.g.
    ``y = -160``), NaN when ``x`` or ``y`` is NaN."""
    if (x, y) != (f32x16, f32x16):
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx512.mask.scalef.ps.512", _VF32,
                     [args[0], args[1], cgutils.get_null_value(_VF32),
                      ir.Constant(ir.IntType(16), -1), ir.Constant(_I32, 4)])

    return f32x16(x, y), codegen


@intrinsic
def vcvt2bf16(typingctx, lo, hi):
    """``vcvtne2ps2bf16``: 32 bf16 (rounded to nearest even, NaN kept quiet) of ``lo``
    then ``hi``, in the 64 bytes of an i32x16 (store it with :func:`vstore`)."""
    if (lo, hi) != (f32x16, f32x16):
        return None

    def codegen(context, builder, sig, args):  # the instruction's first operand: high half
        r = _call(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", _VBF16, [args[1], args[0]])
        return builder.bitcast(r, _VI32)

    return i32x16(lo, hi), codegen


@intrinsic
def vorder_key(typingctx, x):
    """The float32 bits of ``x`` as order-preserving int32 keys (``b ^ ((b >> 31) &
    0x7FFFFFFF)``): a NaN with its sign bit clear is above ``+inf``."""
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(args[0], _VI32)
        sign = builder.ashr(bits, _splat(builder, ir.Constant(_I32, 31), _VI32))
        return builder.xor(bits, builder.and_(sign, _splat(builder, ir.Constant(_I32, 0x7FFFFFFF),
                                                           _VI32)))

    return i32x16(x), codegen


@intrinsic
def vxor_i32(typingctx, x, y):
    """Lane-wise xor of two int32 zmm (``vpxord``): ``x ^ 0x80808080`` turns 64 signed
    bytes into unsigned ones offset by 128."""
    if (x, y) != (i32x16, i32x16):
        return None
    return i32x16(x, y), lambda c, b, s, a: b.xor(a[0], a[1])


@intrinsic
def vmax_i32(typingctx, x, y):
    """Lane-wise signed int32 maximum (``vpmaxsd``)."""
    if (x, y) != (i32x16, i32x16):
        return None
    return i32x16(x, y), lambda c, b, s, a: _call(b, "llvm.smax.v16i32", _VI32, list(a))


@intrinsic
def hmax_i32(typingctx, x):
    """The largest of the 16 int32 lanes."""
    if x != i32x16:
        return None
    return types.int32(x), lambda c, b, s, a: _call(b, "llvm.vector.reduce.smax.v16i32", _I32,
                                                    [a[0]])


@intrinsic
def hsum_f32(typingctx, x):
    """The sum of the 16 float32 lanes, as a tree (halves added 4 times)."""
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        v, n = args[0], 16
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                          list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(x), codegen


@intrinsic
def hsum4(typingctx, a, b, c, d):
    """The lane sums of four float32 zmm at once, as a 4-tuple: three halving steps of
    shuffles shared by the four (11 shuffles and adds instead of 4 x 8)."""
    if (a, b, c, d) != (f32x16,) * 4:
        return None
    sig = types.UniTuple(types.float32, 4)(a, b, c, d)

    def codegen(context, builder, sig, args):
        def shuf(x, y, idx):
            return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 16), idx))

        lo8, hi8 = list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))
        t0 = builder.fadd(shuf(args[0], args[1], lo8), shuf(args[0], args[1], hi8))
        t1 = builder.fadd(shuf(args[2], args[3], lo8), shuf(args[2], args[3], hi8))
        lo4 = [i + j for i in (0, 8, 16, 24) for j in range(4)]
        u = builder.fadd(shuf(t0, t1, lo4), shuf(t0, t1, [i + 4 for i in lo4]))
        v = builder.fadd(u, shuf(u, u, [i ^ 2 for i in range(16)]))
        w = builder.fadd(v, shuf(v, v, [i ^ 1 for i in range(16)]))
        vals = [builder.extract_element(w, ir.Constant(_I32, 4 * i)) for i in range(4)]
        return context.make_tuple(builder, sig.return_type, vals)

    return sig, codegen


# ---------------------------------------------------------------- 64-byte alignment

# A zmm load or store that straddles two cache lines costs about twice one that does
# not (:mod:`fa_lab.numerics.buffers` allocates aligned arrays outside compiled code).


@njit(cache=CACHE, inline="always")
def align64(buf, n):
    """The first ``n`` elements of ``buf`` (1-D, allocated ``64 // itemsize`` elements
    longer) that start on a 64-byte boundary: aligned scratch inside compiled code."""
    off = ((-buf.ctypes.data) % ALIGN) // buf.itemsize
    return buf[off:off + n]
