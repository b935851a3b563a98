"""Backward rung 2, ``tiled``: FlashAttention-2's backward, in two race-free parallel passes.

Recompute instead of store: only ``O`` and the row ``lse`` come from the forward. With
``D = rowsum(dO * O)`` computed first, each tile ``(Qi, Kj)`` is recomputed as

    Pij  = exp(Qi Kj^T * scale (+ bias, causal mask) - lse_i)        (Br x Bc)
    dVj += (Pij * Z)^T dOi;   dPij = (dOi Vj^T) * Z;   dSij = Pij * (dPij - D_i)
    dKj += dSij^T Qi * scale; dQi += dSij Kj * scale

**Why two passes.** FlashAttention-2 parallelizes over key blocks: a task owns ``dKj``
and ``dVj`` and loops over all query blocks, but then every task adds into every
``dQi``, which GPUs resolve with atomic adds. Numba has no float atomics, and
per-thread copies of ``dQ`` cost ``threads x N x d`` memory and a reduction. So:

1. ``prange`` over (batch, kv head, key block): ``dKj``, ``dVj``, summed over the query
   heads of a GQA group inside the task (so the GQA sum needs no reduction either);
2. ``prange`` over (batch, head, query block): ``dQi``, recomputing ``Pij`` and ``dPij``.

No races and deterministic results (independent of thread count), at the price of
recomputing ``Pij`` and ``dPij`` twice: 7 block products instead of 5 (the forward
does 2), so about 3.5x the forward's FLOPs instead of 2.5x. Causal tiles in the future
of a query block are skipped in both passes. Each block's contribution is summed into
a zeroed tile before it is added to the accumulator (blocked summation: float32 sums
over thousands of rows stay within the 3x error rule). Inner loops are contiguous and
carry no reduction, as in ``tiled_simd``; exp stays scalar.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fa_lab.settings.config import CACHE, FASTMATH
from fa_lab.numerics.dropout import keep, row_key
from fa_lab.kernels.common import (NEG_INF, NRT_ARRAY_OVERHEAD, mask_block,
                                   softcap_alibi_block, task_coords, window_block,
                                   window_cuts, window_keys)


def scratch_bytes(*, B, H, Nq, d, itemsize, block_q, block_kv, threads, **_):
    """Byte model: D (B, H, Nq) plus, per running task, the tiles of one pass.

    Both passes hold S, dP, Kj^T, Vj^T; pass 1 adds dKj, dVj and a tile, pass 2 dQi and
    a tile. The passes do not overlap, so a task needs the larger of the two.
    """
    a = NRT_ARRAY_OVERHEAD
    shared = (2 * block_q * block_kv + 2 * d * block_kv) * itemsize + 4 * a
    per_task = shared + max(3 * block_kv * d * itemsize + 3 * a,
                            2 * block_q * d * itemsize + 2 * a)
    return {"D = rowsum(dO * O)": B * H * Nq * itemsize + a,
            f"tiles per task x {threads} threads": threads * per_task}


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _transpose(X, XT):
    """``XT[:d, :n] = X[:n, :d]^T`` into a flat buffer; returns the (d, n) view."""
    n, d = X.shape
    T = XT[:d * n].reshape((d, n))
    for c in range(n):
        Xc = X[c]
        for t in range(d):
            T[t, c] = Xc[t]
    return T


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _matmul_nt(A, BT, scale, C):
    """``C = A B^T * scale`` given ``BT`` (d, n): outer products, contiguous inner loop."""
    br, bc = C.shape
    for r in range(br):
        Cr = C[r]
        Ar = A[r]
        for c in range(bc):
            Cr[c] = 0
        for t in range(A.shape[1]):
            a = Ar[t] * scale
            BTt = BT[t]
            for c in range(bc):
                Cr[c] += a * BTt[c]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _ds_block(P, dP, lse_i, D_i, dropout_p, seed_mixed, b, h, i0, j0):
    """In place: ``P <- exp(S - lse) * Z`` (dropped probabilities) and ``dP <- dS``.

    On entry ``P`` holds the masked scores and ``dP`` holds ``dO Vj^T``.
    A hidden key (score ``-inf``) gets ``P = dS = 0`` by selection: its ``dO Vj^T``
    may be NaN (a NaN value) and ``0 * NaN`` is NaN.
    """
    br, bc = P.shape
    zero = P.dtype.type(0)
    inv_keep = P.dtype.type(1 / (1 - dropout_p))
    for r in range(br):
        Pr = P[r]
        dPr = dP[r]
        if lse_i[r] == NEG_INF:  # fully masked row: no probability, no gradient
            for c in range(bc):
                Pr[c] = 0
                dPr[c] = 0
            continue
        row = row_key(seed_mixed, b, h, i0 + r) if dropout_p > 0 else np.uint64(0)
        for c in range(bc):
            x = Pr[c]
            if x == NEG_INF:  # hidden key: selected away
                Pr[c] = zero
                dPr[c] = zero
                continue
            p = math.exp(x - lse_i[r])
            if dropout_p > 0:
                if keep(row, j0 + c, dropout_p):
                    dPr[c] = p * (dPr[c] * inv_keep - D_i[r])
                    Pr[c] = p * inv_keep
                else:  # dropped: its value is skipped, the softmax term stays
                    dPr[c] = p * (zero - D_i[r])
                    Pr[c] = zero
            else:
                dPr[c] = p * (dPr[c] - D_i[r])
                Pr[c] = p


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _accumulate_t(W, X, acc, tmp):
    """``acc += W^T X`` (W: br x bc, X: br x d, acc: bc x d) via a zeroed ``tmp`` tile."""
    br, bc = W.shape
    tmp[:] = 0
    for r in range(br):
        Xr = X[r]
        Wr = W[r]
        for c in range(bc):
            w = Wr[c]
            tc = tmp[c]
            for t in range(Xr.shape[0]):
                tc[t] += w * Xr[t]
    for c in range(bc):
        for t in range(acc.shape[1]):
            acc[c, t] += tmp[c, t]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _accumulate(W, X, acc, tmp):
    """``acc += W X`` (W: br x bc, X: bc x d, acc: br x d) via a zeroed ``tmp`` tile.

    A zero weight is skipped (selection): ``dS = 0`` for a hidden key whose row of ``X``
    (a key) may be NaN."""
    br, bc = W.shape
    tmp[:] = 0
    for r in range(br):
        Wr = W[r]
        tr = tmp[r]
        for c in range(bc):
            w = Wr[c]
            if w == 0:
                continue
            Xc = X[c]
            for t in range(Xc.shape[0]):
                tr[t] += w * Xc[t]
    for r in range(br):
        for t in range(acc.shape[1]):
            acc[r, t] += tmp[r, t]


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _chain_softcap(dS, G):
    """``dS <- dS * G`` with ``G = 1 - tanh^2(x / c)``: the softcap's derivative."""
    for r in range(dS.shape[0]):
        dSr, Gr = dS[r], G[r]
        for c in range(dS.shape[1]):
            dSr[c] *= Gr[c]


@njit(cache=CACHE)
def _tile(q, k, v, dout, lse, D, bias, has_bias, scale, causal, offset, dropout_p,
          seed_mixed, b, h, hk, i0, br, j0, bc, S, dP, KT, VT, mods, G_buf):
    """Recompute one tile: returns views (P*Z, dS) of shape (br, bc).

    ``mods = (left, right, softcap, slopes, has_alibi)`` (:mod:`fa_lab.numerics.scoremod`); with a
    softcap, ``dS`` is taken through ``c tanh(x / c)`` (``G_buf`` holds ``1 - tanh^2``)."""
    left, right, softcap, slopes, has_alibi = mods
    Sij = S[:br * bc].reshape((br, bc))
    dPij = dP[:br * bc].reshape((br, bc))
    _matmul_nt(q[b, h, i0:i0 + br], _transpose(k[b, hk, j0:j0 + bc], KT), scale, Sij)
    G = G_buf[:br * bc].reshape((br, bc)) if softcap > 0 else G_buf[:0].reshape((0, 0))
    if softcap > 0 or has_alibi:
        softcap_alibi_block(Sij, softcap, slopes, has_alibi, b, h, i0, j0, offset, G)
    diagonal = causal and j0 + bc > i0 + offset + 1
    if has_bias or diagonal:
        mask_block(Sij, bias, has_bias, b, h, i0, j0, diagonal, offset)
    if window_cuts(i0, br, j0, bc, offset, left, right):
        window_block(Sij, i0, j0, offset, left, right)
    _matmul_nt(dout[b, h, i0:i0 + br], _transpose(v[b, hk, j0:j0 + bc], VT),
               Sij.dtype.type(1), dPij)
    _ds_block(Sij, dPij, lse[b, h, i0:i0 + br], D[b, h, i0:i0 + br], dropout_p, seed_mixed,
              b, h, i0, j0)
    if softcap > 0:
        _chain_softcap(dPij, G)
    return Sij, dPij


@njit(cache=CACHE)
def _rows_seeing(j0, bc, Nq, causal, offset, left, right):
    """Query rows ``[first, end)`` that can see some key of block ``j0 .. j0 + bc - 1``
    under causal and the window; earlier and later query blocks are skipped."""
    first = max(j0 - offset, 0) if causal else 0
    if right >= 0:
        first = max(first, j0 - offset - right)
    end = Nq
    if left >= 0:
        end = min(end, max(j0 + bc - offset + left, 0))
    return min(first, Nq), end


@njit(cache=CACHE, parallel=True, nogil=True)
def tiled_backward(q, k, v, out, dout, lse, bias, has_bias, scale, causal, offset, block_q,
                   block_kv, dropout_p, seed_mixed, dq, dk, dv, left, right, softcap, slopes,
                   has_alibi):
    """Driver: D, then pass 1 (dK, dV over key blocks), then pass 2 (dQ over query blocks).

    ``left, right, softcap, slopes, has_alibi``: :mod:`fa_lab.numerics.scoremod`."""
    mods = (left, right, softcap, slopes, has_alibi)
    B, H, Nq, d = q.shape
    H_kv, Nk, dv_ = k.shape[1], k.shape[2], v.shape[3]  # d_v may differ from d
    group = H // H_kv
    D = np.empty((B, H, Nq), dtype=q.dtype)
    for row in prange(B * H * Nq):
        b, h, i = row // (H * Nq), (row // Nq) % H, row % Nq
        acc = q.dtype.type(0)
        for t in range(dv_):
            acc += dout[b, h, i, t] * out[b, h, i, t]
        D[b, h, i] = acc
    Tc = (Nk + block_kv - 1) // block_kv
    for task in prange(B * H_kv * Tc):  # pass 1: one task owns dKj, dVj
        b, hk, j0 = task_coords(task, H_kv, Tc, block_kv)
        bc = min(block_kv, Nk - j0)
        S = np.empty(block_q * block_kv, dtype=q.dtype)
        dP = np.empty(block_q * block_kv, dtype=q.dtype)
        KT = np.empty(d * block_kv, dtype=q.dtype)
        VT = np.empty(dv_ * block_kv, dtype=q.dtype)
        dKj = np.zeros((bc, d), dtype=q.dtype)
        dVj = np.zeros((bc, dv_), dtype=q.dtype)
        tmp = np.empty((bc, d), dtype=q.dtype)
        tmp_v = np.empty((bc, dv_), dtype=q.dtype)
        G = np.empty(block_q * block_kv if softcap > 0 else 0, dtype=q.dtype)
        # rows outside [first, end) see none of these keys (causal, window)
        first, end = _rows_seeing(j0, bc, Nq, causal, offset, left, right)
        for g in range(group):
            h = hk * group + g
            for i0 in range((first // block_q) * block_q, end, block_q):
                br = min(block_q, Nq - i0)
                Pz, dS = _tile(q, k, v, dout, lse, D, bias, has_bias, scale, causal, offset,
                               dropout_p, seed_mixed, b, h, hk, i0, br, j0, bc, S, dP, KT, VT,
                               mods, G)
                _accumulate_t(Pz, dout[b, h, i0:i0 + br], dVj, tmp_v)
                _accumulate_t(dS, q[b, h, i0:i0 + br], dKj, tmp)
        for c in range(bc):
            for t in range(d):
                dk[b, hk, j0 + c, t] = dKj[c, t] * scale
            for t in range(dv_):
                dv[b, hk, j0 + c, t] = dVj[c, t]
    Tr = (Nq + block_q - 1) // block_q
    for task in prange(B * H * Tr):  # pass 2: one task owns dQi
        b, h, i0 = task_coords(task, H, Tr, block_q)
        br = min(block_q, Nq - i0)
        hk = h // group
        S = np.empty(block_q * block_kv, dtype=q.dtype)
        dP = np.empty(block_q * block_kv, dtype=q.dtype)
        KT = np.empty(d * block_kv, dtype=q.dtype)
        VT = np.empty(dv_ * block_kv, dtype=q.dtype)
        dQi = np.zeros((br, d), dtype=q.dtype)
        tmp = np.empty((br, d), dtype=q.dtype)
        G = np.empty(block_q * block_kv if softcap > 0 else 0, dtype=q.dtype)
        j_lo, kv_end = window_keys(i0, br, Nk, causal, offset, left, right, block_kv)
        for j0 in range(j_lo, kv_end, block_kv):
            bc = min(block_kv, Nk - j0)
            Pz, dS = _tile(q, k, v, dout, lse, D, bias, has_bias, scale, causal, offset,
                           dropout_p, seed_mixed, b, h, hk, i0, br, j0, bc, S, dP, KT, VT,
                           mods, G)
            _accumulate(dS, k[b, hk, j0:j0 + bc], dQi, tmp)
        for r in range(br):
            for t in range(d):
                dq[b, h, i0 + r, t] = dQi[r, t] * scale
