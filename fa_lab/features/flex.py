"""``fa_lab.flex_attention``: attention programmed with Python functions, as PyTorch's
FlexAttention (argument names and semantics), compiled by numba into ``flash``'s tiles.

::

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * abs(q_idx - kv_idx)       # slopes: a NumPy array

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = fa_lab.create_block_mask(causal, None, None, N, N)
    out = fa_lab.flex_attention(q, k, v, score_mod=alibi, block_mask=mask)

See :mod:`fa_lab.numerics.flex` for what the functions may contain and how block masks
classify tiles, and :mod:`fa_lab.kernels.flex` for the kernel.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.numerics.checks import as_float_array, check_bool, check_scale
from fa_lab.numerics.flex import FULL, BlockMask, compile_mod, index_errors
from fa_lab.registry import flex_run
from fa_lab.settings import config

_NO_MASKS = np.zeros((0, 1, 1), np.bool_)
#: Compiled score_mods by function object (compiling again is the expensive part).
_COMPILED: dict = {}


def _compiled(score_mod):
    key = id(score_mod)
    hit = _COMPILED.get(key)
    if hit is None or hit[0] is not score_mod:
        hit = (score_mod, compile_mod("score_mod", score_mod, 5))
        _COMPILED[key] = hit
    return hit[1]


def flex_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, score_mod=None,
                   block_mask: BlockMask | None = None, scale: float | None = None,
                   enable_gqa: bool = False, return_lse: bool = False):
    """Attention with a programmable score and mask.

    Parameters
    ----------
    q : (B, H, Nq, d), float32 or float64
    k, v : (B, H_kv, Nk, d) and (B, H_kv, Nk, d_v), q's dtype; ``H_kv != H`` needs
        ``enable_gqa=True`` (as PyTorch)
    score_mod : ``f(score, b, h, q_idx, kv_idx) -> score``, optional: applied to every
        scaled score before the mask and the softmax
    block_mask : :class:`fa_lab.numerics.flex.BlockMask` from
        :func:`fa_lab.create_block_mask` for ``(Nq, Nk)``, optional: its empty tiles are
        skipped, its partial tiles call ``mask_mod`` per element; its ``B``/``H`` must be
        1 (broadcast) or q's
    scale : float, optional: defaults to ``1 / sqrt(d)``
    return_lse : bool: also return the LSE (B, H, Nq) (natural log, after score_mod/mask)

    A row that sees no key returns zeros and ``lse = -inf`` (PyTorch's FlexAttention
    returns zeros too). Without a block mask the kernel uses ``flash``'s tiles.
    """
    q, k, v = as_float_array("q", q), as_float_array("k", k), as_float_array("v", v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k and v must be 4-D (B, H, N, d), got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Nq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or d == 0:
        raise ValueError(f"k must be (B={B}, H_kv, Nk, d={d}) with d >= 1, got {k.shape}")
    if v.shape[:3] != k.shape[:3] or v.shape[3] == 0:
        raise ValueError(f"v must have k's shape {k.shape} except its head dimension, got "
                         f"{v.shape}")
    enable_gqa = check_bool("enable_gqa", enable_gqa)
    if k.shape[1] != H and (not enable_gqa or k.shape[1] == 0 or H % k.shape[1]):
        raise ValueError(f"q has H={H} heads and k H_kv={k.shape[1]}: pass enable_gqa=True "
                         f"(H a multiple of H_kv) for grouped-query attention")
    scale = check_scale(scale, d)
    return_lse = check_bool("return_lse", return_lse)
    Nk = k.shape[2]
    score_fn = None if score_mod is None else _compiled(score_mod)
    if block_mask is None:
        bq, bk = (min(b, max(n, 1)) for b, n in zip(config.FLASH_BLOCKS, (Nq, Nk)))
        kinds = np.full((1, 1, -(-Nq // bq), -(-Nk // bk)), FULL, np.int8)
        mask_fn, index, stored = None, np.full(kinds.shape, -1, np.int32), _NO_MASKS
    else:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must come from fa_lab.create_block_mask, got "
                            f"{type(block_mask).__name__}")
        if (block_mask.Q_LEN, block_mask.KV_LEN) != (Nq, Nk):
            raise ValueError(f"block_mask was made for Q_LEN={block_mask.Q_LEN}, KV_LEN="
                             f"{block_mask.KV_LEN}, but q and k have Nq={Nq}, Nk={Nk}")
        Bm, Hm = block_mask.shape[:2]
        if Bm not in (1, B) or Hm not in (1, H):
            raise ValueError(f"block_mask was made for B={Bm}, H={Hm}; q has B={B}, H={H} "
                             f"(use None for a dimension the mask does not depend on)")
        (bq, bk), kinds, mask_fn = block_mask.BLOCK_SIZE, block_mask.kinds, block_mask.mask_mod
        index, stored = block_mask.partial_index, block_mask.partial_masks
        if index is None or stored is None:  # a mask built without its stored tiles
            index, stored = np.full(kinds.shape, -1, np.int32), _NO_MASKS
    if B * H * Nq == 0 or Nk == 0:
        out = np.zeros(q.shape[:3] + v.shape[3:], q.dtype)
        lse = np.full(q.shape[:3], -np.inf, q.dtype)
    else:
        with index_errors("score_mod or mask_mod"):
            out, lse = flex_run(np.ascontiguousarray(q), np.ascontiguousarray(k),
                                np.ascontiguousarray(v), scale, score_fn, mask_fn, kinds, index,
                                stored, bq, bk)
    return (out, lse) if return_lse else out


__all__ = ["flex_attention"]
