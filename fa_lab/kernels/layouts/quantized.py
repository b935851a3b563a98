"""Decoding against a KV cache stored as float32, int8 or packed int4, read in place.

A decode step reads the whole cache once, so its time is the cache's bytes over the
memory bandwidth. This kernel keeps that true for every format:

* one task per (sequence, kv head, key split): the ``H / H_kv`` query heads that share a
  kv head (GQA) and their ``Nq`` queries are the task's rows, so each cached row is read
  from memory once, not once per query head;
* each cached row is dequantized where it is used, then meets every row of the task:
  scores, ``flash``'s vectorized online softmax
  (:func:`~fa_lab.kernels.ladder.flash.softmax_block`), ``P V``; never a float copy of the
  cache. Where ``d``, ``d_v`` and the groups fill whole 16-lane vectors, in registers
  (:mod:`.kvtiles`: explicit 512-bit vectors, with software prefetch); else on a
  ``(block_kv, d)`` tile in L1 (:func:`load_tile`, plain loops). Both are compiled per
  cache dtype: float32 is used as it is, int8 is ``x * scale`` per group, int4 unpacks
  two nibbles per byte into the two halves of its group
  (:mod:`fa_lab.numerics.kvquant` holds the layout and the NumPy twin);
* pages through a block table (a contiguous cache is one page per sequence), ragged
  lengths, bottom-right causal queries, and key splits merged exactly
  (:func:`fa_lab.numerics.merge.merge_splits`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fa_lab.settings import cpu_features
from fa_lab.settings.config import CACHE, FASTMATH, num_threads
from fa_lab.kernels.common import NEG_INF, finalize_row
from fa_lab.kernels.ladder.flash import softmax_block
from fa_lab.kernels.layouts.kvtiles import quantize_queries, scores_tile, vaccumulate
from fa_lab.numerics.merge import merge_splits


def load_tile(x, s, buf):
    """The float32 rows ``x * s`` of one tile (``x`` ``(bc, row bytes)`` cached rows, ``s``
    ``(bc, groups)`` their scales) in ``buf`` ``(>= bc, d)``, or ``x`` itself for a float32
    cache (compiled per dtype, see the module docstring)."""


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _load_int8(x, s, buf):
    bc, G = s.shape
    g = buf.shape[1] // G
    for t in range(bc):
        xt, st, bt = x[t], s[t], buf[t]
        for k in range(G):  # row views indexed from 0: unit stride, no gathers
            sk, src, dst = st[k], xt[k * g:k * g + g], bt[k * g:k * g + g]
            for c in range(g):
                dst[c] = np.float32(src[c]) * sk
    return buf[:bc]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _load_int4(x, s, buf):
    bc, G = s.shape
    g = buf.shape[1] // G
    half = g // 2
    for t in range(bc):
        xt, st, bt = x[t], s[t], buf[t]
        for k in range(G):
            sk = st[k]
            lo, hi, src = bt[k * g:k * g + half], bt[k * g + half:k * g + g], \
                xt[k * half:k * half + half]
            for j in range(half):
                v = np.int32(src[j])
                lo[j] = np.float32(((v & 15) ^ 8) - 8) * sk
                hi[j] = np.float32(((v >> 4) ^ 8) - 8) * sk
    return buf[:bc]


@overload(load_tile, jit_options={"cache": CACHE})
def _load_tile_overload(x, s, buf):
    if x.dtype == types.int8:
        return lambda x, s, buf: _load_int8(x, s, buf)
    if x.dtype == types.uint8:
        return lambda x, s, buf: _load_int4(x, s, buf)
    return lambda x, s, buf: x


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _scores(Q, K, S):
    """``S[r, t] = Q[r] . K[t]`` (``S`` ``(R, bc)``)."""
    for r in range(Q.shape[0]):
        Qr, Sr = Q[r], S[r]
        for t in range(K.shape[0]):
            Kt = K[t]
            acc = np.float32(0)
            for c in range(Kt.shape[0]):
                acc += Qr[c] * Kt[c]
            Sr[t] = acc


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _accumulate(acc, alpha, P, V):
    """``acc[r] = alpha[r] acc[r] + sum_t P[r, t] V[t]`` (no branch in the loop: a test
    for ``P == 0`` there cost 4x, the vectorized loop then ran scalar)."""
    for r in range(acc.shape[0]):
        a, Pr = acc[r], P[r]
        ar = alpha[r]
        for c in range(a.shape[0]):
            a[c] *= ar
        for t in range(V.shape[0]):
            p, Vt = Pr[t], V[t]
            for c in range(a.shape[0]):
                a[c] += p * Vt[c]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _task(Q, Q8, qsc, corr, k_pages, k_scale, v_pages, v_scale, table_b, hk, Lk, Nq, causal,
          j_begin, j_end, block_kv, d, d_v, vector, out_rows, lse_rows):
    """One (sequence, kv head, key split): rows ``r = head_in_group * Nq + i``. ``vector``:
    the explicit-vector products (:func:`~.kvtiles.vscores`, :func:`~.kvtiles.vaccumulate`),
    else plain loops on a dequantized tile."""
    R = Q.shape[0]
    page = k_pages.shape[2]
    one = k_pages.itemsize == 4  # a float32 cache (by dtype): its scales are placeholders
    ones = np.ones((block_kv, 1), np.float32)  # its scale rows, never read
    S = np.empty(R * block_kv, np.float32)  # (R, bc) C-contiguous views per tile
    P = np.empty(R * block_kv, np.float32)
    acc = np.zeros((R, d_v), np.float32)
    m = np.full(R, NEG_INF, np.float32)
    l = np.zeros(R, np.float32)
    alpha = np.empty(R, np.float32)
    kbuf, vbuf = np.empty((block_kv, d), np.float32), np.empty((block_kv, d_v), np.float32)
    Qf, accf = Q.ravel(), acc.ravel()
    gk, gv = d // k_scale.shape[3], d_v // v_scale.shape[3]
    j0 = j_begin
    while j0 < j_end:
        p, o = table_b[j0 // page], j0 % page
        bc = min(block_kv, j_end - j0, page - o)
        Sb, Pb = S[:R * bc].reshape(R, bc), P[:R * bc].reshape(R, bc)
        ks = ones[:bc] if one else k_scale[p, hk, o:o + bc]
        if vector:
            scores_tile(Qf, Q8, qsc, corr, d, k_pages[p, hk, o:o + bc], ks, gk, Sb,
                        v_pages[p, hk, o:o + bc])
        else:
            _scores(Q, load_tile(k_pages[p, hk, o:o + bc], ks, kbuf), Sb)
        if causal:  # query i stands at Lk - Nq + i
            for r in range(R):
                first = Lk - Nq + r % Nq + 1 - j0
                for t in range(max(first, 0), bc):
                    Sb[r, t] = NEG_INF
        softmax_block(Sb, m, l, alpha, Pb)
        vs = ones[:bc] if one else v_scale[p, hk, o:o + bc]
        if vector:
            vaccumulate(accf, d_v, alpha, Pb, v_pages[p, hk, o:o + bc], vs, gv)
        else:
            _accumulate(acc, alpha, Pb, load_tile(v_pages[p, hk, o:o + bc], vs, vbuf))
        j0 += bc
    for r in range(R):
        lse_rows[r] = finalize_row(acc[r], m[r], l[r], out_rows[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def quantized_forward(q, k_pages, k_scale, v_pages, v_scale, block_table, lengths, scale,
                      causal, block_kv, splits, vector, q8_like, out, lse):
    """prange over (b, kv head, key split) tasks, then the exact merge of the splits.

    q (B, H, Nq, d) float32; pages (num_blocks, H_kv, page, row bytes) of one format with
    scales (num_blocks, H_kv, page, groups) (a (1, 1, 1, 1) placeholder for float32);
    block_table (B, max_blocks); lengths (B,).
    """
    B, H, Nq, d = q.shape
    H_kv, d_v = k_pages.shape[1], out.shape[3]
    gh = H // H_kv
    part_o = np.empty((splits, B, H, Nq, d_v), np.float32)
    part_lse = np.empty((splits, B, H, Nq), np.float32)
    for task in prange(B * H_kv * splits):
        s = task % splits
        b, hk = task // (splits * H_kv), (task // splits) % H_kv
        Lk = lengths[b]
        per = ((Lk + block_kv - 1) // block_kv + splits - 1) // splits * block_kv
        Q = np.empty((gh * Nq, d), np.float32)
        for g in range(gh):
            for i in range(Nq):
                for c in range(d):
                    Q[g * Nq + i, c] = q[b, hk * gh + g, i, c] * scale
        Q8, qsc, corr = quantize_queries(Q, q8_like)
        o_rows = np.empty((gh * Nq, d_v), np.float32)
        l_rows = np.empty(gh * Nq, np.float32)
        _task(Q, Q8, qsc, corr, k_pages, k_scale, v_pages, v_scale, block_table[b], hk, Lk,
              Nq, causal,
              min(s * per, Lk), min((s + 1) * per, Lk), block_kv, d, d_v, vector, o_rows,
              l_rows)
        for g in range(gh):
            h = hk * gh + g
            for i in range(Nq):
                part_o[s, b, h, i] = o_rows[g * Nq + i]
                part_lse[s, b, h, i] = l_rows[g * Nq + i]
    merge_splits(part_o, part_lse, out, lse)


_FLOAT_SCALE = np.ones((1, 1, 1, 1), np.float32)
_FLOAT_SCALE.flags.writeable = False


#: Whether the explicit-vector products run where their shapes allow (a lesson or test may
#: turn them off to compare with the plain loops).
VECTORS = True


def vector_ok(dtype, d, k_scale, d_v, v_scale) -> bool:
    """The explicit-vector path needs whole 16-lane chunks: ``d % 16 == 0``, ``d_v % 32
    == 0`` and channel groups of a multiple of 16 (int8) or 32 (int4, two halves)."""
    if numba.config.DISABLE_JIT:  # intrinsics exist only compiled
        return False
    unit = {np.dtype(np.int8): 16, np.dtype(np.uint8): 32}.get(np.dtype(dtype), 16)
    groups = [] if k_scale is None else [d // k_scale.shape[3], d_v // v_scale.shape[3]]
    return d % 16 == 0 and d_v % 32 == 0 and all(g % unit == 0 for g in groups)


_Q8_FP32, _Q8_VNNI = np.zeros(1, np.float32), np.zeros(1, np.int8)


def vnni_refusal(k_pages, d, k_scale, channels_v, v_scale) -> str | None:
    """Why the VNNI variant cannot read this cache (None if it can)."""
    if k_pages.dtype != np.int8:
        return f"kernel 'quantized_vnni' reads int8 caches, got {k_pages.dtype}"
    if k_scale is None or k_scale.shape[3] != 1:
        return "kernel 'quantized_vnni' reads int8 keys with one scale per token (group=None)"
    if d % 64 or numba.config.DISABLE_JIT:
        return f"kernel 'quantized_vnni' needs d % 64 == 0 (and the JIT), got d={d}"
    if not vector_ok(k_pages.dtype, d, k_scale, channels_v, v_scale):
        return (f"kernel 'quantized_vnni' needs d_v % 32 == 0 and value groups of a "
                f"multiple of 16 channels, got d_v={channels_v}")
    return None


def vnni_unavailable() -> str | None:
    """Why this CPU cannot run the VNNI variant (the registry's check), or None."""
    f = cpu_features.detect()
    return None if f.vnni and f.avx512bw else ("kernel 'quantized_vnni' needs AVX512-VNNI: "
                                               + f.note())


def run_vnni(*args, **kwargs):
    """:func:`run` with int8 query rows against the int8 keys (``vpdpbusd``)."""
    return run(*args, **kwargs, vnni=True)


def run(q, k_pages, v_pages, block_table, lengths, scale, causal, block_q, block_kv,
        mods=None, splits=None, k_scale=None, v_scale=None, vnni=False):
    """The registry's call for this kernel (``KVCACHE_KERNELS``): ``(out, lse)``.

    ``splits`` None: enough key splits for two tasks per thread, each at least two key
    tiles long."""
    B, H, Nq, _ = q.shape
    threads = num_threads()
    H_kv = k_pages.shape[1]
    if splits is None:
        tiles = -(-int(np.max(lengths, initial=0)) // block_kv)
        splits = max(1, min(-(-2 * threads // (B * H_kv)), tiles // 2))
    d, d_v = q.shape[3], v_pages.shape[3] * (2 if v_pages.dtype == np.uint8 else 1)
    why = vnni_refusal(k_pages, d, k_scale, d_v, v_scale) if vnni else None
    if why:
        raise NotImplementedError(why)
    out = np.empty((B, H, Nq, d_v), np.float32)
    lse = np.empty((B, H, Nq), np.float32)
    quantized_forward(q, k_pages, _FLOAT_SCALE if k_scale is None else k_scale, v_pages,
                      _FLOAT_SCALE if v_scale is None else v_scale,
                      block_table.astype(np.int64), lengths.astype(np.int64),
                      np.float32(scale), bool(causal), int(block_kv), int(splits),
                      vnni or (vector_ok(k_pages.dtype, d, k_scale, d_v, v_scale) and VECTORS),
                      _Q8_VNNI if vnni else _Q8_FP32, out, lse)
    return out, lse
