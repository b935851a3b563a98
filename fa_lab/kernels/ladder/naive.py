"""Rung 1, ``naive``: one query row at a time, three passes over a row of scores.

For each row ``i``: pass 1 computes ``S[i, :] = q_i . k_j * scale (+ bias)`` into an
``Nk`` buffer and its max ``m``; pass 2 replaces it by ``P = exp(S - m)`` and sums
``l``; pass 3 computes ``O_i = sum_j P_j v_j / l``. Scalar loops, strict IEEE
arithmetic (no fastmath: LLVM cannot vectorize the dot-product reduction), one thread.
It stores O(Nk) scores per row, never the N x N matrix.

Sums (dot products, ``l``, ``P V``) are accumulated in float64 even for float32
inputs: a sequential float32 sum over thousands of keys is less accurate than NumPy's
pairwise summation (measured at N=4096: 2.2x the allowed error), and scalar float64
arithmetic costs the same as float32 on x86. Scores and probabilities stay in the
input dtype.

Measured (B=1, H=8, N=1024, d=64, float32, one run with every rung; 2-core AMD EPYC
with AVX-512, numba 0.68.1; ``data/bench_ladder.csv``): 558 ms, 3.8 GFLOP/s
(PyTorch's SDPA: 14.7 ms in the same run). The slowest rung, by design.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fa_lab.settings.config import CACHE
from fa_lab.kernels.common import HIDDEN, NEG_INF, NRT_ARRAY_OVERHEAD, finalize_row, visible_end


def scratch_bytes(*, Nk, d, itemsize, **_):
    """Byte model of the driver's own allocations: one score row and a float64 accumulator."""
    return {"score row (Nk)": Nk * itemsize + NRT_ARRAY_OVERHEAD,
            "accumulator (d, float64)": d * 8 + NRT_ARRAY_OVERHEAD}


@njit(cache=CACHE)
def _row_scores(q_i, k, scale, bias_i, has_bias, end, s):
    """Pass 1: ``s[j] = q_i . k_j * scale (+ bias_i[j])`` for visible keys; returns the max."""
    Nk, d = k.shape
    m = NEG_INF
    for j in range(Nk):
        if j >= end:
            s[j] = NEG_INF
            continue
        dot = 0.0  # float64 accumulator
        for t in range(d):
            dot += q_i[t] * k[j, t]
        s[j] = dot * scale
        if has_bias:  # selection: a hidden key's score is -inf even if it is NaN
            s[j] = NEG_INF if bias_i[j] == NEG_INF else s[j] + bias_i[j]
        x = s[j]  # rounded to the input dtype, as stored
        if x > m:  # a NaN score never wins; it propagates through exp instead
            m = x
    return m


@njit(cache=CACHE)
def _row_attention(q_i, k, v, scale, bias_i, has_bias, end, s, acc, out_i):
    """The three passes for one query row; returns the row's lse."""
    m = _row_scores(q_i, k, scale, bias_i, has_bias, end, s)
    m_use = m if m != NEG_INF else q_i.dtype.type(0)  # fully masked: exp(-inf - 0) = 0
    l = 0.0  # float64 accumulator
    for j in range(k.shape[0]):  # pass 2: P = exp(S - m), l = rowsum(P)
        x = s[j]
        p = math.exp(x - m_use)
        l += p
        s[j] = p if x != NEG_INF else HIDDEN  # hidden keys are skipped in pass 3
    for t in range(v.shape[1]):  # pass 3: acc = P V
        a = 0.0  # float64 accumulator
        for j in range(v.shape[0]):
            if s[j] != HIDDEN:  # selection: never 0 * v (0 * NaN is NaN)
                a += s[j] * v[j, t]
        acc[t] = a
    return finalize_row(acc, m, l, out_i)


@njit(cache=CACHE, nogil=True)
def naive_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse):
    """Serial driver over (b, h, i); ``block_q``/``block_kv`` are unused."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    s = np.empty(Nk, dtype=q.dtype)  # one row of scores: O(Nk) scratch
    acc = np.empty(d, dtype=np.float64)
    for b in range(B):
        for h in range(H):
            hk = h // group
            for i in range(Nq):
                bias_i = bias[b, h, i] if has_bias else bias[0, 0, 0]
                end = visible_end(i, Nk, causal, offset)
                lse[b, h, i] = _row_attention(q[b, h, i], k[b, hk], v[b, hk], scale,
                                              bias_i, has_bias, end, s, acc, out[b, h, i])
