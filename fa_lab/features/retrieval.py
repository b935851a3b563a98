"""Attention as top-K retrieval: one or many query embeddings against a large key set.

:func:`topk_attention` scores queries against ``keys`` in tiles of ``block`` keys (one
BLAS product per tile), keeps a running top-K per query (a jitted merge, parallel over
queries), and never holds more than ``Q x block`` scores, so its extra memory is
``O(Q (block + K))`` instead of the ``O(Q N)`` of materializing every score.

Scores are ``scale * (query . key)`` (``scale`` defaults to 1: with unit-norm embeddings
that is the cosine similarity). Results are sorted by score, highest first; **ties** go
to the smaller key index, so the result is deterministic and equals a stable argsort
of ``-score``. ``values`` (optional) adds the attention-weighted values of the top K:
``softmax(top scores) @ values[top indices]`` per query, i.e. attention restricted to
the K best keys (top-k attention).
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike
from numba import njit

from fa_lab.numerics.checks import check_scale, refuse_masked
from fa_lab.settings.config import CACHE


@njit(cache=CACHE, nogil=True)
def _merge_topk(S, j0, best_s, best_i):
    """Fold a tile of scores ``S`` (Q, bc) for keys ``j0 ..`` into each query's sorted
    top list (``best_s`` descending, ties by smaller index; ``-inf`` = empty slot).

    Serial on purpose: a parallel loop here cost ~5 ms per tile on this VM (waking the
    thread pool for each call), 100x the merge itself; the scores' BLAS product is
    already multi-threaded."""
    Q, bc = S.shape
    k = best_s.shape[1]
    for qi in range(Q):
        bs, bi = best_s[qi], best_i[qi]
        Sr = S[qi]
        for c in range(bc):
            s = Sr[c]
            j = j0 + c
            # keys arrive in increasing index order, so a tie never beats a kept entry
            if s > bs[k - 1]:
                p = k - 1
                while p > 0 and s > bs[p - 1]:
                    bs[p] = bs[p - 1]
                    bi[p] = bi[p - 1]
                    p -= 1
                bs[p] = s
                bi[p] = j


def topk_attention(query: ArrayLike, keys: ArrayLike, values: ArrayLike | None = None,
                   k: int = 5, *, scale: float = 1.0, block: int = 8192):
    """Top-``k`` keys per query by ``scale * query . key``, in tiles of ``block`` keys.

    Parameters
    ----------
    query : (d,) or (Q, d) float32/float64
    keys : (N, d), the same dtype
    values : (N, dv), optional; then also returns the softmax-weighted values of the top k
    k : 1 <= k <= N
    scale : a finite real number; query, keys and ``scale * query . key`` must be finite
        (``ValueError`` naming what is not: a NaN score has no rank)

    Returns ``(indices, scores)`` each ``(Q, k)`` (``(k,)`` for a 1-D query), sorted by
    score descending (ties: smaller index first), plus ``out`` ``(Q, dv)`` with
    ``values``.
    """
    for name, x in (("query", query), ("keys", keys), ("values", values)):
        refuse_masked(name, x)
    q = np.asarray(query)
    K = np.asarray(keys)
    for name, x in (("query", q), ("keys", K)):
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if K.ndim != 2:
        raise ValueError(f"keys must have shape (N, d), got {K.shape}")
    single = q.ndim == 1
    q2 = q[None] if single else q
    if q2.ndim != 2 or q2.shape[1] != K.shape[1]:
        raise ValueError(f"query must have shape (d,) or (Q, d) with d={K.shape[1]} (the "
                         f"keys' d), got {q.shape}")
    if K.dtype != q.dtype:
        raise TypeError(f"query and keys must share a dtype, got {q.dtype} and {K.dtype}")
    N = K.shape[0]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 1 <= k <= N:
        raise ValueError(f"k must be in 1..N (N={N} keys), got {k}")
    if isinstance(block, (bool, np.bool_)) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if scale is None:
        raise TypeError("scale must be a finite real number (1.0 for cosine similarity "
                        "of unit vectors), got None")
    scale = check_scale(scale, q2.shape[1])
    if not np.isfinite(q2).all():
        raise ValueError("query must be finite (a NaN score has no rank)")
    if values is not None:
        V = np.asarray(values)
        if V.ndim != 2 or V.shape[0] != N:
            raise ValueError(f"values must have shape (N={N}, dv), got {V.shape}")
        if V.dtype.kind not in "fiu" or V.dtype == np.bool_:
            raise TypeError(f"values must be a float array, got dtype {V.dtype}")
    with np.errstate(over="ignore"):
        q2 = np.ascontiguousarray(q2 * q2.dtype.type(scale))
    if not np.isfinite(q2).all():
        raise ValueError(f"scale * query overflows {q2.dtype} (scale={scale!r}): rescale "
                         f"the inputs or use float64")
    Q = q2.shape[0]
    best_s = np.full((Q, k), -np.inf, dtype=q2.dtype)
    best_i = np.full((Q, k), -1, dtype=np.int64)
    S = np.empty((Q, min(block, N)), dtype=q2.dtype)
    for j0 in range(0, N, block):
        j1 = min(j0 + block, N)
        tile = S[:, :j1 - j0]
        with np.errstate(over="ignore", invalid="ignore"):
            np.matmul(q2, K[j0:j1].T, out=tile)
        if not np.isfinite(tile).all():  # checks keys too, at Q x block per tile
            if not np.isfinite(K[j0:j1]).all():
                raise ValueError(f"keys must be finite: a NaN or inf among keys "
                                 f"{j0}..{j1 - 1}")
            raise ValueError(f"scale * query . key overflows {tile.dtype} for keys "
                             f"{j0}..{j1 - 1} (finite inputs): rescale them or use float64")
        _merge_topk(tile, j0, best_s, best_i)
    result = (best_i, best_s)
    if values is not None:
        w = np.exp(best_s - best_s[:, :1])
        w /= w.sum(axis=1, keepdims=True)
        out = np.einsum("qk,qkd->qd", w, np.asarray(values)[best_i])
        result = result + (out,)
    if single:
        result = tuple(r[0] for r in result)
    return result


def topk_reference(query, keys, k, *, scale=1.0):
    """The NumPy reference: every score, then a stable argsort of ``-score`` (float64)."""
    q = np.atleast_2d(np.asarray(query, np.float64)) * scale
    S = q @ np.asarray(keys, np.float64).T
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(S, idx, axis=1)


def numpy_topk(query, keys, k, *, scale=1.0):
    """The usual NumPy way (the benchmark's baseline): all scores ``(Q, N)`` with one
    BLAS product, ``argpartition`` for the top k, then sort those k."""
    q = np.atleast_2d(query) * np.asarray(query).dtype.type(scale)
    S = q @ keys.T
    part = np.argpartition(-S, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(S, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(ps, order, axis=1)
