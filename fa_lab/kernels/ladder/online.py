"""Rung 2, ``online``: one pass over the keys with a running max and sum.

For each query row, keys stream in one at a time. The state is ``(m, l, acc)``: the
max so far, the sum of ``exp(s - m)`` so far, and the un-normalized output. When a
new score beats ``m``, the old ``l`` and ``acc`` are rescaled by ``exp(m_old - m_new)``
(the online softmax of Milakov & Gimelshein, 2018, fused with ``P V``). No score
buffer at all: O(d) state per row. Scalar, strict IEEE, one thread, like ``naive``.

The state ``l, acc`` and the dot products are accumulated in float64 even for float32
inputs, for the reason given in :mod:`fa_lab.kernels.ladder.naive` (a sequential float32 sum
over N=4096 keys measured 2.1x the allowed error).

The rescale of ``acc`` costs ``d`` multiplies per key; the tiled rungs amortize it over
a block of keys.

Measured (B=1, H=8, N=1024, d=64, float32, one run with every rung; 2-core AMD EPYC
with AVX-512, numba 0.68.1; ``data/bench_ladder.csv``): 450 ms, 4.8 GFLOP/s:
1.24x ``naive``.
"""

from __future__ import annotations

import math

from numba import njit

import numpy as np

from fa_lab.settings.config import CACHE
from fa_lab.kernels.common import NEG_INF, NRT_ARRAY_OVERHEAD, finalize_row, visible_end


def scratch_bytes(*, d, **_):
    """Byte model of the driver's own allocations: the float64 accumulator, nothing else."""
    return {"accumulator (d, float64)": d * 8 + NRT_ARRAY_OVERHEAD}


@njit(cache=CACHE)
def _row_attention(q_i, k, v, scale, bias_i, has_bias, end, acc, out_i):
    """Single pass over keys ``0 .. end-1`` for one query row; returns the row's lse."""
    zero = q_i.dtype.type(0)
    d = q_i.shape[0]
    m = q_i.dtype.type(NEG_INF)
    l = 0.0  # float64 accumulators: l, acc, dot
    acc[:] = 0.0
    for j in range(end):
        dot = 0.0
        for t in range(d):
            dot += q_i[t] * k[j, t]
        x = q_i.dtype.type(dot) * scale
        if has_bias:
            x = NEG_INF if bias_i[j] == NEG_INF else x + bias_i[j]
        if x == NEG_INF:
            continue  # a hidden key contributes nothing (selection: never 0 * v)
        m_new = x if x > m else m
        m_use = m_new if m_new != NEG_INF else zero  # all -inf so far: keep exp finite
        alpha = math.exp(m - m_use)  # rescale of the old state
        p = math.exp(x - m_use)
        l = l * alpha + p
        for t in range(d):
            acc[t] = acc[t] * alpha + p * v[j, t]
        m = m_new
    return finalize_row(acc, m, l, out_i)


@njit(cache=CACHE, nogil=True)
def online_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse):
    """Serial driver over (b, h, i); ``block_q``/``block_kv`` are unused."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    acc = np.empty(d, dtype=np.float64)
    for b in range(B):
        for h in range(H):
            hk = h // group
            for i in range(Nq):
                bias_i = bias[b, h, i] if has_bias else bias[0, 0, 0]
                end = visible_end(i, Nk, causal, offset)
                lse[b, h, i] = _row_attention(q[b, h, i], k[b, hk], v[b, hk], scale,
                                              bias_i, has_bias, end, acc, out[b, h, i])
