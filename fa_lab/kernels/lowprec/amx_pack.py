"""The AMX kernels' operand layouts (:mod:`.amx`): Q, K and V packed once per call into
64-byte aligned tiles, by 4-byte words (in parallel), and bf16 rounding.

* Q: rows of ``dq`` elements (``d`` zero-padded to 64 int8 or 32 bf16: one 64-byte tile
  row per step of the score tiles), rows padded to whole 32-row strips;
* K: per group of 16 keys and 64-byte step of ``d``, a 1 KiB B tile in the VNNI layout
  (``[d / 4][key][4]`` int8, ``[d / 2][key][2]`` bf16);
* V: per 32 keys and 16 channels, a 1 KiB B tile of key pairs (``[key / 2][channel][2]``
  bf16), plus one flag per head: does its V hold NaN or inf.

Nothing here uses a tile instruction: it compiles on any CPU.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fa_lab.settings.config import CACHE
from fa_lab.kernels.lowprec.amx_softmax import bf16_of
from fa_lab.kernels.lowprec.microkernels import round_bf16 as round_bf16_seq
from fa_lab.numerics.buffers import empty64


def _up(x, m):
    return -(-x // m) * m


def bits16(x):
    """The bf16 bits (uint16) of ``x``: float32 rounded to nearest even, or a uint16
    already holding bf16 bits (bfloat16 inputs, packed as they are)."""


@overload(bits16, jit_options={"cache": CACHE})
def _bits16_overload(x):
    if x == types.uint16:
        return lambda x: x
    return lambda x: bf16_of(x)


def nonfinite(x):
    """Whether ``x`` (float32, or bf16 bits in a uint16) is NaN or infinite."""


@overload(nonfinite, jit_options={"cache": CACHE})
def _nonfinite_overload(x):
    if x == types.uint16:
        return lambda x: (x & np.uint16(0x7F80)) == np.uint16(0x7F80)
    return lambda x: (abs(x) == np.inf) | (x != x)


@njit(cache=CACHE, parallel=True, nogil=True, error_model="numpy")
def pack_q(q, rowscale, scale, Qp, rs, Nqp):
    """Q (B, H, Nq, dq) int8 (copied), float32 (rounded to bf16 bits, uint16 ``Qp``) or
    uint16 bf16 bits (copied) ->
    ``Qp`` (B*H*Nqp*dq) flat, rows past Nq zero; ``rs`` (B*H*Nqp) = ``rowscale * scale``
    (0 for pad rows)."""
    B, H, Nq, dq = q.shape
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        base = bh * Nqp * dq
        Qp[base + Nq * dq:base + Nqp * dq] = 0
        rs[bh * Nqp + Nq:(bh + 1) * Nqp] = 0
        for i in range(Nq):
            rs[bh * Nqp + i] = np.float32(rowscale[b, h, i] * scale)
            row, dst = q[b, h, i], Qp[base + i * dq:base + (i + 1) * dq]
            for t in range(dq):
                dst[t] = bits16(row[t]) if Qp.itemsize == 2 else row[t]


@njit(cache=CACHE, error_model="numpy", inline="always")
def _pair(x0, x1):
    """Two float32 (or bf16 bits) as one uint32 of bf16 bits: ``x0`` low, ``x1`` high."""
    return np.uint32(bits16(x0)) | (np.uint32(bits16(x1)) << np.uint32(16))


@njit(cache=CACHE, error_model="numpy", inline="always")
def _words(row):
    """A key row as 4-byte words: int8 or bf16 bits viewed as they are."""
    return row.view(np.uint32)


@njit(cache=CACHE, parallel=True, nogil=True, error_model="numpy")
def pack_k(k, keyscale, Kw, skp, Nkp):
    """K (B, Hkv, Nk, dq) into B tiles, by 4-byte words (``Kw``: the packed array viewed
    as uint32): word ``p`` of key ``16 g + c`` (4 int8, 2 bf16 bits, or a bf16 pair of
    float32 ``k``)
    goes to word ``(p // 16) 256 + (p % 16) 16 + c`` of group ``g``'s ``dq / 16`` tiles;
    ``skp`` (B*Hkv*Nkp) the key scales (0 for pad keys). The loops index slices with
    ``range`` variables only (no negative-index checks), which lets LLVM vectorize them."""
    B, Hkv, Nk, dq = k.shape
    words, G = dq // 4 if k.itemsize == 1 else dq // 2, Nkp // 16
    for task in prange(B * Hkv * G):
        bhk, g = task // G, task % G
        b, hk = bhk // Hkv, bhk % Hkv
        kw = Kw[task * 16 * words:(task + 1) * 16 * words]
        nk = max(0, min(16, Nk - 16 * g))
        if nk < 16:
            kw[:] = 0
        sk = skp[bhk * Nkp + 16 * g:bhk * Nkp + 16 * g + 16]
        sk[:] = 0
        sk[:nk] = keyscale[b, hk, 16 * g:16 * g + nk]
        rows = k[b, hk, 16 * g:16 * g + nk]
        for c in range(nk):
            if k.itemsize < 4:
                roww = _words(rows[c])
                for p in range(words):
                    kw[(p // 16) * 256 + (p % 16) * 16 + c] = roww[p]
            else:
                row = rows[c]
                for p in range(words):
                    kw[(p // 16) * 256 + (p % 16) * 16 + c] = _pair(row[2 * p], row[2 * p + 1])


@njit(cache=CACHE, error_model="numpy", inline="always")
def _pair_run(x0, x1, dst):
    """``dst[c]`` = the bf16 pair of ``x0[c]`` (low) and ``x1[c]`` (high) for the 16
    channels of one tile row; returns how many of them are NaN or inf."""
    nb = 0
    for c in range(16):
        a, z = x0[c], x1[c]
        dst[c] = _pair(a, z)
        nb += nonfinite(a) | nonfinite(z)
    return nb


@njit(cache=CACHE, parallel=True, nogil=True, error_model="numpy")
def pack_v(v, Vw, vfin, Nkp):
    """V (B, Hkv, Nk, dv) float32 (or bf16 bits, uint16) -> bf16 B tiles of 32 keys x 16
    channels (``Vw``: the packed array viewed as uint32, one word = a pair of keys): pair
    ``r`` of chunk ``kc``, channel ``16 g + c`` at word ``g 256 + r 16 + c`` of the
    chunk's ``dv / 16`` tiles; zeros past Nk. ``vfin[bhk]`` False when the head's V holds
    NaN or inf."""
    B, Hkv, Nk, dv = v.shape
    KC = Nkp // 32
    bad = np.zeros(B * Hkv * KC, np.int64)
    zero = np.zeros(dv, v.dtype)
    for task in prange(B * Hkv * KC):
        bhk, kc = task // KC, task % KC
        b, hk = bhk // Hkv, bhk % Hkv
        vw = Vw[task * 16 * dv:(task + 1) * 16 * dv]
        nbad = 0
        for r in range(16):
            k0 = 32 * kc + 2 * r
            if k0 >= Nk:
                for g in range(dv // 16):  # a whole pad pair
                    vw[g * 256 + r * 16:g * 256 + r * 16 + 16] = 0
                continue
            x0 = v[b, hk, k0]
            x1 = v[b, hk, k0 + 1] if k0 + 1 < Nk else zero
            for g in range(dv // 16):
                nbad += _pair_run(x0[16 * g:16 * g + 16], x1[16 * g:16 * g + 16],
                                  vw[g * 256 + r * 16:g * 256 + r * 16 + 16])
        bad[task] = nbad
    for bhk in range(B * Hkv):
        vfin[bhk] = bad[bhk * KC:(bhk + 1) * KC].sum() == 0


@njit(cache=CACHE, error_model="numpy")
def _widen(bits, out):
    for i in range(bits.shape[0]):  # a plain loop over whole arrays: it vectorizes
        out[i] = np.uint32(bits[i]) << np.uint32(16)


#: Elements per parallel task of :func:`round_bf16` and :func:`widen_bf16`.
CHUNK = 1 << 14


@njit(cache=CACHE, parallel=True, nogil=True, error_model="numpy")
def round_bf16(x, out):
    """``out`` (uint16, x's size) = the bf16 bits of float32 ``x`` (flat), rounded to
    nearest even, NaN kept: the bf16 result of :func:`run_bf16`'s caller, in parallel
    (no tile instruction: safe to compile anywhere). Each task runs the vectorized
    :func:`~.microkernels.round_bf16` on its slice (an index loop bounded by ``min`` did
    not vectorize: 4x slower)."""
    n = x.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        a, b = c * CHUNK, min(n, (c + 1) * CHUNK)
        round_bf16_seq(x[a:b], out[a:b])


@njit(cache=CACHE, parallel=True, nogil=True, error_model="numpy")
def widen_bf16(bits, out):
    """``out`` (uint32, flat) = the float32 bits of the bf16 values ``bits`` (uint16,
    flat): a 16-bit shift, exact, in parallel (the NumPy cast of an ``ml_dtypes``
    bfloat16 array runs on one thread and cost about a millisecond per million values)."""
    n = bits.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        a, b = c * CHUNK, min(n, (c + 1) * CHUNK)
        _widen(bits[a:b], out[a:b])


def to_bf16(x, bf16):
    """float32 ``x`` as a ``bf16`` array (an ``ml_dtypes.bfloat16`` dtype), rounded to
    nearest even by :func:`round_bf16` (in parallel; NumPy's cast is one thread)."""
    out = np.empty(x.shape, np.uint16)
    round_bf16(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), out.reshape(-1))
    return out.view(bf16)


def from_bf16(x):
    """A bfloat16 array (any 2-byte bits) as float32, exactly, by :func:`widen_bf16`."""
    out = np.empty(x.shape, np.uint32)
    widen_bf16(np.ascontiguousarray(x).view(np.uint16).reshape(-1), out.reshape(-1))
    return out.view(np.float32)


def _padded(x, d):
    """``x`` with its last axis zero-padded to ``d`` (``x`` itself when it is already)."""
    if x.shape[-1] == d:
        return x
    out = np.zeros(x.shape[:-1] + (d,), x.dtype)
    out[..., :x.shape[-1]] = x
    return out


def pack(q, rowscale, k, keyscale, v, scale, block_kv):
    """Q, K, V in the tile layouts (module docstring): int8 ``q``/``k`` for the INT8 path,
    float32 or uint16 bf16 bits for bf16 (``d`` zero-padded to a whole number of 64-byte
    tile rows). Returns the driver's first six arguments."""
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    bf16 = q.dtype != np.int8
    dq, dv = _up(d, 32 if bf16 else 64), _up(d, 32)
    Nqp, Nkp = _up(Nq, 32) + 32, _up(Nk, block_kv)
    ty = np.uint16 if bf16 else np.int8
    Qp, rs = empty64(B * H * Nqp * dq, ty), empty64(B * H * Nqp, np.float32)
    pack_q(_padded(q, dq), rowscale, float(scale), Qp, rs, Nqp)
    Kp, skp = empty64(B * Hkv * Nkp * dq, ty), empty64(B * Hkv * Nkp, np.float32)
    pack_k(_padded(k, dq), keyscale, Kp.view(np.uint32), skp, Nkp)
    Vp, vfin = empty64(B * Hkv * Nkp * dv, np.uint16), np.empty(B * Hkv, np.bool_)
    pack_v(_padded(v, dv), Vp.view(np.uint32), vfin, Nkp)
    return Qp, rs, Kp, skp, Vp, vfin
