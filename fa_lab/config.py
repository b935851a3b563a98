"""Settings used across fa_lab: the only place for fastmath flags, block sizes, threads.

Why a flag *set* and not ``fastmath=True``: ``True`` includes ``nnan``/``ninf``, which
lets LLVM assume there are no infinities or NaNs. A causal mask is a ``-inf`` score,
and a test such as ``s == -inf`` is then folded to a constant (see
``../shared/PITFALLS.md``). The set below keeps IEEE semantics for inf and NaN while
still allowing re-association (needed to vectorize reductions) and FMA contraction.
"""

from __future__ import annotations

import os

#: fastmath flags for kernels written to vectorize. No ``nnan``/``ninf``: masks are -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}  # numba wants a set (not frozenset)

#: Kernels on the "scalar" rungs of the ladder use strict IEEE arithmetic (no flags):
#: without ``reassoc`` LLVM cannot vectorize their floating-point reductions.
STRICT = False

#: numba's on-disk cache (``__pycache__`` inside the package). Set ``FA_LAB_NO_CACHE=1``
#: to compile fresh every process (useful when editing kernels across modules).
CACHE = os.environ.get("FA_LAB_NO_CACHE", "0") != "1"

#: Default tile sizes (rows of Q per block, rows of K/V per block) for tiled kernels.
#: ``Br`` and ``Bc`` in the FlashAttention papers.
BLOCK_Q = 64
BLOCK_KV = 64


#: Untimed pause (seconds) before each timed call in :func:`fa_lab.bench.time_calls`.
#: Measured here: after NumPy's multi-threaded OpenBLAS returns, its threads spin for
#: ~100 ms, and whatever runs next on 2 cores took 1.3-2x as long (torch SDPA 52 -> 105
#: ms, flash 56 -> 101 ms at N=2048, H=8); a 0.1 s pause removed the effect (56 ms).
BENCH_COOLDOWN_S = 0.1


def num_threads() -> int:
    """Threads numba's parallel kernels use (``NUMBA_NUM_THREADS``, default: all cores)."""
    import numba

    return numba.get_num_threads()


#: A timing window counts as *busy* (its verdicts read ``inconclusive``) when other
#: processes used more than this share of the machine's CPU time (all cores) during it
#: (:class:`fa_lab.machine.LoadMonitor`). One core spinning on a 2-core machine reads
#: 0.3-0.5; a quiet VM 0.00-0.03.
BUSY_OTHERS = 0.15

#: ... or when the hypervisor stole more than this share of the CPU time.
BUSY_STEAL = 0.10
