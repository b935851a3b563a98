"""Packed variable-length batches: :func:`attention_varlen` (flash-attn's
``flash_attn_varlen_func``) and the checks of its ``cu_seqlens``.

A batch of sequences of different lengths is stored without padding: the tokens of all
sequences one after the other, ``q`` ``(total_q, H, d)``, ``k``/``v`` ``(total_k, H_kv,
d)``, and prefix sums ``cu_seqlens_q``/``cu_seqlens_k`` ``(B + 1,)`` from 0 to the
totals. Sequence ``b``'s queries ``q[cu_q[b]:cu_q[b+1]]`` attend to its keys
``k[cu_k[b]:cu_k[b+1]]`` only. The kernels live in :data:`fa_lab.registry.VARLEN_KERNELS`.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.api import choose_kernel, effective_blocks
from fa_lab.numerics.checks import as_float_array, check_bool, check_scale, int_array
from fa_lab.numerics.masks import causal_alignment
from fa_lab.numerics.merge import apply_sinks, check_sinks
from fa_lab.registry import VARLEN_KERNELS, Request
from fa_lab.numerics.scoremod import check_mods


def check_cu_seqlens(name, cu, total) -> np.ndarray:
    """``cu`` as an int64 array: 1-D integers, ``cu[0] == 0``, non-decreasing, ``cu[-1] ==
    total``; otherwise a ValueError (TypeError for a non-integer array) naming ``name``."""
    cu = int_array(name, cu, "(B + 1,)")
    if cu.ndim != 1 or cu.size < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 1 entries, got shape {cu.shape}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    if np.any(np.diff(cu) < 0):
        i = int(np.argmax(np.diff(cu) < 0))
        raise ValueError(f"{name} must be non-decreasing: {name}[{i + 1}] = {cu[i + 1]} < "
                         f"{name}[{i}] = {cu[i]}")
    if cu[-1] != total:
        raise ValueError(f"{name} must end at the number of tokens {total}, got {cu[-1]}")
    return cu


def _check_max(name, value, actual) -> None:
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < actual:
        raise ValueError(f"{name}={value} is smaller than the longest sequence ({actual})")


def _check_packed(q, k, v):
    q, k, v = (as_float_array(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim != 3:
        raise ValueError(f"q must have the packed shape (total_q, H, d), got {q.shape}")
    if k.ndim != 3 or v.ndim != 3 or v.shape[:2] != k.shape[:2] or v.shape[2] == 0:
        raise ValueError(f"k and v must have the packed shapes (total_k, H_kv, d) and "
                         f"(total_k, H_kv, d_v), got {k.shape} and {v.shape}")
    H, d, H_kv = q.shape[1], q.shape[2], k.shape[1]
    if k.shape[2] != d or d == 0:
        raise ValueError(f"k must have the head dimension d={d} >= 1 of q, got {k.shape}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the heads of q (H={H}) must be a multiple of the heads of k and "
                         f"v (H_kv={H_kv})")
    return q, k, v


def attention_varlen(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, causal: bool | str = False,
                     scale: float | None = None, window: tuple[int, int] | None = None,
                     softcap: float = 0.0, alibi_slopes: ArrayLike | None = None,
                     kernel: str = "auto", return_lse: bool = False,
                     block_q: int | None = None,
                     block_kv: int | None = None,
                     sinks: ArrayLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention over a packed batch of variable-length sequences, no padding computed.

    Parameters
    ----------
    q : (total_q, H, d) float32 or float64
    k, v : (total_k, H_kv, d), q's dtype; ``H % H_kv == 0`` (GQA)
    cu_seqlens_q, cu_seqlens_k : integer arrays (B + 1,): 0, then the running totals of
        the sequences' lengths (int32 in flash-attn; any integer dtype here). Zero-length
        sequences are allowed (a query of a sequence without keys gets zeros, lse -inf).
    max_seqlen_q, max_seqlen_k : int, optional: flash-attn's grid bounds; checked to be
        at least the longest sequence.
    causal, scale, window, softcap, alibi_slopes : as in :func:`fa_lab.attention`, per
        sequence (``alibi_slopes`` ``(H,)`` or ``(B, H)``; offsets from each sequence's
        own lengths).
    sinks : (H,) or (B, H), optional: attention sinks (:func:`fa_lab.attention`), per
        sequence with ``(B, H)``
    kernel : "auto" or a name in :data:`fa_lab.registry.VARLEN_KERNELS`
    block_q, block_kv : tile sizes (default: flash's, clamped to the longest sequences)

    Returns
    -------
    out : (total_q, H, d_v); lse : (H, total_q) with ``return_lse`` (flash-attn's layout)
    """
    q, k, v = _check_packed(q, k, v)
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_q.size - 1} and {cu_k.size - 1}")
    B, H, d = cu_q.size - 1, q.shape[1], q.shape[2]
    long_q = int(np.max(np.diff(cu_q), initial=0))
    long_k = int(np.max(np.diff(cu_k), initial=0))
    _check_max("max_seqlen_q", max_seqlen_q, long_q)
    _check_max("max_seqlen_k", max_seqlen_k, long_k)
    alignment = causal_alignment(causal)
    scale = check_scale(scale, d)
    return_lse = check_bool("return_lse", return_lse)
    mods = check_mods(window, softcap, alibi_slopes, (B,), H, q.dtype)
    sinks = check_sinks(sinks, (B,), H, q.dtype)
    req = Request(dtype=q.dtype, causal=alignment is not None, gqa=H != k.shape[1],
                  blocks=block_q is not None or block_kv is not None, window=mods.window,
                  softcap=mods.softcap > 0, alibi=mods.slopes is not None,
                  dv=v.shape[2] != d)
    chosen, _ = choose_kernel(kernel, req, VARLEN_KERNELS)
    bq, bk = effective_blocks(long_q, long_k, block_q, block_kv, chosen.default_blocks)
    if q.shape[0] == 0:
        out, lse = np.zeros(q.shape[:2] + v.shape[2:], q.dtype), np.zeros((H, 0), q.dtype)
    else:
        q_t, k_t, v_t = (np.ascontiguousarray(x.transpose(1, 0, 2)) for x in (q, k, v))
        out_t, lse = chosen.run(q_t, k_t, v_t, cu_q, cu_k, scale, alignment, bq, bk, mods)
        if sinks is not None:  # each token's sequence's sinks: (H, total_q)
            per_token = sinks[np.repeat(np.arange(B), np.diff(cu_q))].T
            out_t, lse = apply_sinks(out_t, lse, per_token)
        out = np.ascontiguousarray(out_t.transpose(1, 0, 2))
    return (out, lse) if return_lse else out


def pack(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-sequence arrays ``(N_b, H, d)`` into ``(total, H, d)`` and return
    it with its ``cu_seqlens`` (int32), the inverse of :func:`unpack`."""
    lens = [len(s) for s in seqs]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return np.concatenate(seqs, axis=0), cu


def unpack(packed, cu) -> list[np.ndarray]:
    """Split a packed ``(total, ...)`` array back into its sequences."""
    return [packed[cu[b]:cu[b + 1]] for b in range(len(cu) - 1)]
