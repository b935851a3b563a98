"""The programmable kernel: ``flash``'s tiles with a learner's ``score_mod`` and
``mask_mod`` compiled into the tile loop (:mod:`fa_lab.numerics.flex`).

Per (b, h, query tile), in parallel: for every key tile the block mask lists as partial
or full (all tiles without a block mask), ``S = (Q_i scale) K_j^T`` with BLAS, then per
element ``s = score_mod(s, b, h, i, j)`` and, on partial tiles only, ``s = -inf`` where
``mask_mod(b, h, i, j)`` is False; then ``flash``'s online softmax and ``P V_j``. Empty
tiles are never touched. The functions arrive as compiled numba functions (first-class
arguments): each new function compiles this driver once more (not cached on disk).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fa_lab.kernels.common import NEG_INF, finalize_row, task_coords
from fa_lab.kernels.ladder.flash import all_finite, pv_select, rescale_add, row_state, softmax_block


@njit
def identity_score(score, b, h, q_idx, kv_idx):
    """``score_mod=None``: the score unchanged (compiles to nothing)."""
    return score


@njit
def attend_all(b, h, q_idx, kv_idx):
    """No ``mask_mod``: every key visible."""
    return True


@njit(nogil=True, error_model="numpy")
def _tile(Qi, Kj, Vj, b, h, i0, j0, partial, score_mod, has_score, mask_mod, stored, state,
          scratch):
    m, l, alpha, acc = state
    S_buf, P_buf, PV, _ = scratch  # (no Vpack: flex runs P V through BLAS)
    br, bc = Qi.shape[0], Kj.shape[0]
    S = S_buf[:br * bc].reshape((br, bc))
    np.dot(Qi, Kj.T, S)
    if has_score:  # two separate loops: no branch on the flags inside either
        for r in range(br):
            Sr = S[r]
            for c in range(bc):
                Sr[c] = score_mod(Sr[c], b, h, i0 + r, j0 + c)
    if partial and stored.shape[0] > 0:  # the tile's mask, evaluated once
        for r in range(br):
            Sr, Mr = S[r], stored[r]
            for c in range(bc):
                Sr[c] = Sr[c] if Mr[c] else NEG_INF
    elif partial:
        for r in range(br):
            Sr = S[r]
            for c in range(bc):
                if not mask_mod(b, h, i0 + r, j0 + c):
                    Sr[c] = NEG_INF
    P = P_buf[:br * bc].reshape((br, bc))
    softmax_block(S, m, l, alpha, P)
    if partial and not all_finite(Vj):
        pv_select(S, P, Vj, PV)  # a hidden NaN/inf value must not reach any row
    else:
        np.dot(P, Vj, PV)
    rescale_add(acc, alpha, PV)


@njit(parallel=True, nogil=True, error_model="numpy")
def flex_forward(q, k, v, scale, score_mod, has_score, mask_mod, kinds, index, stored,
                 block_q, block_kv, out, lse):
    """q (B, H, Nq, d), k (B, H_kv, Nk, d), v (B, H_kv, Nk, d_v); ``kinds`` (B or 1, H
    or 1, Tq, Tk) int8: 0 empty (skipped), 1 partial, 2 full. A partial tile reads its
    stored mask ``stored[index[...]]`` when ``index >= 0``, else calls ``mask_mod`` per
    element.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    Tr = (Nq + block_q - 1) // block_q
    Tk = (Nk + block_kv - 1) // block_kv
    Bm, Hm = kinds.shape[0], kinds.shape[1]
    for task in prange(B * H * Tr):
        b, h, i0 = task_coords(task, H, Tr, block_q)
        i1 = min(i0 + block_q, Nq)
        br = i1 - i0
        Qi = q[b, h, i0:i1] * scale
        K, V = k[b, h // group], v[b, h // group]
        state, scratch = row_state(br, V.shape[1], Qi, block_kv)
        bb, hh = 0 if Bm == 1 else b, 0 if Hm == 1 else h
        row = kinds[bb, hh, i0 // block_q]
        prow = index[bb, hh, i0 // block_q]
        for u in range(Tk):
            kind = row[u]
            if kind == 0:
                continue
            j0 = u * block_kv
            j1 = min(j0 + block_kv, Nk)
            p = prow[u]
            tile_mask = stored[max(p, 0)] if p >= 0 else stored[:0, 0]
            _tile(Qi, K[j0:j1], V[j0:j1], b, h, i0, j0, kind == 1, score_mod, has_score,
                  mask_mod, tile_mask, state, scratch)
        m, l, _, acc = state
        for r in range(br):
            lse[b, h, i0 + r] = finalize_row(acc[r], m[r], l[r], out[b, h, i0 + r])
