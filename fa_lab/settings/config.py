"""Settings used across fa_lab, in one place: fastmath flags, the numba cache, tile
sizes, key splits, benchmark pauses, load thresholds, threads, the threading layer.

The bottom layer (``docs/ARCHITECTURE.md``): it imports no other fa_lab module, and
importing it has two side effects, on purpose, both before numba compiles anything: it
lets numba use the CPU's full vector width (:data:`VECTOR_WIDTH`) and selects numba's
threading layer (:data:`THREADING_LAYER`). BLAS
threads are *not* touched here; the ``flash`` kernel limits SciPy's BLAS at its first
call (:func:`fa_lab.kernels.ladder.flash.ensure_blas_threads`, recorded in
:data:`fa_lab.kernels.ladder.flash.BLAS_LIMITED`).

Why a fastmath flag *set* and not ``fastmath=True``: ``True`` includes ``nnan``/``ninf``,
which lets LLVM assume there are no infinities or NaNs. A causal mask is a ``-inf``
score, and a test such as ``s == -inf`` is then folded to a constant (measured: a causal
kernel compiled with ``fastmath=True`` returned NaN rows). The set below keeps IEEE
semantics for inf and NaN while still allowing re-association (needed to vectorize
reductions) and FMA contraction.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings

import numba

#: fastmath flags for kernels written to vectorize. No ``nnan``/``ninf``: masks are -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}  # numba wants a set (not frozenset)

#: numba's on-disk cache (``__pycache__`` inside the package). Set ``FA_LAB_NO_CACHE=1``
#: to compile fresh every process (useful when editing kernels across modules).
CACHE = os.environ.get("FA_LAB_NO_CACHE", "0") != "1"

#: Default tile sizes (rows of Q per block, rows of K/V per block) for tiled kernels.
#: ``Br`` and ``Bc`` in the FlashAttention papers.
BLOCK_Q = 64
BLOCK_KV = 64

#: Default tiles (Br, Bc) of the ``flash`` kernel: BLAS block products want bigger tiles
#: than loops (a BLAS call needs work to amortize its overhead). The autotuner
#: (:mod:`fa_lab.tools.tune`) stores a better choice per machine.
FLASH_BLOCKS = (256, 256)
#: ``flash``'s two ways to compute ``P V`` (``pv=``): SciPy's BLAS, or fa_lab's own
#: float32 micro-kernel (:mod:`fa_lab.kernels.ladder.pv_product`); ``kernel="auto"`` runs
#: the one measured faster on this machine (:mod:`fa_lab.tools.tune`), else BLAS.
FLASH_PV_PATHS = ("blas", "microkernel")
#: The micro-kernel's channels per call (two zmm of float32): it serves ``d_v`` multiples.
FLASH_PV_CHANNELS = 32
#: Tiles (Br, Bc) of the ``sage`` INT8 kernel: a strip's S and P (8 rows) stay in L1.
SAGE_BLOCKS = (128, 256)
#: Tiles (Br, Bc) of the AMX kernels (Bc rounded up to a multiple of 32 inside).
AMX_BLOCKS = (64, 256)
#: Tiles (Br, Bc) of the ``quantized`` KV-cache kernel (Br is unused: a task's rows are
#: the GQA group's queries). Bc = 256 ran int8 decode tiles 10% faster than 64 (Intel
#: Xeon, rows in L2): fewer tiles, each with its softmax and accumulator pass.
QUANTIZED_BLOCKS = (64, 256)

#: Flash-Decoding (:func:`fa_lab.kernels.ladder.flash.plan_splits`): aim for at least this many
#: tasks per thread before splitting the keys (load balance) ...
SPLIT_TASKS_PER_THREAD = 2

#: ... and never split into ranges shorter than this many keys (each split pays a merge).
SPLIT_MIN_KEYS = 512


#: Untimed pause (seconds) before each timed call in :func:`fa_lab.tools.bench.time_calls`.
#: Measured here: after NumPy's multi-threaded OpenBLAS returns, its threads spin for
#: ~100 ms, and whatever runs next on 2 cores took 1.3-2x as long (torch SDPA 52 -> 105
#: ms, flash 56 -> 101 ms at N=2048, H=8); a 0.1 s pause removed the effect (56 ms).
BENCH_COOLDOWN_S = 0.1

#: After the cooldown pause, contenders faster than this get one untimed call first.
#: Measured here: the first multi-threaded call after 0.1 s idle costs 4-12 ms more (the
#: sleeping threads of numba's pool, or torch's, wake up; on this VM that is slow):
#: decode calls of ~0.2 ms read as 7-12 ms. Back-to-back calls (a decode loop,
#: consecutive layers) do not pay it, so the timed call follows a warm one.
REWARM_BELOW_S = 0.25


def num_threads() -> int:
    """Threads numba's parallel kernels use now (``NUMBA_NUM_THREADS`` at start, default
    all cores; changed with ``numba.set_num_threads``): the one place fa_lab asks."""
    return numba.get_num_threads()


#: A timing window counts as *busy* (its verdicts read ``inconclusive``) when other
#: processes used more than this share of the machine's CPU time (all cores) during it
#: (:class:`fa_lab.settings.machine.LoadMonitor`). One core spinning on a 2-core machine reads
#: 0.3-0.5; a quiet VM 0.00-0.03.
BUSY_OTHERS = 0.15

#: ... or when the hypervisor stole more than this share of the CPU time.
BUSY_STEAL = 0.10

#: Shortest load window (seconds). /proc/stat counts in ticks of 10 ms, so a 5 ms window
#: (a decode benchmark) read one stray tick as "others used 50% of the CPU"; a shorter
#: window is padded with an idle wait (this process does nothing meanwhile, so whatever
#: runs then is others' load) until it lasts this long.
MIN_LOAD_WINDOW_S = 0.5

#: numba's threading layer for the ``parallel=True`` kernels, set when fa_lab is imported
#: (before any parallel kernel runs; once numba has started its threads it cannot change).
#:
#: Why TBB: numba's choices on Linux are GNU OpenMP (``omp``, the default when TBB is
#: missing), ``workqueue`` and ``tbb``. With GNU OpenMP, a process that forks after a
#: parallel kernel ran kills the child ("fork() called from a process already using GNU
#: OpenMP") and ``multiprocessing.Pool`` hangs: Python's default start method on Linux
#: and PyTorch's DataLoader workers both fork. ``workqueue`` survives a fork but is not
#: thread-safe (two Python threads calling a parallel kernel at once abort the
#: process). TBB is both fork-safe and thread-safe, so it is a dependency (``tbb`` from
#: PyPI). Trade-off, measured once (flash, B=1, H=8, N=1024, d=64, float32, 3 alternating
#: processes per layer x 15 calls, 2 cores, load average 0.6-1.1, a shared VM): OpenMP
#: median 33.2 ms (quartiles 32.3-35.6), TBB 27.3 ms (27.1-27.4): no cost here. The
#: price is a dependency (a 3 MB wheel) and a preload of its library (below).
#: An explicit ``NUMBA_THREADING_LAYER`` in the environment wins over this setting.
THREADING_LAYER = "tbb"
#: PyPI's ``tbb`` has wheels for x86-64 only (Linux, Windows, macOS). On other CPUs
#: (aarch64 Linux, Apple silicon) fa_lab keeps numba's default layer: OpenMP where numba
#: finds it (fast; a fork after a parallel call may kill the child), else ``workqueue``
#: (fork-safe, but two Python threads must not run parallel kernels at once).
TBB_WHEELS = platform.machine().lower() in ("x86_64", "amd64")


#: The vector width of compiled kernels. LLVM tunes code for the CPU *name* it sees, and
#: names some AVX-512 CPUs after client parts that prefer 256-bit vectors: on an Intel
#: Xeon VM (CPUID model 167) it says ``rocketlake``, and every vectorized loop then used
#: ``ymm`` registers on a core with two 512-bit FMA units. ``"full"`` (default) removes
#: that preference at import, before numba compiles anything (numba's CPU features =
#: the host's + ``-prefer-256-bit``), so every AVX-512 CPU gets 512-bit loops; on a CPU
#: without AVX-512, or one whose LLVM tuning already prefers 512 bits (AMD Zen 4), it
#: changes nothing. ``"llvm"`` (``FA_LAB_VECTOR_WIDTH=llvm``) keeps LLVM's choice, to
#: compare. ``NUMBA_CPU_FEATURES`` (or ``NUMBA_CPU_NAME=generic``) set by the user win.
#: This setting is numba's, so it applies to the process's other numba code too.
VECTOR_WIDTH = os.environ.get("FA_LAB_VECTOR_WIDTH", "full")


def set_vector_width() -> str:
    """Apply :data:`VECTOR_WIDTH`; returns what was done, in words (for ``machine()``)."""
    from numba.core import config as numba_config
    from numba.core.registry import cpu_target

    if VECTOR_WIDTH not in ("full", "llvm"):
        raise ValueError(f"FA_LAB_VECTOR_WIDTH must be 'full' or 'llvm', got {VECTOR_WIDTH!r}")
    if VECTOR_WIDTH == "llvm":
        return "LLVM's choice (FA_LAB_VECTOR_WIDTH=llvm)"
    if numba_config.CPU_FEATURES is not None:
        return "the CPU features given to numba (NUMBA_CPU_FEATURES or a generic CPU name)"
    if "_toplevel_target_context" in vars(cpu_target):
        return "LLVM's choice (numba compiled code before fa_lab was imported)"
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return "LLVM's choice (no AVX-512)"
    numba_config.CPU_FEATURES = features + ",-prefer-256-bit"
    return "full: 512-bit vectors preferred (numba's CPU features + -prefer-256-bit)"


#: What :func:`set_vector_width` did in this process (at import).
VECTOR_WIDTH_IN_USE = set_vector_width()


def _preload_tbb() -> bool:
    """Load ``libtbb.so.12`` from the environment's ``lib/`` (where PyPI's ``tbb`` wheel
    puts it) so numba's TBB pool, which has no search path of its own, finds it in a
    virtual environment. True if TBB is loaded."""
    names = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib"}
    name = names.get(sys.platform)
    if name is None:  # Windows: tbb12.dll sits next to python.exe and is found anyway
        return True
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "lib", name)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                pass
    try:  # a system-wide TBB (e.g. conda, apt)
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def set_threading_layer() -> str:
    """Select :data:`THREADING_LAYER` and start numba's threads now; returns the layer
    in use (``numba.threading_layer()``).

    Keeps the user's ``NUMBA_THREADING_LAYER`` when set. Warns (once, at import) and
    keeps numba's default when TBB cannot be loaded, or when numba's threads were
    already started with another layer (a parallel function ran before fa_lab was
    imported): fork after a parallel call is then unsafe with GNU OpenMP.
    """
    from numba.np.ufunc import parallel

    if os.environ.get("NUMBA_DISABLE_JIT", "0") == "1":
        return "none (NUMBA_DISABLE_JIT=1)"
    if not getattr(parallel, "_is_initialized", False) and not os.environ.get("NUMBA_THREADING_LAYER"):
        if _preload_tbb():
            numba.config.THREADING_LAYER = THREADING_LAYER
        elif not TBB_WHEELS:
            pass  # no TBB wheel for this CPU: numba's default layer, as documented above
        else:
            warnings.warn("fa_lab: TBB (pip install tbb) could not be loaded; numba keeps "
                          "its default threading layer, which may not survive a fork after "
                          "a parallel kernel ran (see fa_lab.settings.config.THREADING_LAYER)",
                          RuntimeWarning, stacklevel=2)
    numba.get_num_threads()  # starts the threads: the layer is fixed from here on
    layer = numba.threading_layer()
    if layer == "omp" and TBB_WHEELS and not os.environ.get("NUMBA_THREADING_LAYER"):
        warnings.warn("fa_lab: numba runs on OpenMP (its threads started before fa_lab was "
                      "imported, or TBB is missing): forking after a parallel kernel call "
                      "may kill the child", RuntimeWarning, stacklevel=2)
    return layer


#: The threading layer in use in this process (set at import).
THREADING_LAYER_IN_USE = set_threading_layer()
