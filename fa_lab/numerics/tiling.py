"""Which tiles a tiled kernel visits: the Python mirror of the kernels' block loop.

For query block ``[i0, i0 + br)`` and key block ``[j0, j0 + bc)`` with causal offset
``off`` (query ``i`` sees keys ``j <= i + off``), the tiled kernels

* skip the tile when ``j0 > i0 + br - 1 + off`` (every key is in every row's future),
* mask it element by element when ``j0 + bc - 1 > i0 + off`` (the diagonal crosses it),
* otherwise compute it without any mask ("full").

Lessons 02 and 03 draw this; the causal saving is the fraction of skipped tiles. A
sliding window (``window=``) skips the tiles outside its band the same way
(:func:`fa_lab.kernels.common.window_keys` is the kernels' own bound).
"""

from __future__ import annotations

import numpy as np

from fa_lab.numerics.masks import causal_alignment, feature_offset

SKIPPED, DIAGONAL, FULL = 0, 1, 2


def _row_band(i, off, causal, left, right):
    """Keys ``[lo, hi]`` row ``i`` may see (before clipping to ``0 .. Nk - 1``)."""
    hi = i + off if causal else np.inf
    if right >= 0:
        hi = min(hi, i + off + right)
    lo = i + off - left if left >= 0 else -np.inf
    return lo, hi


def tile_classes(Nq: int, Nk: int, block_q: int, block_kv: int, causal=False,
                 window=None) -> np.ndarray:
    """``(Tr, Tc)`` array of SKIPPED / DIAGONAL / FULL, in the kernels' visit order.

    ``window=(left, right)`` (flash-attn's sliding window, :mod:`fa_lab.numerics.scoremod`): a tile
    outside every row's band is skipped, one the band's edge crosses is masked."""
    alignment = causal_alignment(causal)
    left, right = window if window is not None else (-1, -1)
    Tr, Tc = -(-Nq // block_q), -(-Nk // block_kv)
    classes = np.full((Tr, Tc), FULL, dtype=int)
    if alignment is None and left < 0 and right < 0:
        return classes
    off = feature_offset(Nq, Nk, alignment)
    for a in range(Tr):
        i0, i1 = a * block_q, min((a + 1) * block_q, Nq)
        lo_first, hi_first = _row_band(i0, off, alignment is not None, left, right)
        lo_last, hi_last = _row_band(i1 - 1, off, alignment is not None, left, right)
        for c in range(Tc):
            j0, j1 = c * block_kv, min((c + 1) * block_kv, Nk)
            if j0 > hi_last or j1 - 1 < lo_first:
                classes[a, c] = SKIPPED
            elif j1 - 1 > hi_first or j0 < lo_last:
                classes[a, c] = DIAGONAL
    return classes


def work_fraction(Nq, Nk, block_q, block_kv, causal, window=None) -> dict:
    """Tiles computed vs all tiles, and the ideal fraction of visible (i, j) pairs."""
    classes = tile_classes(Nq, Nk, block_q, block_kv, causal, window)
    alignment = causal_alignment(causal)
    left, right = window if window is not None else (-1, -1)
    if Nq * Nk == 0:
        visible = 0.0
    else:
        off = feature_offset(Nq, Nk, alignment)
        i = np.arange(Nq)
        hi = np.full(Nq, Nk - 1) if alignment is None else i + off
        if right >= 0:
            hi = np.minimum(hi, i + off + right)
        lo = i + off - left if left >= 0 else np.zeros(Nq)
        seen = np.clip(np.minimum(hi, Nk - 1) - np.maximum(lo, 0) + 1, 0, None)
        visible = seen.sum() / (Nq * Nk)
    n = classes.size
    return {"tiles": n, "skipped": int((classes == SKIPPED).sum()),
            "diagonal": int((classes == DIAGONAL).sum()), "full": int((classes == FULL).sum()),
            "computed_fraction": float((classes != SKIPPED).sum() / n) if n else 0.0,
            "visible_fraction": float(visible)}
