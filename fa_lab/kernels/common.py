"""Small jitted helpers shared by the rungs: visible key range, masking, the epilogue.

They hold no teaching point of their own, so every rung calls the same copy.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fa_lab.config import CACHE

NEG_INF = -np.inf

#: What the loop kernels store in place of the probability of a *hidden* key (score
#: ``-inf``: causal, a False in a bool mask, ``-inf`` in a float mask), so their ``P V``
#: loop skips it (selection) instead of computing ``0 * v``: ``0 * NaN`` is NaN, and a
#: NaN in a hidden value must not reach the row. A probability is never negative.
HIDDEN = -1.0

#: Bytes numba's runtime adds to each array a jitted function allocates (its meminfo
#: and array header), measured with memray: 6 scratch arrays of ``tiled_simd`` took
#: 672 bytes beyond their data. Used by the byte models below.
NRT_ARRAY_OVERHEAD = 112


@njit(cache=CACHE)
def task_coords(task, heads, blocks, block):
    """Parallel drivers number their tasks ``(b, head, block)`` row-major: decode one.

    Returns ``(b, head, start)`` with ``start = block index * block``.
    """
    return task // (heads * blocks), (task // blocks) % heads, (task % blocks) * block


@njit(cache=CACHE)
def visible_end(i: int, Nk: int, causal: bool, offset: int) -> int:
    """One past the last key that query row ``i`` may see (0 when it sees none)."""
    if not causal:
        return Nk
    return min(max(i + offset + 1, 0), Nk)


@njit(cache=CACHE)
def mask_block(Sij, bias, has_bias, b, h, i0, j0, causal, offset):
    """Add the bias and apply the causal mask to a score block ``Sij`` (br, bc) in place.

    ``Sij[r, c]`` is the score of query ``i0 + r`` against key ``j0 + c``. A key the
    mask hides (bias ``-inf``) gets the score ``-inf`` by selection, not by adding
    ``-inf``: a NaN score (a NaN key) stays hidden.
    """
    br, bc = Sij.shape
    for r in range(br):
        Sr = Sij[r]
        if has_bias:
            bias_r = bias[b, h, i0 + r]
            for c in range(bc):
                bc_ = bias_r[j0 + c]
                Sr[c] = NEG_INF if bc_ == NEG_INF else Sr[c] + bc_
        if causal:
            first_hidden = i0 + r + offset + 1 - j0  # columns c >= this are in the future
            for c in range(max(first_hidden, 0), bc):
                Sr[c] = NEG_INF


@njit(cache=CACHE)
def finalize_row(acc_r, m_r, l_r, out_r):
    """``O = acc / l`` and ``lse = m + log(l)``; a row that saw no key gives ``O = 0, lse = -inf``.

    ``l == 0`` exactly when every score was ``-inf``; a NaN ``l`` falls through and
    makes the row NaN, as in the reference.
    """
    if l_r == 0:
        for t in range(out_r.shape[0]):
            out_r[t] = 0
        return NEG_INF
    for t in range(out_r.shape[0]):
        out_r[t] = acc_r[t] / l_r
    return m_r + math.log(l_r)


_NO_BIAS = {}


def no_bias(dtype) -> np.ndarray:
    """A read-only (1, 1, 1, 1) placeholder passed as ``bias`` when there is no mask
    (``has_bias=False``: never read), one per dtype so numba compiles one signature."""
    dtype = np.dtype(dtype)
    if dtype not in _NO_BIAS:
        _NO_BIAS[dtype] = np.broadcast_to(np.zeros((), dtype), (1, 1, 1, 1))
    return _NO_BIAS[dtype]
