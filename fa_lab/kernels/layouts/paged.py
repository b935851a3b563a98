"""Attention against a (paged) KV cache with ragged lengths: flash-attn's
``flash_attn_with_kvcache`` on ``flash``'s tiles, reading keys through a block table.

The cache is a pool of pages ``(num_blocks, H_kv, page, d)``; sequence ``b``'s logical
key ``j`` lives in page ``block_table[b, j // page]`` at row ``j % page``. A contiguous
cache ``(B, H_kv, S_max, d)`` is the special case ``page = S_max`` with
``block_table[b] = [b]``, so one kernel serves both. Key tiles are cut at page
boundaries, so each tile is a contiguous ``(bc, d)`` slice of one page: BLAS reads it in
place, nothing is gathered. Sequence ``b`` has ``lengths[b]`` keys and the queries stand
at its end (bottom-right: query ``i`` of ``Nq`` at position ``lengths[b] - Nq + i``).

Long caches with few query rows (decoding) split the keys as ``flash`` does
(Flash-Decoding) and merge the partial results exactly (:func:`fa_lab.numerics.merge.merge_splits`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fa_lab.settings.config import CACHE, num_threads
from fa_lab.kernels.common import finalize_row, no_bias, task_coords, window_keys
from fa_lab.kernels.ladder import flash
from fa_lab.kernels.ladder.flash import kv_tile, row_state
from fa_lab.numerics import reference
from fa_lab.numerics.kvquant import dequantize_kv
from fa_lab.numerics.merge import merge_splits
from fa_lab.numerics.scoremod import NONE as NO_MODS


@njit(cache=CACHE)
def _paged_q_block(Qi, k_pages, v_pages, table_b, hk, b, h, i0, causal, offset, j_begin,
                   j_end, Lk, block_kv, bias, Oi, lse_i, left, right, softcap, slopes,
                   has_alibi):
    """``flash``'s query block for one (already scaled) ``Qi``: the keys ``j_begin ..
    j_end`` of a sequence of ``Lk`` keys, read page by page through ``table_b`` and fed
    to ``flash``'s tile step (:func:`~fa_lab.kernels.ladder.flash.kv_tile`)."""
    br = Qi.shape[0]
    page = k_pages.shape[2]
    state, scratch = row_state(br, v_pages.shape[3], Qi, block_kv)  # acc: d_v columns
    mods = (left, right, softcap, slopes, has_alibi)
    j_lo, j_hi = window_keys(i0, br, Lk, causal, offset, left, right, block_kv)
    j0, stop = max(j_begin, j_lo), min(j_end, j_hi)
    while j0 < stop:
        p, o = table_b[j0 // page], j0 % page
        bc = min(block_kv, stop - j0, page - o)  # a tile never crosses a page
        kv_tile(Qi, k_pages[p, hk, o:o + bc], v_pages[p, hk, o:o + bc], j0, bias, False, b, h,
                i0, causal, offset, mods, state, scratch, 3)
        j0 += bc
    m, l, _, acc = state
    for r in range(br):
        lse_i[r] = finalize_row(acc[r], m[r], l[r], Oi[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def paged_forward(q, k_pages, v_pages, block_table, lengths, bias, scale, causal, block_q,
                  block_kv, splits, out, lse, left, right, softcap, slopes, has_alibi):
    """prange over (b, h, query block, key split); then the exact merge of the splits.

    q (B, H, Nq, d); pages (num_blocks, H_kv, page, d); block_table (B, max_blocks);
    lengths (B,): keys per sequence; ``bias``: a placeholder (no mask here).
    """
    B, H, Nq, _ = q.shape
    group = H // k_pages.shape[1]
    Tr = (Nq + block_q - 1) // block_q
    part_o = np.empty((splits, B, H, Nq, v_pages.shape[3]), dtype=q.dtype)
    part_lse = np.empty((splits, B, H, Nq), dtype=q.dtype)
    for task in prange(B * H * Tr * splits):
        s = task % splits
        b, h, i0 = task_coords(task // splits, H, Tr, block_q)
        i1 = min(i0 + block_q, Nq)
        Lk = lengths[b]
        per = ((Lk + block_kv - 1) // block_kv + splits - 1) // splits * block_kv
        _paged_q_block(q[b, h, i0:i1] * scale, k_pages, v_pages, block_table[b], h // group,
                       b, h, i0, causal, Lk - Nq, min(s * per, Lk), min((s + 1) * per, Lk),
                       Lk, block_kv, bias, part_o[s, b, h, i0:i1], part_lse[s, b, h, i0:i1],
                       left, right, softcap, slopes, has_alibi)
    merge_splits(part_o, part_lse, out, lse)


def reference_run(q, k_pages, v_pages, block_table, lengths, scale, causal, block_q,
                  block_kv, mods=None, splits=None, k_scale=None, v_scale=None):
    """The float64 reference (``KVCACHE_KERNELS["reference"]``); an int8 / int4 cache is
    dequantized first (:func:`fa_lab.numerics.kvquant.dequantize_kv`)."""
    if k_scale is not None:
        k_pages, v_pages = dequantize_kv(k_pages, k_scale), dequantize_kv(v_pages, v_scale)
    return reference.attention_paged(q, k_pages, v_pages, block_table, lengths, scale=scale,
                                     causal=causal, **(mods or NO_MODS).reference_kwargs())


def run(q, k_pages, v_pages, block_table, lengths, scale, causal, block_q, block_kv,
        mods=None, splits=None):
    """:func:`paged_forward` (``KVCACHE_KERNELS["flash"]``): ``(out, lse)``."""
    flash.ensure_blas_threads()
    B, H, Nq, _ = q.shape
    out, lse = np.empty((B, H, Nq, v_pages.shape[3]), q.dtype), np.empty((B, H, Nq), q.dtype)
    if splits is None:
        splits = flash.plan_splits(B, H, Nq, int(np.max(lengths, initial=0)), block_q,
                                   block_kv, num_threads())
    paged_forward(q, k_pages, v_pages, block_table.astype(np.int64), lengths.astype(np.int64),
                  no_bias(q.dtype), q.dtype.type(scale), bool(causal), block_q, block_kv,
                  int(splits), out, lse, *(mods or NO_MODS).kernel_args(q.dtype))
    return out, lse
