"""Rung 4, ``tiled_simd``: the ``tiled`` algorithm, written so LLVM vectorizes it, on all cores.

Same blocks, same online softmax, same causal block skipping (``_q_block`` is the
``tiled`` one line for line, but for the extra ``KT`` scratch: diff the two files);
what changes is only what the compiler sees (the SIMD checklist of numba-examples'
``simd.ipynb``):

* ``Sij = Qi Kj^T`` as a sum of outer products: ``Kj`` is first copied transposed into
  a ``(d, bc)`` scratch, then ``Sij[r, :] += Qi[r, t] * KjT[t, :]``: the innermost loop
  runs over contiguous memory with no reduction, so it becomes packed FMAs.
* ``pv[:] += Pij[r, c] * Vj[c, :]``: same idea, contiguous over ``d``; the block's
  sum goes to a zeroed row ``pv`` and then ``acc = alpha * acc + pv`` (blocked
  summation: adding straight into ``acc`` made one sequential float32 sum over all
  keys, measured at 1.16x the allowed error at N=4096).
* 1-D row views indexed from 0 (3-D indexing with offsets made LLVM emit gathers).
* ``fastmath`` from :data:`fa_lab.settings.config.FASTMATH` (no ``nnan``/``ninf``: the mask is
  ``-inf``), ``error_model='numpy'`` (no division-by-zero branches).
* ``prange`` over independent ``(b, h, query block)`` tasks; each task allocates its
  own O(Br*Bc + Br*d + d*Bc) scratch.

``exp`` is still the scalar ``math.exp`` (it does not vectorize with numba's PyPI
build); the ``flash`` rung replaces it. A test reads this
kernel's assembly and counts packed FMA instructions.

Measured (B=1, H=8, N=1024, d=64, float32, one run with every rung; 2-core AMD EPYC
with AVX-512, numba 0.68.1; ``data/bench_ladder.csv``): 58.8 ms, 36.5 GFLOP/s:
5.7x ``tiled``, 0.25x PyTorch's CPU ``scaled_dot_product_attention`` (14.7 ms).
2 threads: 1.74-1.83x 1 thread (lesson 02, two runs).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fa_lab.settings.config import CACHE, FASTMATH
from fa_lab.numerics.dropout import keep, row_key
from fa_lab.kernels.common import (HIDDEN, NEG_INF, NRT_ARRAY_OVERHEAD, finalize_row,
                                   mask_block, softcap_alibi_block, task_coords,
                                   window_block, window_cuts, window_keys)


def scratch_bytes(*, B, H, Nq, d, itemsize, block_q, block_kv, threads, **_):
    """Byte model: each running task holds a score tile, Kj^T, pv, m, l and acc.

    At most ``min(threads, tasks)`` tasks hold their scratch at once.
    """
    a = NRT_ARRAY_OVERHEAD
    tasks = B * H * -(-Nq // block_q)
    live = max(1, min(threads, tasks))
    return {f"score tile (Br x Bc) x {live} threads": live * (block_q * block_kv * itemsize + a),
            f"Kj^T tile (d x Bc) x {live}": live * (d * block_kv * itemsize + a),
            f"pv row (d) x {live}": live * (d * itemsize + a),
            f"running max, sum (2 x Br) x {live}": live * 2 * (block_q * itemsize + a),
            f"accumulator (Br x d) x {live}": live * (block_q * d * itemsize + a)}


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def scores_block(Qi, Kj, scale, Sij, KT):
    """``Sij = Qi Kj^T * scale`` as outer products over ``t``; ``KT`` is flat scratch."""
    br, bc = Sij.shape
    d = Qi.shape[1]
    KjT = KT[:d * bc].reshape((d, bc))
    for c in range(bc):
        Kc = Kj[c]
        for t in range(d):
            KjT[t, c] = Kc[t]
    for r in range(br):
        Sr = Sij[r]
        Qr = Qi[r]
        for c in range(bc):
            Sr[c] = 0
        for t in range(d):
            a = Qr[t] * scale
            KTt = KjT[t]
            for c in range(bc):
                Sr[c] += a * KTt[c]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _online_block(Sij, Vj, m, l, acc, pv, dropout_p, seed_mixed, b, h, i0, j0):
    """Fold one score block into ``(m, l, acc)``; every inner loop is contiguous.

    ``pv`` is a length-``d`` scratch row for the block's ``Pij Vj``. With dropout, ``l``
    sums the undropped ``Pij`` and ``acc`` the dropped, rescaled ones (the mask is
    regenerated from ``(seed, b, h, i, j)``, see :mod:`fa_lab.numerics.dropout`).
    """
    br, bc = Sij.shape
    zero = Sij.dtype.type(0)
    for r in range(br):
        Sr = Sij[r]
        acc_r = acc[r]
        m_new = m[r]
        for c in range(bc):
            if Sr[c] > m_new:
                m_new = Sr[c]
        m_use = m_new if m_new != NEG_INF else zero  # row fully masked so far
        alpha = math.exp(m[r] - m_use)
        rowsum = zero
        for c in range(bc):
            x = Sr[c]
            p = math.exp(x - m_use)
            Sr[c] = p if x != NEG_INF else HIDDEN  # Sij now holds Pij (HIDDEN: skipped)
            rowsum += p
        l[r] = alpha * l[r] + rowsum
        m[r] = m_new
        pv[:] = zero
        if dropout_p > 0:
            row = row_key(seed_mixed, b, h, i0 + r)
            inv_keep = Sr.dtype.type(1 / (1 - dropout_p))
            for c in range(bc):
                if Sr[c] != HIDDEN and keep(row, j0 + c, dropout_p):
                    p = Sr[c] * inv_keep
                    Vc = Vj[c]
                    for t in range(pv.shape[0]):
                        pv[t] += p * Vc[t]
        else:
            for c in range(bc):
                p = Sr[c]
                if p == HIDDEN:  # selection: a hidden key adds nothing (0 * NaN is NaN)
                    continue
                Vc = Vj[c]
                for t in range(pv.shape[0]):
                    pv[t] += p * Vc[t]
        for t in range(acc_r.shape[0]):
            acc_r[t] = alpha * acc_r[t] + pv[t]


@njit(cache=CACHE)
def _q_block(Qi, K, V, bias, has_bias, b, h, i0, scale, causal, offset, block_kv,
             S, KT, pv, m, l, acc, Oi, lse_i, dropout_p, seed_mixed, left, right, softcap,
             slopes, has_alibi):
    """All key blocks for one query block ``Qi`` (rows ``i0 ..``); see ``tiled._q_block``.

    ``left, right, softcap, slopes, has_alibi``: flash-attn's score modifiers
    (:mod:`fa_lab.numerics.scoremod`); key blocks outside the window band are skipped."""
    br = Qi.shape[0]
    Nk = K.shape[0]
    m[:br] = NEG_INF
    l[:br] = 0
    acc[:br] = 0
    # key blocks past the causal diagonal or outside the window are skipped
    j_lo, kv_end = window_keys(i0, br, Nk, causal, offset, left, right, block_kv)
    no_g = S[:0].reshape((0, 0))
    for j0 in range(j_lo, kv_end, block_kv):
        bc = min(block_kv, Nk - j0)
        Sij = S[:br * bc].reshape((br, bc))
        scores_block(Qi, K[j0:j0 + bc], scale, Sij, KT)
        if softcap > 0 or has_alibi:
            softcap_alibi_block(Sij, softcap, slopes, has_alibi, b, h, i0, j0, offset, no_g)
        diagonal = causal and j0 + bc > i0 + offset + 1  # some key is in a row's future
        if has_bias or diagonal:
            mask_block(Sij, bias, has_bias, b, h, i0, j0, diagonal, offset)
        if window_cuts(i0, br, j0, bc, offset, left, right):
            window_block(Sij, i0, j0, offset, left, right)
        _online_block(Sij, V[j0:j0 + bc], m[:br], l[:br], acc[:br], pv, dropout_p, seed_mixed,
                      b, h, i0, j0)
    for r in range(br):
        lse_i[r] = finalize_row(acc[r], m[r], l[r], Oi[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def tiled_simd_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv,
                       out, lse, dropout_p, seed_mixed, left, right, softcap, slopes,
                       has_alibi):
    """Parallel driver: one task per (b, h, query block), spread over threads by prange.

    ``dropout_p``, ``seed_mixed``: attention dropout (0.0 for none; see the registry).
    ``left, right, softcap, slopes (B, H), has_alibi``: :mod:`fa_lab.numerics.scoremod`.
    """
    B, H, Nq, d = q.shape
    group = H // k.shape[1]
    Tr = (Nq + block_q - 1) // block_q
    for task in prange(B * H * Tr):
        b, h, i0 = task_coords(task, H, Tr, block_q)
        i1 = min(i0 + block_q, Nq)
        hk = h // group
        S = np.empty(block_q * block_kv, dtype=q.dtype)
        KT = np.empty(d * block_kv, dtype=q.dtype)
        pv = np.empty(v.shape[3], dtype=q.dtype)  # d_v
        m = np.empty(block_q, dtype=q.dtype)
        l = np.empty(block_q, dtype=q.dtype)
        acc = np.empty((block_q, v.shape[3]), dtype=q.dtype)
        _q_block(q[b, h, i0:i1], k[b, hk], v[b, hk], bias, has_bias, b, h, i0, scale,
                 causal, offset, block_kv, S, KT, pv, m, l, acc, out[b, h, i0:i1],
                 lse[b, h, i0:i1], dropout_p, seed_mixed, left, right, softcap, slopes,
                 has_alibi)
