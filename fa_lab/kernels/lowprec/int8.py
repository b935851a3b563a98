"""INT8 attention kernels: ``Q`` and ``K`` as int8 with per-row scales, ``V`` in float.

Scores are integer dot products, accumulated exactly in int32 and rescaled inside the
tiled online-softmax loop: ``S[r, c] = (sum_t q8[r, t] k8[c, t]) * (sq[r] * scale) *
sk[c]``. Everything after that (masking, softmax, ``P V``) is float, as in the float
rungs. One scale per row covers every granularity of :mod:`fa_lab.numerics.quant` (per tensor,
per token and per block scales are all stored per row).

Two rungs, the same way the float ladder has them:

* ``int8_naive``: one query row at a time, one key at a time, scalar int32 dot
  products and float64 accumulators (``online``'s structure), 1 thread.
* ``int8_simd``: ``tiled_simd``'s structure (``prange`` over (b, h, query block), key
  blocks, causal block skipping) with an integer score block: each dot product widens
  int8 to int32 and keeps the sum in int32, a reduction LLVM may reorder (integer
  addition is associative), so it vectorizes into ``vpmaddwd`` (pairs of int16
  products summed into int32) or the VNNI ``vpdpwssd``; a test reads the assembly.
  The softmax is ``flash``'s fused block function; ``P V`` is ``tiled_simd``'s loop.

Why int32 casts everywhere: ``int8 * int8`` in numba promotes to int64 and vectorizes in
slow 64-bit lanes (8 per zmm register instead of 16); casting each product
back to int32 keeps 16 lanes per zmm. |q8 . k8| <= 127^2 * d fits int32 for any d < 133,000.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fa_lab.settings.config import CACHE, FASTMATH
from fa_lab.kernels.common import (NEG_INF, NRT_ARRAY_OVERHEAD, finalize_row, mask_block,
                                   task_coords, visible_end)
from fa_lab.kernels.ladder.flash import softmax_block


def scratch_bytes_simd(*, B, H, Nq, d, itemsize, block_q, block_kv, threads, **_):
    """Per running task: int32 score tile, float score and P tiles (Br x Bc), acc
    (Br x d), the scaled query-row scales and the pv row, three row vectors."""
    a = NRT_ARRAY_OVERHEAD
    tasks = B * H * -(-Nq // block_q)
    live = max(1, min(threads, tasks))
    per = (4 * block_q * block_kv + 2 * block_q * block_kv * itemsize
           + (block_q * d + d + 4 * block_q) * itemsize) + 8 * a
    return {f"tiles (S int32, S, P, acc, row state) x {live} threads": live * per}


def scratch_bytes_naive(*, d, itemsize, **_):
    """One row: the float64 accumulator (d) and the output row staging."""
    return {"accumulator row (d, float64)": d * 8 + NRT_ARRAY_OVERHEAD}


@njit(cache=CACHE, error_model="numpy")
def dot_i8(a, b):
    """Exact int32 dot product of two int8 vectors (widened element by element)."""
    acc = np.int32(0)
    for t in range(a.shape[0]):
        acc = np.int32(acc + np.int32(a[t]) * np.int32(b[t]))
    return acc


@njit(cache=CACHE, nogil=True)
def int8_naive_forward(q8, sq, k8, sk, v, bias, has_bias, scale, causal, offset, out, lse):
    """Rows one by one, keys one by one: int32 dot, then the online softmax in float64."""
    B, H, Nq, d = q8.shape
    Nk = k8.shape[2]
    group = H // k8.shape[1]
    acc = np.empty(d, dtype=np.float64)
    for b in range(B):
        for h in range(H):
            hk = h // group
            for i in range(Nq):
                qi, row_scale = q8[b, h, i], sq[b, h, i] * scale
                m = -np.inf
                l = 0.0
                acc[:] = 0.0
                for j in range(visible_end(i, Nk, causal, offset)):
                    s = float(dot_i8(qi, k8[b, hk, j])) * row_scale * sk[b, hk, j]
                    if has_bias:
                        bij = bias[b, h, i, j]
                        s = -np.inf if bij == -np.inf else s + bij
                    if s == -np.inf:
                        continue  # hidden key: selected away, never 0 * v
                    m_new = max(m, s) if s == s else s
                    if m_new == -np.inf:
                        continue  # masked so far: nothing to add
                    alpha = math.exp(m - m_new)
                    p = math.exp(s - m_new)
                    l = alpha * l + p
                    vj = v[b, hk, j]
                    for t in range(d):
                        acc[t] = alpha * acc[t] + p * vj[t]
                    m = m_new
                lse[b, h, i] = finalize_row(acc, m, l, out[b, h, i])


@njit(cache=CACHE, error_model="numpy")
def scores_block_i8(Qi8, Kj8, S32):
    """``S32[r, c] = sum_t Qi8[r, t] Kj8[c, t]`` in int32 (the vectorized dot products)."""
    br, bc = S32.shape
    d = Qi8.shape[1]
    for r in range(br):
        Qr = Qi8[r]
        Sr = S32[r]
        for c in range(bc):
            Kc = Kj8[c]
            acc = np.int32(0)
            for t in range(d):
                acc = np.int32(acc + np.int32(Qr[t]) * np.int32(Kc[t]))
            Sr[c] = acc


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _rescale_scores(S32, row_scale, sk_j, S):
    """``S[r, c] = S32[r, c] * row_scale[r] * sk_j[c]`` (float)."""
    br, bc = S32.shape
    for r in range(br):
        a = row_scale[r]
        S32r, Sr = S32[r], S[r]
        for c in range(bc):
            Sr[c] = S32r[c] * a * sk_j[c]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _pv_block(S, P, Vj, alpha, acc, pv):
    """``acc = alpha acc + P Vj``, row by row, contiguous inner loops (as tiled_simd);
    keys whose score ``S`` is ``-inf`` (hidden) are skipped (selection, not ``0 * v``)."""
    br, bc = P.shape
    for r in range(br):
        Pr, Sr = P[r], S[r]
        pv[:] = 0
        for c in range(bc):
            if Sr[c] == NEG_INF:
                continue
            p = Pr[c]
            Vc = Vj[c]
            for t in range(pv.shape[0]):
                pv[t] += p * Vc[t]
        a = alpha[r]
        acc_r = acc[r]
        for t in range(acc_r.shape[0]):
            acc_r[t] = a * acc_r[t] + pv[t]


@njit(cache=CACHE)
def _q_block_i8(Qi8, row_scale, K8, sk, V, bias, has_bias, b, h, i0, causal, offset,
                block_kv, S32_buf, S_buf, P_buf, pv, m, l, alpha, acc, Oi, lse_i):
    br = Qi8.shape[0]
    Nk = K8.shape[0]
    m[:] = NEG_INF
    l[:] = 0
    acc[:] = 0
    for j0 in range(0, visible_end(i0 + br - 1, Nk, causal, offset), block_kv):
        bc = min(block_kv, Nk - j0)
        S32 = S32_buf[:br * bc].reshape((br, bc))
        scores_block_i8(Qi8, K8[j0:j0 + bc], S32)
        S = S_buf[:br * bc].reshape((br, bc))
        _rescale_scores(S32, row_scale, sk[j0:j0 + bc], S)
        diagonal = causal and j0 + bc > i0 + offset + 1
        if has_bias or diagonal:
            mask_block(S, bias, has_bias, b, h, i0, j0, diagonal, offset)
        P = P_buf[:br * bc].reshape((br, bc))
        softmax_block(S, m, l, alpha, P)
        _pv_block(S, P, V[j0:j0 + bc], alpha, acc, pv)
    for r in range(br):
        lse_i[r] = finalize_row(acc[r], m[r], l[r], Oi[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def int8_simd_forward(q8, sq, k8, sk, v, bias, has_bias, scale, causal, offset, block_q,
                      block_kv, out, lse):
    """Parallel driver over (b, h, query block), as ``tiled_simd``."""
    B, H, Nq, d = q8.shape
    group = H // k8.shape[1]
    Tr = (Nq + block_q - 1) // block_q
    for task in prange(B * H * Tr):
        b, h, i0 = task_coords(task, H, Tr, block_q)
        i1 = min(i0 + block_q, Nq)
        br = i1 - i0
        hk = h // group
        row_scale = sq[b, h, i0:i1] * scale
        S32_buf = np.empty(br * block_kv, dtype=np.int32)
        S_buf = np.empty(br * block_kv, dtype=v.dtype)
        P_buf = np.empty(br * block_kv, dtype=v.dtype)
        pv = np.empty(d, dtype=v.dtype)
        m = np.empty(br, dtype=v.dtype)
        l = np.empty(br, dtype=v.dtype)
        alpha = np.empty(br, dtype=v.dtype)
        acc = np.empty((br, d), dtype=v.dtype)
        _q_block_i8(q8[b, h, i0:i1], row_scale, k8[b, hk], sk[b, hk], v[b, hk], bias,
                    has_bias, b, h, i0, causal, offset, block_kv, S32_buf, S_buf, P_buf, pv,
                    m, l, alpha, acc, out[b, h, i0:i1], lse[b, h, i0:i1])
