"""FlashAttention-2's forward as a ``numba.cuda`` kernel (rung ``cuda_fa2``).

The CPU ladder's ``tiled_simd`` mapped onto a GPU, one concept for one concept:

=====================================  =============================================
CPU (``tiled_simd``)                   GPU (this kernel)
=====================================  =============================================
one ``prange`` task per (b, h, Qi)     one thread block per (b, h, Qi): the grid
the task's scratch ``S``, ``KT``, ...  shared memory: ``Qi``, ``Kj``, ``Vj`` tiles
SIMD lanes over a row of ``Sij``       threads: one per query row of the block
``m``, ``l``, ``acc`` arrays           registers of the row's thread
causal block skipping                  the same loop bound ``kv_end``
=====================================  =============================================

Each block loads its ``Qi`` tile once; then for every key block (up to the causal
limit) all its threads load ``Kj`` and ``Vj`` together into shared memory
(``syncthreads`` before use and before the next overwrite), and each thread folds its
row's ``Bc`` scores into its running ``(m, l, acc)``: FlashAttention-2's order, with the
``1 / l`` applied once at the end and ``lse = m + log l`` written for the backward.

Tile sizes are compile-time constants (shared arrays need them): ``BR`` query rows
(= threads per block), ``BC`` keys per tile, head dimension up to ``D_MAX``. Shared
memory per block: ``(BR + 2 BC) * D_MAX * 4`` bytes = 32 KiB with the defaults (BR = 32:
one warp per block), under the 48 KiB a block may use statically on every current
NVIDIA GPU. One thread per query row keeps the code close to the CPU rungs; production
kernels give each row several threads, use tensor cores and larger tiles (lesson 12
measures what that costs when a GPU is present).

This module imports ``numba.cuda`` at import: it is imported only when the kernel is
asked for (``fa_lab.attention(..., kernel="cuda_fa2")``), so fa_lab needs no CUDA.
On a machine without a GPU, ``NUMBA_ENABLE_CUDASIM=1`` runs it in numba's CUDA
simulator (every thread a Python thread: correct, and about a million times slower).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from fa_lab.numerics.masks import causal_offset

BR = 32  # query rows per block = threads per block (one warp)
BC = 16  # keys per shared-memory tile
D_MAX = 128  # largest head dimension the kernel is compiled for
NEG_INF = -math.inf


@cuda.jit
def fa2_forward(q, k, v, bias, has_bias, scale, causal, offset, out, lse):
    """Grid ``(Tr, B * H)``, block ``BR`` threads; see the module docstring."""
    Qs = cuda.shared.array((BR, D_MAX), float32)  # Qi
    Ks = cuda.shared.array((BC, D_MAX), float32)  # Kj
    Vs = cuda.shared.array((BC, D_MAX), float32)  # Vj
    acc = cuda.local.array(D_MAX, float32)  # this row's un-normalized output
    s = cuda.local.array(BC, float32)  # this row's scores of the current key tile

    r = cuda.threadIdx.x  # row within the block
    bh = cuda.blockIdx.y
    B, H, Nq, d = q.shape
    H_kv, Nk = k.shape[1], k.shape[2]
    b, h = bh // H, bh % H
    hk = h // (H // H_kv)  # grouped-query attention: the kv head of query head h
    i0 = cuda.blockIdx.x * BR
    i = i0 + r
    active = i < Nq

    # Qi -> shared memory (each thread its own row), row state in registers
    for t in range(d):
        Qs[r, t] = q[b, h, i, t] if active else 0.0
        acc[t] = 0.0
    m = NEG_INF
    l = float32(0.0)
    # causal block skipping: the block's last row sees keys j <= i0 + BR - 1 + offset
    kv_end = Nk
    if causal:
        kv_end = min(Nk, max(0, i0 + BR + offset))
    for j0 in range(0, kv_end, BC):
        # all threads load Kj, Vj together (BR threads for BC rows: stride BR)
        cuda.syncthreads()  # the previous tile is no longer read
        for c in range(r, BC, BR):
            for t in range(d):
                inside = j0 + c < Nk
                Ks[c, t] = k[b, hk, j0 + c, t] if inside else 0.0
                Vs[c, t] = v[b, hk, j0 + c, t] if inside else 0.0
        cuda.syncthreads()  # the tile is complete
        if active:
            # Sij row: scores, mask, and the tile's max
            m_tile = NEG_INF
            for c in range(BC):
                j = j0 + c
                x = NEG_INF
                if j < Nk and not (causal and j > i + offset):
                    dot = float32(0.0)
                    for t in range(d):
                        dot += Qs[r, t] * Ks[c, t]
                    x = dot * scale
                    if has_bias:
                        x += bias[b, h, i, j]
                s[c] = x
                if x > m_tile:
                    m_tile = x
            # online softmax: rescale the old state, fold in Pij Vj
            m_new = max(m, m_tile)
            if m_new != NEG_INF:
                alpha = math.exp(m - m_new) if m != NEG_INF else float32(0.0)
                l *= alpha
                for t in range(d):
                    acc[t] *= alpha
                for c in range(BC):
                    if s[c] != NEG_INF:
                        p = math.exp(s[c] - m_new)
                        l += p
                        for t in range(d):
                            acc[t] += p * Vs[c, t]
                m = m_new
    if active:
        if l > 0:
            for t in range(d):
                out[b, h, i, t] = acc[t] / l
            lse[b, h, i] = m + math.log(l)
        else:  # a row that sees no key
            for t in range(d):
                out[b, h, i, t] = 0.0
            lse[b, h, i] = NEG_INF


def run(q, k, v, bias, scale, alignment, block_q=None, block_kv=None):
    """Registry adapter: canonical NumPy arguments in, ``(out, lse)`` NumPy arrays out."""
    B, H, Nq, d = q.shape
    if d > D_MAX:
        raise NotImplementedError(f"kernel 'cuda_fa2' is compiled for d <= {D_MAX}, got d={d}")
    out = np.zeros((B, H, Nq, d), np.float32)
    lse = np.zeros((B, H, Nq), np.float32)
    has_bias = bias is not None
    bias_arr = np.ascontiguousarray(bias, np.float32) if has_bias else np.zeros((1, 1, 1, 1),
                                                                               np.float32)
    offset = causal_offset(Nq, k.shape[2], alignment) if alignment else 0
    grid = (-(-Nq // BR), B * H)
    fa2_forward[grid, BR](q, k, v, bias_arr, has_bias, np.float32(scale), alignment is not None,
                          offset, out, lse)
    return out, lse


def device_call(q, k, v):
    """A callable that runs the kernel on device-resident copies of float32 ``(B, H, N,
    d)`` ``q, k, v`` (no transfers, unmasked, default scale) and waits for it: what a
    GPU benchmark times."""
    B, H, N, d = q.shape
    dq, dk, dv = (cuda.to_device(np.ascontiguousarray(x, np.float32)) for x in (q, k, v))
    out, lse = cuda.device_array_like(dq), cuda.device_array((B, H, N), np.float32)
    dummy = cuda.to_device(np.zeros((1, 1, 1, 1), np.float32))
    grid = (-(-N // BR), B * H)

    def launch():
        fa2_forward[grid, BR](dq, dk, dv, dummy, False, np.float32(1 / np.sqrt(d)), False, 0,
                              out, lse)
        cuda.synchronize()
    return launch
