"""Shared-prefix (cascade) attention: one prefix read once for every sequence, then merged.

Many sequences often start with the same tokens (a system prompt, a few-shot block, the
document several questions ask about). Attention over ``[prefix, suffix_b]`` splits into
two disjoint key sets, so it is the merge of two partial attentions
(:func:`fa_lab.merge_states`):

1. the **prefix** part, computed once for all sequences: the ``B`` sequences' query rows
   are stacked into one batch of ``B * Nq`` rows against the one prefix K/V (it is read
   once instead of ``B`` times, and a decode step's ``Nq = 1`` becomes a matrix product);
2. each sequence's **suffix** part (causal from the bottom right when ``causal``);
3. the exact merge through the two LSEs.

Recomputing the prefix for every sequence reads ``B`` copies of it; this reads one.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.api import attention
from fa_lab.numerics.checks import as_float_array, check_bool
from fa_lab.numerics.merge import merge_states


def _check(q, k_prefix, v_prefix, k_suffix, v_suffix):
    q = as_float_array("q", q)
    kp, vp = as_float_array("k_prefix", k_prefix), as_float_array("v_prefix", v_prefix)
    ks, vs = as_float_array("k_suffix", k_suffix), as_float_array("v_suffix", v_suffix)
    if q.ndim != 4:
        raise ValueError(f"q must be (B, H, Nq, d), got shape {q.shape}")
    B, H, Nq, d = q.shape
    if kp.ndim != 3 or kp.shape[2] != d:
        raise ValueError(f"k_prefix must be (H_kv, P, d) with d={d} (one copy shared by all "
                         f"sequences), got shape {kp.shape}")
    if H % kp.shape[0]:
        raise ValueError(f"q's heads H={H} must be a multiple of the prefix's kv heads "
                         f"H_kv={kp.shape[0]}")
    if vp.shape != kp.shape:
        raise ValueError(f"v_prefix must have k_prefix's shape {kp.shape}, got {vp.shape}")
    if ks.ndim != 4 or ks.shape[0] != B or ks.shape[1] != kp.shape[0] or ks.shape[3] != d:
        raise ValueError(f"k_suffix must be (B, H_kv, S, d) = ({B}, {kp.shape[0]}, S, {d}), "
                         f"got shape {ks.shape}")
    if vs.shape != ks.shape:
        raise ValueError(f"v_suffix must have k_suffix's shape {ks.shape}, got {vs.shape}")
    for name, x in (("k_prefix", kp), ("v_prefix", vp), ("k_suffix", ks), ("v_suffix", vs)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    return q, kp, vp, ks, vs


def cascade_attention(q: ArrayLike, k_prefix: ArrayLike, v_prefix: ArrayLike,
                      k_suffix: ArrayLike, v_suffix: ArrayLike, *, causal: bool = False,
                      scale: float | None = None, return_lse: bool = False,
                      kernel: str = "auto"):
    """Attention of ``B`` sequences over one shared prefix plus a suffix each.

    Sequence ``b``'s keys are ``[k_prefix, k_suffix[b]]`` (and its values likewise): the
    result equals ``attention(q, concat(broadcast k_prefix, k_suffix), ...)`` with
    ``causal="bottom_right"`` when ``causal``, computed with the prefix read once.

    Parameters
    ----------
    q : (B, H, Nq, d), float32 or float64: each sequence's last ``Nq`` positions
    k_prefix, v_prefix : (H_kv, P, d): the shared prefix, one copy (``H % H_kv == 0``)
    k_suffix, v_suffix : (B, H_kv, S, d): each sequence's own keys after the prefix,
        ``S >= 0`` (all sequences the same length; pad ragged ones with a separate call)
    causal : bool
        Query ``i`` sees the whole prefix and the suffix keys up to its own position
        ``S - Nq + i`` (the queries are the suffix's last ``Nq`` tokens; ``Nq <= S``).
    scale, kernel : as :func:`fa_lab.attention`
    return_lse : bool
        Also return the LSE (B, H, Nq) over prefix and suffix.
    """
    q, kp, vp, ks, vs = _check(q, k_prefix, v_prefix, k_suffix, v_suffix)
    causal = check_bool("causal", causal)
    B, H, Nq, d = q.shape
    S = ks.shape[2]
    if causal and Nq > S:
        raise ValueError(f"with causal=True the queries are the suffix's last Nq tokens: "
                         f"Nq={Nq} must be <= the suffix length S={S}")
    # 1. the prefix, once: (B, H, Nq, d) -> (1, H, B * Nq, d)
    rows = np.ascontiguousarray(q.transpose(1, 0, 2, 3)).reshape(1, H, B * Nq, d)
    o_p, lse_p = attention(rows, kp[None], vp[None], scale=scale, kernel=kernel,
                           return_lse=True)
    o_p = o_p.reshape(H, B, Nq, d).transpose(1, 0, 2, 3)
    lse_p = lse_p.reshape(H, B, Nq).transpose(1, 0, 2)
    if S == 0:
        out, lse = np.ascontiguousarray(o_p), np.ascontiguousarray(lse_p)
    else:
        # 2. each sequence's suffix; 3. the exact merge
        o_s, lse_s = attention(q, ks, vs, causal="bottom_right" if causal else False,
                               scale=scale, kernel=kernel, return_lse=True)
        out, lse = merge_states(o_p, lse_p, o_s, lse_s)
    return (out, lse) if return_lse else out


__all__ = ["cascade_attention"]
