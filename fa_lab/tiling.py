"""Which tiles a tiled kernel visits: the Python mirror of the kernels' block loop.

For query block ``[i0, i0 + br)`` and key block ``[j0, j0 + bc)`` with causal offset
``off`` (query ``i`` sees keys ``j <= i + off``), the tiled kernels

* skip the tile when ``j0 > i0 + br - 1 + off`` (every key is in every row's future),
* mask it element by element when ``j0 + bc - 1 > i0 + off`` (the diagonal crosses it),
* otherwise compute it without any mask ("full").

Lessons 02 and 03 draw this; the causal saving is the fraction of skipped tiles.
"""

from __future__ import annotations

import numpy as np

from fa_lab.reference import causal_alignment, causal_offset

SKIPPED, DIAGONAL, FULL = 0, 1, 2


def tile_classes(Nq: int, Nk: int, block_q: int, block_kv: int, causal=False) -> np.ndarray:
    """``(Tr, Tc)`` array of SKIPPED / DIAGONAL / FULL, in the kernels' visit order."""
    alignment = causal_alignment(causal)
    Tr, Tc = -(-Nq // block_q), -(-Nk // block_kv)
    classes = np.full((Tr, Tc), FULL, dtype=int)
    if alignment is None:
        return classes
    off = causal_offset(Nq, Nk, alignment)
    for a in range(Tr):
        i0, i1 = a * block_q, min((a + 1) * block_q, Nq)
        for c in range(Tc):
            j0, j1 = c * block_kv, min((c + 1) * block_kv, Nk)
            if j0 > i1 - 1 + off:
                classes[a, c] = SKIPPED
            elif j1 - 1 > i0 + off:
                classes[a, c] = DIAGONAL
    return classes


def work_fraction(Nq, Nk, block_q, block_kv, causal) -> dict:
    """Tiles computed vs all tiles, and the ideal fraction of visible (i, j) pairs."""
    classes = tile_classes(Nq, Nk, block_q, block_kv, causal)
    alignment = causal_alignment(causal)
    if alignment is None:
        visible = 1.0
    else:
        off = causal_offset(Nq, Nk, alignment)
        ends = np.clip(np.arange(Nq) + off + 1, 0, Nk)
        visible = ends.sum() / (Nq * Nk) if Nq * Nk else 0.0
    n = classes.size
    return {"tiles": n, "skipped": int((classes == SKIPPED).sum()),
            "diagonal": int((classes == DIAGONAL).sum()), "full": int((classes == FULL).sum()),
            "computed_fraction": float((classes != SKIPPED).sum() / n) if n else 0.0,
            "visible_fraction": float(visible)}
