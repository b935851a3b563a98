"""Backward rung 1, ``naive``: one query row at a time, recomputing P from the LSE.

For each row ``i`` (FlashAttention's recomputation, with no N x N buffer):

    D_i  = dO_i . O_i                      (= rowsum(P * dP): the softmax Jacobian trick)
    for each visible key j:
        P_ij = exp(q_i . k_j * scale + bias - lse_i);   Z_ij = keep / (1 - p) or 0
        dV_j += P_ij Z_ij dO_i
        dS_ij = P_ij (Z_ij dO_i . v_j - D_i)
        dQ_i += dS_ij k_j * scale;   dK_j += dS_ij q_i * scale

Serial, scalar, and accumulating in float64 (dK and dV in an O(N d) float64 buffer):
like the forward ``naive`` rung, a sequential float32 sum over thousands of rows would
lose to NumPy's pairwise sums. Rows with ``lse = -inf`` (fully masked) contribute
nothing and get ``dQ = 0``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fa_lab.settings.config import CACHE
from fa_lab.numerics.dropout import keep, row_key
from fa_lab.kernels.common import NEG_INF, NRT_ARRAY_OVERHEAD, visible_end


def scratch_bytes(*, B, H_kv, Nk, d, **_):
    """Byte model: float64 dK and dV accumulators and one dQ row."""
    a = NRT_ARRAY_OVERHEAD
    return {"dK, dV accumulators (float64)": 2 * (B * H_kv * Nk * d * 8 + a),
            "dQ row (float64)": d * 8 + a}


@njit(cache=CACHE)
def _row_backward(q_i, k, v, o_i, do_i, lse_i, scale, bias_i, has_bias, end, dropout_p, row,
                  dq_i, dk, dv):
    """Accumulate row ``i``'s contributions into ``dq_i``, ``dk``, ``dv`` (float64)."""
    d = q_i.shape[0]
    D = 0.0
    for t in range(d):
        D += do_i[t] * o_i[t]
    inv_keep = 1.0 / (1.0 - dropout_p)
    for j in range(end):
        s = 0.0
        for t in range(d):
            s += q_i[t] * k[j, t]
        x = q_i.dtype.type(s) * scale
        if has_bias:
            x = NEG_INF if bias_i[j] == NEG_INF else x + bias_i[j]
        if x == NEG_INF:
            continue  # hidden key: no probability, no gradient (selection, not 0 * NaN)
        p = math.exp(x - lse_i)
        z = 1.0
        if dropout_p > 0:
            z = inv_keep if keep(row, j, dropout_p) else 0.0
        dpd = 0.0
        if z != 0:  # a dropped key's value is skipped, as in the forward
            for t in range(d):
                dpd += do_i[t] * v[j, t]
        ds = p * (dpd * z - D)
        pz = p * z if z != 0 else 0.0  # a dropped key gets no dV (selection)
        for t in range(d):
            dv[j, t] += pz * do_i[t]
            dq_i[t] += ds * k[j, t]
            dk[j, t] += ds * q_i[t]


@njit(cache=CACHE, nogil=True)
def naive_backward(q, k, v, out, dout, lse, bias, has_bias, scale, causal, offset, block_q,
                   block_kv, dropout_p, seed_mixed, dq, dk, dv):
    """Serial driver over (b, h, i); writes ``dq`` (B, H, Nq, d), ``dk``/``dv`` (B, H_kv, Nk, d)."""
    B, H, Nq, d = q.shape
    H_kv, Nk = k.shape[1], k.shape[2]
    group = H // H_kv
    dk64 = np.zeros((B, H_kv, Nk, d))
    dv64 = np.zeros((B, H_kv, Nk, d))
    dq_i = np.empty(d)
    for b in range(B):
        for h in range(H):
            hk = h // group
            for i in range(Nq):
                dq_i[:] = 0.0
                lse_i = lse[b, h, i]
                if lse_i != NEG_INF:
                    bias_i = bias[b, h, i] if has_bias else bias[0, 0, 0]
                    _row_backward(q[b, h, i], k[b, hk], v[b, hk], out[b, h, i], dout[b, h, i],
                                  lse_i, scale, bias_i, has_bias,
                                  visible_end(i, Nk, causal, offset), dropout_p,
                                  row_key(seed_mixed, b, h, i), dq_i, dk64[b, hk], dv64[b, hk])
                for t in range(d):
                    dq[b, h, i, t] = dq_i[t] * scale
    for b in range(B):
        for hk in range(H_kv):
            for j in range(Nk):
                for t in range(d):
                    dk[b, hk, j, t] = dk64[b, hk, j, t] * scale
                    dv[b, hk, j, t] = dv64[b, hk, j, t]
