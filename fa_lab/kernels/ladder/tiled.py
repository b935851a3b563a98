"""Rung 3, ``tiled``: FlashAttention's blocking, still scalar and single-threaded.

Q is cut into ``Tr`` blocks ``Qi`` of ``Br`` rows, K and V into ``Tc`` blocks ``Kj, Vj``
of ``Bc`` rows. For each ``Qi`` the kernel streams over ``Kj, Vj`` with the online
softmax applied a block at a time (FlashAttention-2 order: ``acc`` stays
un-normalized and is divided by ``l`` once at the end):

    Sij  = Qi Kj^T * scale (+ bias, causal mask on the diagonal block)   (Br, Bc)
    m'   = max(m, rowmax(Sij));  Pij = exp(Sij - m');  alpha = exp(m - m')
    l    = alpha * l + rowsum(Pij);  acc = alpha * acc + Pij Vj;  m = m'
    O    = acc / l;  lse = m + log(l)

With ``causal``, key blocks entirely in the future of the query block are skipped,
blocks entirely in the past need no mask, and only blocks crossing the diagonal are
masked element by element. Scratch is O(Br*Bc + Br*d), independent of N.

The inner products are written the textbook way (dot products, strict IEEE), so LLVM
keeps them scalar: this rung shows what tiling alone buys on a CPU. It is not the
memory-traffic win it is on a GPU (a row of K already sits in cache); it is the rescale
of ``acc`` amortized over ``Bc`` keys and float32 accumulators. ``tiled_simd`` changes
only the loop order, flags and threads.

Measured (B=1, H=8, N=1024, d=64, float32, one run with every rung; 2-core AMD EPYC
with AVX-512, numba 0.68.1; ``data/bench_ladder.csv``): 334 ms, 6.4 GFLOP/s:
1.35x ``online``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fa_lab.settings.config import CACHE
from fa_lab.kernels.common import (HIDDEN, NEG_INF, NRT_ARRAY_OVERHEAD, finalize_row,
                                   mask_block, visible_end)


def scratch_bytes(*, d, itemsize, block_q, block_kv, **_):
    """Byte model: one score tile, running max and sum, one accumulator block (serial)."""
    a = NRT_ARRAY_OVERHEAD
    return {"score tile (Br x Bc)": block_q * block_kv * itemsize + a,
            "running max, sum (2 x Br)": 2 * (block_q * itemsize + a),
            "accumulator (Br x d)": block_q * d * itemsize + a}


@njit(cache=CACHE)
def scores_block(Qi, Kj, scale, Sij):
    """``Sij = Qi Kj^T * scale`` with one dot product per element."""
    br, bc = Sij.shape
    for r in range(br):
        for c in range(bc):
            dot = Qi.dtype.type(0)
            for t in range(Qi.shape[1]):
                dot += Qi[r, t] * Kj[c, t]
            Sij[r, c] = dot * scale


@njit(cache=CACHE)
def _online_block(Sij, Vj, m, l, acc):
    """Fold one score block into the running state ``(m, l, acc)`` of its ``br`` rows."""
    br, bc = Sij.shape
    zero = Sij.dtype.type(0)
    for r in range(br):
        m_new = m[r]
        for c in range(bc):
            if Sij[r, c] > m_new:
                m_new = Sij[r, c]
        m_use = m_new if m_new != NEG_INF else zero  # row fully masked so far
        alpha = math.exp(m[r] - m_use)
        rowsum = zero
        for c in range(bc):
            x = Sij[r, c]
            p = math.exp(x - m_use)
            rowsum += p
            Sij[r, c] = p if x != NEG_INF else HIDDEN  # Sij now holds Pij (HIDDEN: skip)
        l[r] = alpha * l[r] + rowsum
        m[r] = m_new
        for t in range(acc.shape[1]):  # acc = alpha * acc + Pij Vj, one dot per element
            pv = zero
            for c in range(bc):
                if Sij[r, c] != HIDDEN:  # selection: a hidden key adds nothing
                    pv += Sij[r, c] * Vj[c, t]
            acc[r, t] = alpha * acc[r, t] + pv


@njit(cache=CACHE)
def _q_block(Qi, K, V, bias, has_bias, b, h, i0, scale, causal, offset, block_kv,
             S, m, l, acc, Oi, lse_i):
    """All key blocks for one query block ``Qi`` (rows ``i0 ..``).

    ``S`` is a flat buffer of at least ``Br * Bc`` elements: each score block is a
    C-contiguous ``(br, bc)`` view of it, so its rows can be indexed from 0.
    """
    br = Qi.shape[0]
    Nk = K.shape[0]
    m[:br] = NEG_INF
    l[:br] = 0
    acc[:br] = 0
    kv_end = visible_end(i0 + br - 1, Nk, causal, offset)  # later key blocks are skipped
    for j0 in range(0, kv_end, block_kv):
        bc = min(block_kv, Nk - j0)
        Sij = S[:br * bc].reshape((br, bc))
        scores_block(Qi, K[j0:j0 + bc], scale, Sij)
        diagonal = causal and j0 + bc > i0 + offset + 1  # some key is in a row's future
        if has_bias or diagonal:
            mask_block(Sij, bias, has_bias, b, h, i0, j0, diagonal, offset)
        _online_block(Sij, V[j0:j0 + bc], m[:br], l[:br], acc[:br])
    for r in range(br):
        lse_i[r] = finalize_row(acc[r], m[r], l[r], Oi[r])


@njit(cache=CACHE, nogil=True)
def tiled_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse):
    """Serial driver over (b, h, query block)."""
    B, H, Nq, d = q.shape
    group = H // k.shape[1]
    S = np.empty(block_q * block_kv, dtype=q.dtype)
    m = np.empty(block_q, dtype=q.dtype)
    l = np.empty(block_q, dtype=q.dtype)
    acc = np.empty((block_q, d), dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            hk = h // group
            for i0 in range(0, Nq, block_q):
                i1 = min(i0 + block_q, Nq)
                _q_block(q[b, h, i0:i1], k[b, hk], v[b, hk], bias, has_bias, b, h, i0, scale,
                         causal, offset, block_kv, S, m, l, acc, out[b, h, i0:i1],
                         lse[b, h, i0:i1])
