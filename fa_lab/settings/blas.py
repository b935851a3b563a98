"""Which BLAS kernels the ``flash`` rung's block products run on, and a hint when a
faster set exists.

OpenBLAS picks its kernels (``Haswell`` = AVX2, ``SkylakeX`` = AVX-512, ...) once, when
the library is loaded, from the CPU or from the ``OPENBLAS_CORETYPE`` environment
variable. fa_lab never changes that choice (the variable may be set on purpose, for
reproducibility across hosts), but it records it with every benchmark and says when the
CPU could run a faster set. Measured on this project's machine (AMD, AVX-512F/BW/DQ/VL,
whose environment sets ``OPENBLAS_CORETYPE=Haswell``): a 2048^2 float32 matrix product
ran at 210 GFLOP/s with the Haswell kernels and 360-395 GFLOP/s with SkylakeX; the
``flash`` kernel's block products at 178 and 275-308 GFLOP/s. OpenBLAS's own detection
(variable unset) chose SkylakeX on that machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from fa_lab.settings.cpu_features import proc_flags

#: AVX-512 subsets used by OpenBLAS's SkylakeX kernels.
SKYLAKEX_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")

#: OpenBLAS kernel sets for x86-64 that use AVX-512.
AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids", "zen4", "zen5"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` does not exist)."""
    return proc_flags() or set()


def blas_libraries() -> list[dict]:
    """Loaded BLAS libraries: whose (NumPy/SciPy), file, version, kernel set (``kernels``) and
    threads; sorted by owner, so the description (and the tuning file's fingerprint) does not
    depend on which library happened to load first."""
    from threadpoolctl import threadpool_info

    out = []
    for i in threadpool_info():
        if i.get("user_api") != "blas":
            continue
        path = i.get("filepath") or "?"
        owner = "NumPy" if "numpy" in path else "SciPy" if "scipy" in path else "other"
        out.append({"owner": owner, "library": Path(path).name, "kernels": i.get("architecture"),
                    "version": i.get("version"), "threads": i.get("num_threads")})
    return sorted(out, key=lambda b: (b["owner"], b["library"]))


def coretype_hint() -> str | None:
    """A sentence when ``OPENBLAS_CORETYPE`` holds back AVX-512 kernels the CPU has."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if not forced or forced.lower() in AVX512_CORES:
        return None
    if all(f in cpu_flags() for f in SKYLAKEX_FLAGS):
        return (f"OPENBLAS_CORETYPE={forced} is set, so OpenBLAS uses {forced} kernels, "
                f"although this CPU has AVX-512 (OpenBLAS's SkylakeX kernels). The flash "
                f"kernel's block products run on OpenBLAS: compare with "
                f"`OPENBLAS_CORETYPE=SkylakeX python -m fa_lab bench ...`.")
    return None
