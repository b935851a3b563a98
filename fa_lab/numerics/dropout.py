"""Reproducible attention dropout: the mask is a hash of (seed, b, h, i, j), never stored.

FlashAttention regenerates the dropout mask in the backward pass instead of storing
an ``N x N`` array. Here the keep/drop decision of probability ``P[b, h, i, j]`` is

    u = splitmix64(splitmix64(mix(seed) ^ (b << 48 | h << 32 | i)) ^ j) >> 11) / 2**53
    keep  <=>  u >= dropout_p

a counter-based hash: it depends only on the seed and the element's coordinates (not
on shapes, block sizes, thread count or visit order), so the forward and the backward
kernels, tiled or not, on any number of threads, see exactly the same mask. Kept
probabilities are scaled by ``1 / (1 - dropout_p)`` (inverted dropout, as PyTorch).
Limits: ``b, h < 2**16``, ``i < 2**32``.

:func:`keep_mask` is the NumPy version (used by the reference); :func:`keep` is the
same function for jitted kernels. A test checks they agree bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fa_lab.settings.config import CACHE

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_U53 = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=CACHE)
def _splitmix64(z):
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


@njit(cache=CACHE)
def row_key(seed_mixed, b, h, i):
    """The per-row part of the hash; combine with the column in :func:`keep`."""
    return _splitmix64(np.uint64(seed_mixed) ^ ((np.uint64(b) << np.uint64(48))
                                     | (np.uint64(h) << np.uint64(32)) | np.uint64(i)))


@njit(cache=CACHE)
def keep(row, j, dropout_p):
    """True if element ``j`` of the row with key ``row`` is kept."""
    u = np.float64(_splitmix64(row ^ np.uint64(j)) >> np.uint64(11)) * _U53
    return u >= dropout_p


@njit(cache=CACHE)
def mix_seed(seed):
    """The seed as it enters the hash (so nearby seeds give unrelated masks)."""
    return _splitmix64(np.uint64(seed))


def _splitmix64_np(z):
    with np.errstate(over="ignore"):
        z = z + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        return z ^ (z >> np.uint64(31))


def keep_mask(seed: int, B: int, H: int, Nq: int, Nk: int, dropout_p: float) -> np.ndarray:
    """Boolean ``(B, H, Nq, Nk)`` keep mask, in NumPy (materialized: for the reference)."""
    seed_mixed = _splitmix64_np(np.uint64(seed))
    b = np.arange(B, dtype=np.uint64)[:, None, None, None]
    h = np.arange(H, dtype=np.uint64)[None, :, None, None]
    i = np.arange(Nq, dtype=np.uint64)[None, None, :, None]
    j = np.arange(Nk, dtype=np.uint64)[None, None, None, :]
    row = _splitmix64_np(seed_mixed ^ ((b << np.uint64(48)) | (h << np.uint64(32)) | i))
    u = (_splitmix64_np(row ^ j) >> np.uint64(11)).astype(np.float64) * _U53
    return u >= dropout_p


def check_dropout(dropout_p, seed):
    """Validate the dropout arguments (shared by the forward and backward APIs)."""
    import numbers

    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        if seed is None:
            raise ValueError("seed is required when dropout_p > 0 (the backward pass "
                             "regenerates the same mask from it)")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return float(dropout_p), (int(seed) if seed is not None else 0)
