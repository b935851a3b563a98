"""Packed variable-length batches (flash-attn's ``varlen`` layout) on ``flash``'s tiles.

The sequences of a batch are concatenated along the token axis, ``cu_seqlens`` gives
where each starts; sequence ``b``'s queries see only its own keys. No padding is
computed: the tasks are ``(sequence, head, query block)`` triples of the real tokens
(:func:`varlen_tasks`), spread over the threads by one ``prange``, and each runs
``flash.q_block`` (BLAS block products, the fused softmax, window/softcap/ALiBi) on
that sequence's rows. The work is the sum of per-sequence work.

The driver reads ``(H, total, d)`` arrays: the public wrapper transposes flash-attn's
``(total, H, d)`` once (``O(total H d)``, against the attention's ``O(N^2 d)`` per
sequence), so every tile is C-contiguous for BLAS.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fa_lab.settings.config import CACHE
from fa_lab.kernels.ladder.flash import q_block


def varlen_tasks(cu_q: np.ndarray, H: int, block_q: int) -> np.ndarray:
    """``(n, 3)`` int64 rows ``(sequence, head, first query row)``: one per query block of
    every non-empty sequence, longest sequences first (their tasks are the slowest, so
    a thread that takes them first balances the load better)."""
    lens = np.diff(cu_q)
    order = np.argsort(-lens, kind="stable")
    tasks = [(b, h, i0) for b in order for h in range(H) for i0 in range(0, lens[b], block_q)]
    return np.array(tasks, dtype=np.int64).reshape(-1, 3)


@njit(cache=CACHE, parallel=True, nogil=True)
def flash_varlen_forward(q, k, v, cu_q, cu_k, tasks, bias, scale, causal, top_left,
                         block_q, block_kv, out, lse, left, right, softcap, slopes, has_alibi):
    """One ``prange`` over the tasks of :func:`varlen_tasks`.

    q (H, total_q, d), k/v (H_kv, total_k, d), out (H, total_q, d), lse (H, total_q);
    sequence ``b`` has rows ``cu_q[b] .. cu_q[b+1]`` and keys ``cu_k[b] .. cu_k[b+1]``.
    ``top_left``: offset 0 (``causal=True``), else each sequence's ``Nk_b - Nq_b``.
    ``bias`` is a placeholder (no mask in the packed layout). ``slopes`` is (B, H).
    """
    group = q.shape[0] // k.shape[0]
    for t in prange(tasks.shape[0]):
        b, h, i0 = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        q0, k0 = cu_q[b], cu_k[b]
        Nq_b, Nk_b = cu_q[b + 1] - q0, cu_k[b + 1] - k0
        offset = 0 if top_left else Nk_b - Nq_b
        i1 = min(i0 + block_q, Nq_b)
        hk = h // group
        q_block(q[h, q0 + i0:q0 + i1] * scale, k[hk, k0:k0 + Nk_b], v[hk, k0:k0 + Nk_b],
                 bias, False, b, h, i0, causal, offset, 0, Nk_b, block_kv,
                 out[h, q0 + i0:q0 + i1], lse[h, q0 + i0:q0 + i1], 3, left, right, softcap,
                 slopes, has_alibi)
