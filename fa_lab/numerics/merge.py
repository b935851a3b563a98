"""Merging attention states: the exact combination of partial attentions over disjoint keys.

A partial attention of one query row over a key set ``K_a`` is its **state**
``(O_a, lse_a)``: the normalized output ``O_a = sum_{j in K_a} softmax_a(s)_j v_j`` and
the log of its softmax denominator ``lse_a = log sum_{j in K_a} exp(s_j)``. For two
disjoint key sets the attention over their union is, exactly,

    lse = log(exp(lse_a) + exp(lse_b)) = m + log(exp(lse_a - m) + exp(lse_b - m)),
    O   = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b,          m = max(lse_a, lse_b)

(the online softmax of lesson 01, one level up). The merge is associative and
commutative, so the parts may come from key splits of one machine (Flash-Decoding), a
shared prefix and per-sequence suffixes (cascade attention), or other processes (ring
attention).

Conventions (every merge in fa_lab runs :func:`merge_splits`):

* a part that saw no key has ``lse = -inf`` and weight 0: its ``O`` is never read (it may
  be 0 or NaN, as PyTorch writes for fully masked rows);
* a row that no part saw gets ``O = 0``, ``lse = -inf``;
* a NaN ``lse`` makes the row NaN (it is never hidden).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fa_lab.numerics.checks import as_float_array
from fa_lab.settings.config import CACHE

NEG_INF = -np.inf


@njit(cache=CACHE, parallel=True, nogil=True)
def merge_splits(part_o, part_lse, out, lse):
    """The exact merge of ``S`` partial states (prange over rows): ``part_o`` (S, B, H, N,
    d), ``part_lse`` (S, B, H, N) into ``out`` (B, H, N, d) and ``lse`` (B, H, N)."""
    splits, B, H, Nq, d = part_o.shape
    for row in prange(B * H * Nq):
        b, h, i = row // (H * Nq), (row // Nq) % H, row % Nq
        top = NEG_INF
        nan = False
        for s in range(splits):
            x = part_lse[s, b, h, i]
            if x > top:
                top = x
            nan = nan or x != x
        o = out[b, h, i]
        o[:] = 0
        if nan:
            o[:] = np.nan
            lse[b, h, i] = np.nan
        elif top == NEG_INF:
            lse[b, h, i] = NEG_INF
        else:
            total = 0.0
            for s in range(splits):
                x = part_lse[s, b, h, i]
                if x == NEG_INF:  # an empty part: weight 0, its output never read
                    continue
                w = math.exp(x - top)
                total += w
                ps = part_o[s, b, h, i]
                for t in range(d):
                    o[t] += w * ps[t]
            for t in range(d):
                o[t] /= total
            lse[b, h, i] = top + math.log(total)


def merge_states(out_a, lse_a, out_b, lse_b) -> tuple[np.ndarray, np.ndarray]:
    """The exact merge of two partial attentions over disjoint key sets.

    Parameters
    ----------
    out_a, out_b : arrays (..., H, N, d), float32 or float64, the same shape and dtype
        Each part's normalized output, as ``fa_lab.attention(..., return_lse=True)``
        returns it (layout ``"bhnd"``).
    lse_a, lse_b : arrays (..., H, N), the outputs' dtype
        Each part's natural-log logsumexp of its scaled, masked scores; ``-inf`` for a
        row that saw no key (its output is then ignored, even if NaN).

    Returns
    -------
    out : (..., H, N, d), the attention over the union of the key sets
    lse : (..., H, N)

    Merging more parts: fold (``merge_states`` is associative and commutative up to
    rounding). Example: ``out, lse = merge_states(*attention(q, k[..., :m, :], v[..., :m,
    :], return_lse=True), *attention(q, k[..., m:, :], v[..., m:, :], return_lse=True))``
    equals ``attention(q, k, v, return_lse=True)``.
    """
    oa, ob = as_float_array("out_a", out_a), as_float_array("out_b", out_b)
    la, lb = as_float_array("lse_a", lse_a), as_float_array("lse_b", lse_b)
    if oa.ndim < 2:
        raise ValueError(f"out_a must have at least 2 dims (..., N, d), got shape {oa.shape}")
    if ob.shape != oa.shape:
        raise ValueError(f"out_b must have out_a's shape {oa.shape}, got {ob.shape}")
    for name, x in (("out_b", ob), ("lse_a", la), ("lse_b", lb)):
        if x.dtype != oa.dtype:
            raise TypeError(f"{name} must have out_a's dtype {oa.dtype}, got {x.dtype}")
    for name, x in (("lse_a", la), ("lse_b", lb)):
        if x.shape != oa.shape[:-1]:
            raise ValueError(f"{name} must have shape {oa.shape[:-1]} (out_a's without d), "
                             f"got {x.shape}")
    *lead, n, d = oa.shape
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    parts = np.empty((2, 1, rows, n, d), oa.dtype)
    parts[0, 0], parts[1, 0] = oa.reshape(rows, n, d), ob.reshape(rows, n, d)
    part_lse = np.stack([la.reshape(1, rows, n), lb.reshape(1, rows, n)])
    out = np.empty((1, rows, n, d), oa.dtype)
    lse = np.empty((1, rows, n), oa.dtype)
    merge_splits(parts, part_lse, out, lse)
    return out.reshape(oa.shape), lse.reshape(oa.shape[:-1])


# --- attention sinks: a merge with a virtual key of value 0 ---------------------------

def check_sinks(sinks, lead: tuple, H: int, dtype) -> np.ndarray | None:
    """``sinks`` of shape ``(H,)`` or ``(*lead, H)`` as a ``(B, H)`` array of ``dtype``
    (None stays None). Real numbers; ``-inf`` means no sink for that head."""
    if sinks is None:
        return None
    if isinstance(sinks, np.ma.MaskedArray):
        raise TypeError("sinks must be a plain array, not a numpy masked array")
    if type(sinks).__module__.split(".")[0] == "torch":
        raise TypeError("sinks is a torch tensor: use fa_lab.integrations.torch.attention "
                        "for tensors (with the gradient of the sinks)")
    x = np.asarray(sinks)
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise TypeError(f"sinks must be a real array (one logit per head), got dtype {x.dtype}")
    if x.shape not in ((H,), (*lead, H)):
        raise ValueError(f"sinks must have shape ({H},) (one logit per query head) or "
                         f"{(*lead, H)}, got {x.shape}")
    x = x.astype(np.float64)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("sinks must be real numbers or -inf (no sink), got NaN or +inf")
    B = int(np.prod(lead, dtype=np.int64)) if lead else 1
    return np.ascontiguousarray(np.broadcast_to(x.reshape(-1, H), (B, H)).astype(dtype))


def apply_sinks(out: np.ndarray, lse: np.ndarray, s) -> tuple[np.ndarray, np.ndarray]:
    """Merge a finished state ``(out, lse)`` with a sink: a virtual key of score ``s``
    (broadcastable to ``lse``) and value 0, as gpt-oss and StreamingLLM define it. It
    takes probability mass and adds nothing: ``lse' = logaddexp(lse, s)``, ``out' =
    exp(lse - lse') out`` (``out`` scaled in place). A row that saw no key gets ``out' =
    0`` and ``lse' = s``; NaN stays NaN."""
    new = np.logaddexp(lse, np.asarray(s, lse.dtype))
    with np.errstate(invalid="ignore"):  # -inf - -inf: no key and no sink
        w = np.exp(lse - new)
    w = np.where(new == NEG_INF, 0, w).astype(out.dtype)
    out *= w[..., None]
    return out, new.astype(lse.dtype)


def sink_grad(out, lse, dout, s) -> np.ndarray:
    """``d loss / d s`` per row, for ``out``, ``lse`` the sink-merged forward's results
    and ``dout`` the output's gradient: ``-exp(s - lse) * sum_t dout_t out_t`` (the sink's
    probability times ``-D``; its value is 0). Sum it over the rows that share a sink."""
    D = np.einsum("...t,...t->...", dout.astype(np.float64), out.astype(np.float64))
    with np.errstate(invalid="ignore"):
        p = np.exp(np.asarray(s, np.float64) - lse.astype(np.float64))
    return np.where(np.isfinite(p), -p * D, 0.0)
