"""``flash``'s BLAS threads: SciPy's bundled BLAS (the library numba's ``np.dot`` calls)
limited to one thread, since BLAS runs inside ``prange``, and warmed on every thread so
OpenBLAS maps its work buffers once, outside any measured call. Importing this module
changes no BLAS setting; the kernel's first call does (:func:`ensure_blas_threads`).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls SciPy's BLAS)
from numba import njit, prange
from threadpoolctl import ThreadpoolController

from fa_lab.settings.config import CACHE, num_threads


def limit_scipy_blas(threads: int = 1) -> list[str]:
    """Set SciPy's bundled BLAS (not NumPy's, where they differ) to ``threads`` threads.

    Returns the paths of the libraries changed.
    """
    changed = []
    for lib in ThreadpoolController().lib_controllers:
        path = lib.filepath or ""
        if lib.user_api == "blas" and f"numpy{os.sep}" not in path and "numpy.libs" not in path:
            lib.set_num_threads(threads)
            changed.append(path)
    return changed


#: The BLAS libraries this process limited to one thread, filled at the kernel's first
#: call (:func:`ensure_blas_threads`); empty before it. Importing this module changes no
#: BLAS setting.
BLAS_LIMITED: list[str] = []


@njit(parallel=True, cache=CACHE, nogil=True)
def tile_gemms(x, n):
    """``n`` products ``x @ x`` of a square tile, one per ``prange`` iteration, through the
    same BLAS as the kernel (static schedule: every thread gets ``n / threads``).

    Used to warm BLAS on every thread and, by :func:`fa_lab.tools.bench.matmul_peak`, to
    measure what the kernel's block products can reach."""
    b = x.shape[0]
    out = np.zeros(n, dtype=x.dtype)
    for i in prange(n):
        r = np.empty((b, b), dtype=x.dtype)
        np.dot(x, x, r)
        out[i] = r[0, 0]
    return out


_BLAS_READY_THREADS = 0


def ensure_blas_threads() -> None:
    """Make every numba thread call BLAS once (first use, or more threads than before).

    OpenBLAS keeps a pool of work buffers and maps a new one (~32 MiB, measured with
    memray) when more gemms run at the same moment than it has buffers; it keeps them.
    Warming up with gemms that overlap on every thread keeps that one-time cost out of
    the calls (and out of their measured peak memory). The gemms must really overlap:
    with tiny 64 x 64 ones the threads did not, and with 8 x 256^2 per thread (~2 ms)
    they still ran one after the other when another process loaded a core (time
    slices of a few ms), and a 34 MB allocation appeared in a later measured call. Two
    1024^3 products per thread (~20 ms each) overlap under such load too (60 measured
    calls with a CPU hog beside them: no new buffer; before: one in 30). Cost: once per
    process.

    The first call also limits SciPy's BLAS to one thread (BLAS inside ``prange`` must
    not start threads of its own) and records which libraries in :data:`BLAS_LIMITED`.
    """
    global _BLAS_READY_THREADS
    if not BLAS_LIMITED:
        BLAS_LIMITED[:] = limit_scipy_blas(1) or ["(no separate SciPy BLAS found)"]
    threads = num_threads()
    if threads > _BLAS_READY_THREADS:
        tile_gemms(np.ones((1024, 1024), dtype=np.float32), 2 * threads)
        _BLAS_READY_THREADS = threads
