"""Micro-kernels that measure the machine rather than attention: streams and an FMA loop.

* :func:`read_serial` / :func:`read_parallel` -- ``sum(x)`` over a float32 array,
  ``reps`` times: 4 bytes read per element per pass (the "read" bandwidth).
* :func:`triad_serial` / :func:`triad_parallel` -- STREAM's triad ``a = b + s * c``,
  ``reps`` times: 12 bytes per element per pass by STREAM's convention (two reads, one
  write; a write-allocating cache also reads ``a``, which this count leaves out).
* :func:`fma_serial` / :func:`fma_parallel` -- ``x = x * a + b`` on ``LANES`` independent
  float32 accumulators that never leave the registers: 2 FLOPs per lane per step. With
  enough independent chains the FMA units, not their latency, set the pace (an FMA has
  a latency of ~4 cycles and 2 issue ports: 8 vector chains in flight).

The parallel versions split the work into one contiguous chunk per thread (``prange``),
so a working set of ``W`` bytes puts ``W / threads`` in each core's private caches.
Every loop is written to vectorize (contiguous, ``fastmath`` flags from
:mod:`fa_lab.settings.config`); ``fa_lab.lessons.simd.vector_report`` shows the packed FMAs.
Measured bandwidths and the FMA peak are in lesson ``09_memory_hierarchy``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fa_lab.settings.config import CACHE, FASTMATH

#: Independent float32 accumulators of the FMA loop: 16 vectors of 8 (ymm) lanes.
LANES = 128


@njit(cache=CACHE, fastmath=FASTMATH)
def _read(x, reps):
    total = 0.0  # float64 across passes; each pass sums in float32 (vectorized)
    for r in range(reps):
        s = np.float32(0)
        for i in range(x.shape[0]):
            s += x[i]
        total += s
    return total


@njit(cache=CACHE, fastmath=FASTMATH)
def read_serial(x, reps):
    """``reps`` passes of ``sum(x)``, one thread; returns the sum (so it is not elided)."""
    return _read(x, reps)


@njit(cache=CACHE, fastmath=FASTMATH, parallel=True)
def read_parallel(x, reps, chunks):
    """The same over ``chunks`` contiguous pieces in parallel (one per thread)."""
    n = x.shape[0]
    step = (n + chunks - 1) // chunks
    part = np.zeros(chunks)
    for c in prange(chunks):
        part[c] = _read(x[c * step:min(n, (c + 1) * step)], reps)
    return part.sum()


@njit(cache=CACHE, fastmath=FASTMATH)
def _triad(a, b, c, s, reps):
    for r in range(reps):
        t = s + np.float32(r) * np.float32(1e-7)  # a new scalar each pass
        for i in range(a.shape[0]):
            a[i] = b[i] + t * c[i]


@njit(cache=CACHE, fastmath=FASTMATH)
def triad_serial(a, b, c, s, reps):
    """``reps`` passes of ``a = b + s * c``, one thread."""
    _triad(a, b, c, s, reps)


@njit(cache=CACHE, fastmath=FASTMATH, parallel=True)
def triad_parallel(a, b, c, s, reps, chunks):
    """The same over ``chunks`` contiguous pieces in parallel."""
    n = a.shape[0]
    step = (n + chunks - 1) // chunks
    for k in prange(chunks):
        lo, hi = k * step, min(n, (k + 1) * step)
        _triad(a[lo:hi], b[lo:hi], c[lo:hi], s, reps)


@njit(cache=CACHE, fastmath=FASTMATH)
def _fma(seed, steps, a, b):
    x = seed.copy()  # (LANES,): small enough to live in registers
    for _ in range(steps):
        for j in range(LANES):
            x[j] = x[j] * a + b
    return x.sum()


@njit(cache=CACHE, fastmath=FASTMATH)
def fma_serial(seed, steps, a, b):
    """``steps`` rounds of ``x = x * a + b`` on ``LANES`` accumulators, one thread:
    ``2 * LANES * steps`` FLOPs. Returns ``sum(x)``."""
    return _fma(seed, steps, a, b)


@njit(cache=CACHE, fastmath=FASTMATH, parallel=True)
def fma_parallel(seed, steps, a, b, chunks):
    """``chunks`` independent copies of :func:`fma_serial` in parallel."""
    part = np.zeros(chunks, dtype=np.float32)
    for c in prange(chunks):
        part[c] = _fma(seed, steps, a, b)
    return part.sum()
