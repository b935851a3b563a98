"""Rung 3 (a side branch), ``fa1``: FlashAttention-1's loop order, kept to compare with ``tiled``.

FlashAttention (Dao et al. 2022), Algorithm 1, puts the loop over key/value blocks
**outside** and the loop over query blocks inside. The output ``O`` and the row state
``m``, ``l`` of every query row therefore live in slow memory and make a round trip on
every pass over the query blocks, and ``O`` is normalized at every step:

    O = 0 (Nq, d), l = 0 (Nq), m = -inf (Nq)                     in slow memory
    for j in 1..Tc:                 load Kj, Vj                    (Bc, d)
        for i in 1..Tr:             load Qi, Oi, li, mi            (Br, d), (Br)
            Sij = Qi Kj^T * scale (+ bias, causal mask)            (Br, Bc)
            m~ij = rowmax(Sij);  P~ij = exp(Sij - m~ij);  l~ij = rowsum(P~ij)
            mi_new = max(mi, m~ij)
            li_new = exp(mi - mi_new) li + exp(m~ij - mi_new) l~ij
            Oi = (li exp(mi - mi_new) Oi + exp(m~ij - mi_new) P~ij Vj) / li_new
            write Oi, li_new, mi_new                               back to slow memory
    lse = m + log(l)

``tiled`` (FlashAttention-2's order) swaps the loops: ``Qi`` and its accumulator stay
in fast memory for the whole pass over K and V, ``acc`` is left un-normalized, and
``1/l`` is applied once at the end. Everything else here is ``tiled``'s: the same
scalar score loop (imported from it), the same masking helper, one thread, strict IEEE
arithmetic, so a timing difference between the two is the loop order alone.

Causal: for key block ``j`` only query blocks with a row that sees one of its keys are
visited (the earlier query blocks are skipped); rows that never see a key keep
``O = 0``, ``l = 0`` and get ``lse = -inf``.

Measured results (FA1 vs FA2 order, with the modelled traffic at each cache level) are
in lesson ``09_memory_hierarchy``; it is never picked by ``kernel="auto"`` (same rung
as ``tiled`` and listed after it: ``auto`` tries rungs from the top and takes the first
kernel that supports the call).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fa_lab.settings.config import CACHE
from fa_lab.kernels.common import HIDDEN, NEG_INF, NRT_ARRAY_OVERHEAD, mask_block
from fa_lab.kernels.ladder.tiled import scores_block


def scratch_bytes(*, Nq, d, itemsize, block_q, block_kv, **_):
    """Byte model: one score tile, the row state of every query row (one head at a time;
    FA1 keeps it in slow memory), one row of ``P~ij Vj`` (serial)."""
    a = NRT_ARRAY_OVERHEAD
    return {"score tile (Br x Bc)": block_q * block_kv * itemsize + a,
            "row state m, l of all rows (2 x Nq)": 2 * (Nq * itemsize + a),
            "one row of P~ij Vj (d)": d * itemsize + a}


@njit(cache=CACHE)
def _fa1_update(Sij, Vj, m, l, Oi, pv):
    """Fold one score block into the state ``(m, l, Oi)`` of its rows, FA1 style:
    ``Oi`` stays normalized (divided by the new ``l`` at every step)."""
    br, bc = Sij.shape
    zero = Sij.dtype.type(0)
    for r in range(br):
        m_blk = NEG_INF  # m~ij: this block's row max
        for c in range(bc):
            if Sij[r, c] > m_blk:
                m_blk = Sij[r, c]
        m_new = max(m[r], m_blk)
        m_blk_use = m_blk if m_blk != NEG_INF else zero  # a row masked in this block
        m_new_use = m_new if m_new != NEG_INF else zero  # a row masked so far
        l_blk = zero  # l~ij
        for c in range(bc):
            x = Sij[r, c]
            p = math.exp(x - m_blk_use)  # P~ij
            l_blk += p
            Sij[r, c] = p if x != NEG_INF else HIDDEN  # HIDDEN: a masked key, skipped below
        alpha = math.exp(m[r] - m_new_use)  # rescales the old state
        beta = math.exp(m_blk - m_new_use)  # rescales this block
        l_new = alpha * l[r] + beta * l_blk
        m[r] = m_new
        if l_new == 0:  # nothing visible yet: O stays 0
            l[r] = l_new
            continue
        for t in range(Oi.shape[1]):
            acc = zero
            for c in range(bc):
                if Sij[r, c] != HIDDEN:  # selection: a hidden key adds nothing (NaN rule)
                    acc += Sij[r, c] * Vj[c, t]
            pv[t] = acc
        for t in range(Oi.shape[1]):  # normalized at every step
            Oi[r, t] = (l[r] * alpha * Oi[r, t] + beta * pv[t]) / l_new
        l[r] = l_new


@njit(cache=CACHE)
def _head(Q, K, V, bias, has_bias, b, h, scale, causal, offset, block_q, block_kv,
          S, m, l, pv, O, lse):
    """One (batch, head): key blocks outside, query blocks inside."""
    Nq, Nk = Q.shape[0], K.shape[0]
    O[:] = 0
    m[:Nq] = NEG_INF
    l[:Nq] = 0
    for j0 in range(0, Nk, block_kv):  # outer loop: Kj, Vj
        bc = min(block_kv, Nk - j0)
        first = 0
        if causal:  # rows i < j0 - offset see no key of this block
            first = (max(j0 - offset, 0) // block_q) * block_q
        for i0 in range(first, Nq, block_q):  # inner loop: Qi, Oi, mi, li
            br = min(block_q, Nq - i0)
            Sij = S[:br * bc].reshape((br, bc))
            scores_block(Q[i0:i0 + br], K[j0:j0 + bc], scale, Sij)
            diagonal = causal and j0 + bc > i0 + offset + 1
            if has_bias or diagonal:
                mask_block(Sij, bias, has_bias, b, h, i0, j0, diagonal, offset)
            _fa1_update(Sij, V[j0:j0 + bc], m[i0:i0 + br], l[i0:i0 + br], O[i0:i0 + br], pv)
    for r in range(Nq):
        lse[r] = NEG_INF if l[r] == 0 else m[r] + math.log(l[r])


@njit(cache=CACHE, nogil=True)
def fa1_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse):
    """Serial driver over (b, h); each head runs FlashAttention-1's loop order."""
    B, H, Nq, d = q.shape
    group = H // k.shape[1]
    S = np.empty(block_q * block_kv, dtype=q.dtype)
    m = np.empty(Nq, dtype=q.dtype)
    l = np.empty(Nq, dtype=q.dtype)
    pv = np.empty(d, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            hk = h // group
            _head(q[b, h], k[b, hk], v[b, hk], bias, has_bias, b, h, scale, causal, offset,
                  block_q, block_kv, S, m, l, pv, out[b, h], lse[b, h])
