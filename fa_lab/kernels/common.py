"""Small jitted helpers shared by the rungs: visible key range, masking, the epilogue.

They hold no teaching point of their own, so every rung calls the same copy.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np
from numba import njit

from fa_lab.settings.config import CACHE

NEG_INF = -np.inf

#: log2(e): ``exp(x) = 2^(x log2 e)`` in every vector exp.
LOG2E = np.float32(1.4426950408889634)

#: 2^f on [0, 1) with weights 2^-f (relative error) on 2000 Chebyshev nodes,
#: ``np.polynomial.polynomial.polyfit(t, 2**t, 6, w=2**-t)``, lowest degree first. Max
#: relative error 1.9e-9 in float64, 8.4e-8 evaluated in float32 (Horner). Taylor
#: coefficients of the same degree are 70x worse (5.6e-6): they made ``flash`` fail the
#: 2x error rule.
EXP2_COEFFS = (1.0000000018154935, 0.6931469870574726, 0.24022979581425047,
               0.0554835247239623, 0.009678472554453584, 0.0012443081508389578,
               0.00021690609170271546)
#: Degree-4 fit of the same kind, used when P is rounded to bf16 anyway: max relative
#: error 2.7e-6 in float32, far below bf16's rounding (up to 2^-8 relative), two FMAs per
#: score fewer. (Degree 3, 7.7e-5, would also do for P, but the row sum l uses the same
#: values and the LSE then moved by up to 8e-5.)
EXP2_COEFFS_BF16 = (1.0000025181301353, 0.6930066206638741, 0.24142749325119936,
                    0.05203742877442215, 0.013520603197212263)
# The same coefficients as float32 constants for compiled code (numba freezes global
# scalars at compile time).
E0, E1, E2, E3, E4, E5, E6 = (np.float32(c) for c in EXP2_COEFFS)
B0, B1, B2, B3, B4 = (np.float32(c) for c in EXP2_COEFFS_BF16)


class Stage(IntEnum):
    """Where a staged kernel (``flash``, ``sage``) stops every block, to time its parts
    (the output is then not attention): after the packing only (``PACK``, kernels that
    pack their operands), the loops (``LOOPS``), the scores and masks (``SCORES``), the
    softmax (``SOFTMAX``), or never (``FULL``, the whole kernel). The jitted code
    compares plain ints in this order. Past ``FULL``, ablations (the AMX kernel only):
    the whole kernel without the softmax's exp pass (``NO_EXP``: P is not written), its
    max pass (``NO_MAX``: a row's first score stands in for its block's max), or both
    (``NO_SOFTMAX``): what each pass costs where the CPU may overlap it with the tile
    products. They act on the fused softmax only (no mask, one key scale per block, a
    positive scale); other kernels refuse them."""

    PACK = -1
    LOOPS = 0
    SCORES = 1
    SOFTMAX = 2
    FULL = 3
    NO_EXP = 4
    NO_MAX = 5
    NO_SOFTMAX = 6


#: What the loop kernels store in place of the probability of a *hidden* key (score
#: ``-inf``: causal, a False in a bool mask, ``-inf`` in a float mask), so their ``P V``
#: loop skips it (selection) instead of computing ``0 * v``: ``0 * NaN`` is NaN, and a
#: NaN in a hidden value must not reach the row. A probability is never negative.
HIDDEN = -1.0

#: Bytes numba's runtime adds to each array a jitted function allocates (its meminfo
#: and array header), measured with memray: 6 scratch arrays of ``tiled_simd`` took
#: 672 bytes beyond their data. Used by the byte models below.
NRT_ARRAY_OVERHEAD = 112


@njit(cache=CACHE, inline="always")
def exp2_poly(f):
    """``2^f`` for float32 ``f`` in [0, 1): :data:`EXP2_COEFFS` by Horner (scalar code
    that LLVM vectorizes inside a loop)."""
    p = E6
    p = p * f + E5
    p = p * f + E4
    p = p * f + E3
    p = p * f + E2
    p = p * f + E1
    return p * f + E0


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


# --- flash-attn's score modifiers (fa_lab.numerics.scoremod): window, softcap, ALiBi -------------


@njit(cache=CACHE)
def window_keys(i0, br, Nk, causal, offset, left, right, block_kv):
    """Key range ``[j_lo, j_hi)`` that query rows ``i0 .. i0 + br - 1`` may see under
    causal and a window ``(left, right)`` (``-1``: unbounded); ``j_lo`` is rounded down
    to a multiple of ``block_kv`` so the tiles stay those of the unwindowed grid. Key
    blocks outside this range are skipped, never computed."""
    last = i0 + br - 1
    j_hi = visible_end(last, Nk, causal, offset)
    if right >= 0:
        j_hi = min(j_hi, max(last + offset + right + 1, 0))
    j_lo = 0
    if left >= 0:
        j_lo = min(max(i0 + offset - left, 0), Nk)
        j_lo = (j_lo // block_kv) * block_kv
    return j_lo, j_hi


@njit(cache=CACHE)
def window_cuts(i0, br, j0, bc, offset, left, right):
    """True when some key of block ``(i0.., j0..)`` is outside some row's window."""
    if left >= 0 and j0 < i0 + br - 1 + offset - left:
        return True
    return right >= 0 and j0 + bc - 1 > i0 + offset + right


@njit(cache=CACHE)
def window_block(Sij, i0, j0, offset, left, right):
    """Set ``-inf`` (selection) where key ``j0 + c`` is outside row ``i0 + r``'s window."""
    br, bc = Sij.shape
    for r in range(br):
        Sr = Sij[r]
        pos = i0 + r + offset - j0  # the row's position, in block columns
        if left >= 0:
            for c in range(0, min(max(pos - left, 0), bc)):
                Sr[c] = NEG_INF
        if right >= 0:
            for c in range(max(pos + right + 1, 0), bc):
                Sr[c] = NEG_INF


@njit(cache=CACHE)
def softcap_alibi_block(Sij, softcap, slopes, has_alibi, b, h, i0, j0, offset, G):
    """In place on a block of scaled scores ``x``: ``s = c tanh(x / c)`` when ``softcap >
    0`` (storing ``1 - tanh^2`` in ``G``, same shape, when ``G.size`` > 0: the backward's
    chain rule), then ALiBi ``s -= slope * |i0 + r + offset - (j0 + c)|``."""
    br, bc = Sij.shape
    keep = G.size > 0
    slope = slopes[b, h] if has_alibi else Sij.dtype.type(0)
    for r in range(br):
        Sr = Sij[r]
        if softcap > 0:
            inv = 1 / softcap
            for c in range(bc):
                t = math.tanh(Sr[c] * inv)
                Sr[c] = softcap * t
                if keep:
                    G[r, c] = 1 - t * t
        if has_alibi:
            pos = i0 + r + offset - j0
            for c in range(bc):
                Sr[c] -= slope * abs(pos - c)
