"""Bytes moved, modelled: what each kernel reads and writes across one level of the
memory hierarchy, hence its arithmetic intensity (FLOPs per byte) at that level.

FlashAttention's paper counts accesses to *slow* memory given a *fast* memory of ``M``
bytes: ``Theta(N^2 d^2 / M)`` for FlashAttention against ``Theta(N d + N^2)`` for
standard attention. This module applies the same counting to every kernel of
:data:`fa_lab.KERNELS` with its real loop order and tile sizes, for any ``M``: the L1
size gives the traffic served by L2, the L2 size the traffic served by L3, the L3 size
the traffic served by DRAM.

The model (per query head; all heads alike, so multiplied by ``B * H``): a piece of
data stays in fast memory between two uses when it fits together with everything used
more recently (an ideal LRU cache; prefetching and associativity ignored). Loop orders:

* ``standard`` (``reference``, NumPy's textbook attention): ``S = Q K^T`` and ``P``
  are ``Nq x Nk`` arrays; when they do not fit, S is written, read, P written, read
  (4 passes). Q, K, V read once, O written once.
* ``rows`` (``online``) / ``rows3`` (``naive``): one query row at a time against all
  keys; K and V are re-read for every row unless a head's K and V fit; ``naive`` also
  makes 4 passes over its score row when that row does not fit.
* ``fa2`` (``tiled``, ``tiled_simd``, ``flash``, and torch's CPU flash kernel): query
  blocks outside; ``Qi``, ``acc``, ``m``, ``l`` and the score tile stay in fast memory
  when the tile working set fits (:func:`tile_bytes`), and K and V are read once per
  query block (``Tr`` times) unless a head's K and V fit.
* ``fa1`` (``fa1``): key blocks outside; K and V read once; Q, O, m and l of the whole
  head make a round trip per key block (``Tc`` times) unless they fit.

Causal block skipping is not modelled (non-causal calls). Measured speeds placed at
these intensities make the roofline of lesson ``09_memory_hierarchy``.
"""

from __future__ import annotations

import numpy as np

from fa_lab.api import effective_blocks
from fa_lab.numerics.reference import flops
from fa_lab.registry import KERNELS

#: Loop order of every kernel and baseline (see the module docstring).
ORDER = {"reference": "standard", "numpy_standard": "standard", "naive": "rows3",
         "online": "rows", "tiled": "fa2", "tiled_simd": "fa2", "flash": "fa2",
         "fa1": "fa1", "torch_sdpa": "fa2"}

ITEMS = ("Q", "K", "V", "S/P", "O", "row state")


def torch_blocks(Nq: int) -> tuple[int, int]:
    """Tile sizes of PyTorch's CPU flash kernel: query blocks of 32/64/256 by ``Nq``,
    key blocks of 512 (read from its source, ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``)."""
    return (256 if Nq >= 768 else 64 if Nq >= 192 else 32), 512


def blocks_of(name: str, Nq: int, Nk: int, block_q=None, block_kv=None) -> tuple[int, int]:
    """The ``(Br, Bc)`` a kernel (or baseline) really uses for this call."""
    if name == "torch_sdpa":
        bq, bk = torch_blocks(Nq)
        return min(bq, Nq), min(bk, Nk)
    spec = KERNELS.get(name)
    if spec is None or not spec.tiled:
        return 1, Nk
    return effective_blocks(Nq, Nk, block_q, block_kv, spec.default_blocks)


def tile_bytes(Br: int, Bc: int, d: int, itemsize: int) -> int:
    """The working set of one block step: ``Qi``, ``Oi``/``acc`` (Br x d), ``Kj``, ``Vj``
    (Bc x d), ``Sij``/``Pij`` (Br x Bc) and the row state ``m``, ``l`` (2 x Br)."""
    return itemsize * (2 * Br * d + 2 * Bc * d + Br * Bc + 2 * Br)


def traffic(name, Nq, Nk, d, M, *, itemsize=4, block_q=None, block_kv=None, B=1, H=1,
            blocks=None) -> dict:
    """Bytes crossing into a fast memory of ``M`` bytes, per item (:data:`ITEMS`).

    ``name``: a kernel of :data:`fa_lab.KERNELS` or a baseline of :data:`ORDER`;
    ``blocks`` overrides its ``(Br, Bc)``. ``reference`` computes in float64.
    """
    order = ORDER[name]
    s = 8 if name == "reference" else itemsize
    Br, Bc = blocks or blocks_of(name, Nq, Nk, block_q, block_kv)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    q, kv, o, rows = Nq * d * s, Nk * d * s, Nq * d * s, Nq * s
    t = dict.fromkeys(ITEMS, 0)
    t["Q"], t["K"], t["V"], t["O"], t["row state"] = q, kv, kv, o, rows  # compulsory + lse
    if order == "standard":
        if Nq * Nk * s + q + 2 * kv > M:
            t["S/P"] = 4 * Nq * Nk * s
    elif order in ("rows", "rows3"):
        row = 2 * d * s + (Nk * s if order == "rows3" else 0)
        if 2 * kv + row > M:
            t["K"] = t["V"] = Nq * kv
        if order == "rows3" and row > M:
            t["S/P"] = 4 * Nq * Nk * s
    else:
        tile = tile_bytes(Br, Bc, d, s)
        spill = tile > M  # the block step's own data does not stay
        if spill:
            t["S/P"] = 3 * Nq * Nk * s  # Sij written, read for the softmax, Pij read
        if order == "fa2":
            if spill:
                t["Q"], t["O"] = Tc * q, 2 * Tc * o  # Qi, acc re-read per key block
            if 2 * kv + tile > M:
                t["K"] = t["V"] = Tr * kv
        else:  # fa1
            if spill:
                t["K"] = t["V"] = Tr * kv
            if 2 * q + 2 * rows + tile > M:  # Q, O, m, l of the head do not stay
                t["Q"], t["O"], t["row state"] = Tc * q, 2 * Tc * o, 4 * Tc * rows
    return {k: v * B * H for k, v in t.items()}


def intensity(name, Nq, Nk, d, M, **kw) -> float:
    """FLOPs per byte crossing into a fast memory of ``M`` bytes (:func:`traffic`)."""
    B, H = kw.get("B", 1), kw.get("H", 1)
    return flops(B, H, Nq, Nk, d) / sum(traffic(name, Nq, Nk, d, M, **kw).values())


def table(names, Nq, Nk, d, levels: dict, *, itemsize=4, B=1, H=1, block_q=None,
          block_kv=None):
    """One row per (kernel, level): blocks, bytes per item, total, intensity.

    ``levels``: ``{"L1": bytes, "L2": bytes, ...}`` -- the fast memory whose refills
    are counted (the traffic is served by the next level down).
    """
    import pandas as pd

    rows = []
    for name in names:
        Br, Bc = blocks_of(name, Nq, Nk, block_q, block_kv)
        for level, M in levels.items():
            t = traffic(name, Nq, Nk, d, M, itemsize=itemsize, B=B, H=H, blocks=(Br, Bc))
            total = sum(t.values())
            rows.append({"name": name, "order": ORDER[name], "Br": Br, "Bc": Bc,
                         "level": level, "M_bytes": M, **{f"{k} bytes": v for k, v in t.items()},
                         "total_bytes": total,
                         "intensity": flops(B, H, Nq, Nk, d) / total})
    return pd.DataFrame(rows)


def blocks_for_fast_memory(M: int, d: int, itemsize: int = 4, order: str = "fa2"):
    """FlashAttention's block choice for a fast memory of ``M`` bytes: the outer block
    ``B`` as large as the tile working set allows, the inner block ``min(B, d)`` (the
    paper's ``Br = min(ceil(M / 4d), d)``), as ``(Br, Bc)`` for the loop ``order``."""
    def pair(b):
        return (b, min(b, d)) if order == "fa2" else (min(b, d), b)

    b = 1
    while tile_bytes(*pair(b + 1), d, itemsize) <= M:
        b += 1
    return pair(b)


def io_traffic(order: str, N: int, d: int, M: int, itemsize: int = 4) -> int:
    """Slow-memory bytes of one head, ``Nq = Nk = N``, with the paper's blocks for ``M``:
    the quantity of FlashAttention's IO theorem (``fa1``/``fa2``) and of standard
    attention (``standard``)."""
    name = {"fa1": "fa1", "fa2": "tiled", "standard": "numpy_standard"}[order]
    blocks = blocks_for_fast_memory(M, d, itemsize, order) if order != "standard" else None
    return int(sum(traffic(name, N, N, d, M, itemsize=itemsize, blocks=blocks).values()))


def cache_tiles(levels: dict, d: int, itemsize: int = 4):
    """Budget arithmetic: the largest power-of-two ``Br x Bc`` (``Br >= Bc``) whose block
    step fits each cache level (:func:`tile_bytes`), for each level in ``levels``."""
    import pandas as pd

    rows = []
    for level, M in levels.items():
        best = (1, 1)
        for br in 2 ** np.arange(0, 13):
            for bc in 2 ** np.arange(0, int(np.log2(br)) + 1):
                if tile_bytes(int(br), int(bc), d, itemsize) <= M and br * bc > best[0] * best[1]:
                    best = (int(br), int(bc))
        rows.append({"level": level, "M_bytes": M, "Br": best[0], "Bc": best[1],
                     "tile_bytes": tile_bytes(*best, d, itemsize),
                     "share_of_level": tile_bytes(*best, d, itemsize) / M})
    return pd.DataFrame(rows)


__all__ = ["ORDER", "ITEMS", "traffic", "intensity", "table", "tile_bytes", "blocks_of",
           "torch_blocks", "blocks_for_fast_memory", "io_traffic", "cache_tiles"]
