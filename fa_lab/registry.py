"""The kernel registry: the one list that feeds the API, the tests, the benchmarks and
the notebooks. Adding a kernel is one :class:`Kernel` entry in :data:`KERNELS`.

Every entry's ``run`` takes the canonical arguments built by :func:`fa_lab.attention`::

    run(q, k, v, bias, scale, alignment, block_q, block_kv) -> (out, lse)

    q (B, H, Nq, d), k/v (B, H_kv, Nk, d): C-contiguous, one float dtype
    bias: None or a read-only (B, H, Nq, Nk) additive float view of q's dtype
    alignment: None, "top_left" or "bottom_right"
    block_q, block_kv: positive ints (only for kernels with ``tiled=True``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fa_lab import reference
from fa_lab.kernels import naive, online, tiled, tiled_simd
from fa_lab.kernels.naive import naive_forward
from fa_lab.kernels.online import online_forward
from fa_lab.kernels.tiled import tiled_forward
from fa_lab.kernels.tiled_simd import tiled_simd_forward


@dataclass(frozen=True)
class Request:
    """What a call needs from a kernel (built by the API, checked by :meth:`Kernel.unsupported`)."""

    dtype: np.dtype
    causal: bool = False
    mask: bool = False
    gqa: bool = False
    blocks: bool = False


@dataclass(frozen=True)
class Kernel:
    """One rung of the ladder and what it supports."""

    name: str
    rung: int
    summary: str
    run: Callable
    driver: Callable | None = None  # the jitted driver, for source display and assembly
    tiled: bool = False  # accepts block_q / block_kv
    parallel: bool = False  # uses all numba threads
    dtypes: tuple = (np.float32, np.float64)
    causal: bool = True
    mask: bool = True
    gqa: bool = True
    scratch: Callable | None = None  # byte model of the kernel's own allocations
    tags: tuple = field(default_factory=tuple)

    def unsupported(self, req: Request) -> str | None:
        """Why this kernel cannot serve ``req`` (an option name and a sentence), or None."""
        if np.dtype(req.dtype) not in [np.dtype(t) for t in self.dtypes]:
            return f"kernel {self.name!r} does not support dtype={np.dtype(req.dtype).name}"
        for option in ("causal", "mask", "gqa"):
            if getattr(req, option) and not getattr(self, option):
                return f"kernel {self.name!r} does not support {option}"
        if req.blocks and not self.tiled:
            return (f"kernel {self.name!r} is not tiled: block_q/block_kv are not options "
                    "of it")
        return None


def _reference_run(q, k, v, bias, scale, alignment, block_q, block_kv):
    out, lse = reference.attention(q, k, v, causal=alignment or False, scale=scale, mask=bias)
    return out.astype(q.dtype), lse.astype(q.dtype)


_NO_BIAS = {}


def _no_bias(dtype) -> np.ndarray:
    """A read-only (1, 1, 1, 1) placeholder passed when there is no mask (never read)."""
    dtype = np.dtype(dtype)
    if dtype not in _NO_BIAS:
        _NO_BIAS[dtype] = np.broadcast_to(np.zeros((), dtype), (1, 1, 1, 1))
    return _NO_BIAS[dtype]


def numba_runner(driver) -> Callable:
    """Adapt a jitted driver with the canonical signature (see :mod:`fa_lab.kernels`)."""

    def run(q, k, v, bias, scale, alignment, block_q, block_kv):
        B, H, Nq, d = q.shape
        out = np.empty_like(q)
        lse = np.empty((B, H, Nq), dtype=q.dtype)
        offset = reference.causal_offset(Nq, k.shape[2], alignment) if alignment else 0
        has_bias = bias is not None
        driver(q, k, v, bias if has_bias else _no_bias(q.dtype), has_bias,
               q.dtype.type(scale), alignment is not None, offset, block_q or 1,
               block_kv or 1, out, lse)
        return out, lse

    run.__name__ = f"run_{driver.__name__}"
    run.__doc__ = driver.__doc__
    return run


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "float64 NumPy, materializes the N x N scores (source of truth)",
               _reference_run, scratch=reference.scratch_bytes),
        Kernel("naive", 1, "scalar Numba, three passes over a row of scores, 1 thread",
               numba_runner(naive_forward), naive_forward, scratch=naive.scratch_bytes),
        Kernel("online", 2, "scalar Numba, one pass with running max and sum, 1 thread",
               numba_runner(online_forward), online_forward, scratch=online.scratch_bytes),
        Kernel("tiled", 3, "Br x Bc blocks, online softmax across blocks, causal block "
               "skipping; scalar, 1 thread", numba_runner(tiled_forward), tiled_forward,
               tiled=True, scratch=tiled.scratch_bytes),
        Kernel("tiled_simd", 4, "tiled, inner loops vectorized by LLVM (packed FMA), "
               "prange over (b, h, query block)", numba_runner(tiled_simd_forward),
               tiled_simd_forward, tiled=True, parallel=True, scratch=tiled_simd.scratch_bytes),
    ]
}


def ladder() -> list[Kernel]:
    """Kernels in rung order (slowest, most obvious first)."""
    return sorted(KERNELS.values(), key=lambda k: k.rung)
