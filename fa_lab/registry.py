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
from fa_lab.dropout import mix_seed
from fa_lab.machine import cuda_device
from fa_lab.kernels import (backward_naive, backward_tiled, fa1, flash, int8, naive, online,
                           sage, tiled, tiled_simd)
from fa_lab.kernels.fa1 import fa1_forward
from fa_lab.kernels.flash import flash_forward
from fa_lab.kernels.backward_naive import naive_backward
from fa_lab.kernels.backward_tiled import tiled_backward
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
    dropout: bool = False


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
    dropout: bool = False  # run() takes (dropout_p, seed) after the block sizes
    default_blocks: tuple | None = None  # (Br, Bc) when not config.BLOCK_Q/BLOCK_KV
    scratch: Callable | None = None  # byte model of the kernel's own allocations
    tags: tuple = field(default_factory=tuple)
    device: str = "cpu"  # "cpu", or "cuda" (an NVIDIA GPU, or numba's CUDA simulator)
    available: Callable | None = None  # () -> why this CPU cannot run it, or None

    def unsupported(self, req: Request) -> str | None:
        """Why this kernel cannot serve ``req`` (an option name and a sentence), or None."""
        if self.device == "cuda" and cuda_device() is None:
            return (f"kernel {self.name!r} needs an NVIDIA GPU, or numba's CUDA simulator "
                    "(NUMBA_ENABLE_CUDASIM=1, or fa_lab.gpu.use_simulator() before first use)")
        missing = self.available() if self.available else None
        if missing:
            return missing
        if np.dtype(req.dtype) not in [np.dtype(t) for t in self.dtypes]:
            return f"kernel {self.name!r} does not support dtype={np.dtype(req.dtype).name}"
        for option in ("causal", "mask", "gqa", "dropout"):
            if getattr(req, option) and not getattr(self, option):
                return f"kernel {self.name!r} does not support {option}"
        if req.blocks and not self.tiled:
            return (f"kernel {self.name!r} is not tiled: block_q/block_kv are not options "
                    "of it")
        return None


def _reference_run(q, k, v, bias, scale, alignment, block_q, block_kv, dropout_p=0.0,
                   seed=0):
    out, lse = reference.attention(q, k, v, causal=alignment or False, scale=scale, mask=bias,
                                   dropout_p=dropout_p, seed=seed)
    return out.astype(q.dtype), lse.astype(q.dtype)


_NO_BIAS = {}


def _no_bias(dtype) -> np.ndarray:
    """A read-only (1, 1, 1, 1) placeholder passed when there is no mask (never read)."""
    dtype = np.dtype(dtype)
    if dtype not in _NO_BIAS:
        _NO_BIAS[dtype] = np.broadcast_to(np.zeros((), dtype), (1, 1, 1, 1))
    return _NO_BIAS[dtype]


def numba_runner(driver, dropout=False) -> Callable:
    """Adapt a jitted driver with the canonical signature (see :mod:`fa_lab.kernels`).

    With ``dropout=True`` the driver takes ``(dropout_p, seed_mixed)`` after ``lse``.
    """

    def run(q, k, v, bias, scale, alignment, block_q, block_kv, dropout_p=0.0, seed=0):
        B, H, Nq, d = q.shape
        out = np.empty_like(q)
        lse = np.empty((B, H, Nq), dtype=q.dtype)
        offset = reference.causal_offset(Nq, k.shape[2], alignment) if alignment else 0
        has_bias = bias is not None
        extra = (float(dropout_p), np.uint64(mix_seed(np.uint64(seed)))) if dropout else ()
        driver(q, k, v, bias if has_bias else _no_bias(q.dtype), has_bias,
               q.dtype.type(scale), alignment is not None, offset, block_q or 1,
               block_kv or 1, out, lse, *extra)
        return out, lse

    run.__name__ = f"run_{driver.__name__}"
    run.__doc__ = driver.__doc__
    return run


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "float64 NumPy, materializes the N x N scores (source of truth)",
               _reference_run, dropout=True, scratch=reference.scratch_bytes),
        Kernel("naive", 1, "scalar Numba, three passes over a row of scores, 1 thread",
               numba_runner(naive_forward), naive_forward, scratch=naive.scratch_bytes),
        Kernel("online", 2, "scalar Numba, one pass with running max and sum, 1 thread",
               numba_runner(online_forward), online_forward, scratch=online.scratch_bytes),
        Kernel("tiled", 3, "Br x Bc blocks, online softmax across blocks, causal block "
               "skipping; scalar, 1 thread", numba_runner(tiled_forward), tiled_forward,
               tiled=True, scratch=tiled.scratch_bytes),
        # Same rung as tiled and listed after it, so kernel="auto" (highest rung first,
        # ties in this order) never picks it: a teaching contrast, not a faster kernel.
        Kernel("fa1", 3, "FlashAttention-1's order: K/V blocks outside, Q blocks inside, "
               "O, m, l written back and O normalized every pass; scalar, 1 thread",
               numba_runner(fa1_forward), fa1_forward, tiled=True, scratch=fa1.scratch_bytes,
               tags=("teaching",)),
        Kernel("tiled_simd", 4, "tiled, inner loops vectorized by LLVM (packed FMA), "
               "prange over (b, h, query block)", numba_runner(tiled_simd_forward, dropout=True),
               tiled_simd_forward, tiled=True, parallel=True, dropout=True,
               scratch=tiled_simd.scratch_bytes),
        Kernel("flash", 5, "tiled_simd with BLAS block products (np.dot) and a vectorized "
               "polynomial exp, fused max/exp/sum pass; split-KV (Flash-Decoding) when there are "
               "too few query blocks for the threads", flash.run,
               flash_forward, tiled=True, parallel=True,
               default_blocks=flash.DEFAULT_BLOCKS, scratch=flash.scratch_bytes),
    ]
}


def _reference_backward_run(q, k, v, out, dout, lse, bias, scale, alignment, block_q,
                            block_kv, dropout_p, seed):
    grads = reference.attention_backward(q, k, v, dout, causal=alignment or False, scale=scale,
                                         mask=bias, dropout_p=dropout_p, seed=seed)
    return tuple(g.astype(q.dtype) for g in grads)


def backward_runner(driver) -> Callable:
    """Adapt a jitted backward driver (canonical signature in :mod:`fa_lab.backward`)."""

    def run(q, k, v, out, dout, lse, bias, scale, alignment, block_q, block_kv, dropout_p,
            seed):
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        offset = reference.causal_offset(q.shape[2], k.shape[2], alignment) if alignment else 0
        has_bias = bias is not None
        driver(q, k, v, out, dout, lse, bias if has_bias else _no_bias(q.dtype), has_bias,
               q.dtype.type(scale), alignment is not None, offset, block_q or 1, block_kv or 1,
               float(dropout_p), np.uint64(mix_seed(np.uint64(seed))), dq, dk, dv)
        return dq, dk, dv

    run.__name__ = f"run_{driver.__name__}"
    run.__doc__ = driver.__doc__
    return run


#: Backward kernels: ``run(q, k, v, out, dout, lse, bias, scale, alignment, block_q,
#: block_kv, dropout_p, seed) -> (dq, dk, dv)``; same :class:`Kernel` record.
BACKWARD_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "float64 NumPy, materializes P and the softmax Jacobian",
               _reference_backward_run, dropout=True),
        Kernel("naive", 1, "scalar Numba, one query row at a time, recomputes P from the "
               "LSE, float64 accumulators, 1 thread", backward_runner(naive_backward),
               naive_backward, dropout=True, scratch=backward_naive.scratch_bytes),
        Kernel("tiled", 2, "FlashAttention-2 tiles in two race-free prange passes (dK, dV "
               "over key blocks; dQ over query blocks)", backward_runner(tiled_backward),
               tiled_backward, tiled=True, parallel=True, dropout=True,
               scratch=backward_tiled.scratch_bytes),
    ]
}


def ladder() -> list[Kernel]:
    """Kernels in rung order (slowest, most obvious first)."""
    return sorted(KERNELS.values(), key=lambda k: k.rung)


def _int8_reference_run(q8, sq, k8, sk, v, bias, scale, alignment, block_q, block_kv):
    """The integer reference: the same quantized inputs, products accumulated exactly
    (float64 holds every int8 dot product exactly), then float64 attention."""
    qd = q8.astype(np.float64) * sq[..., None]
    kd = k8.astype(np.float64) * sk[..., None]
    out, lse = reference.attention(qd, kd, v, causal=alignment or False, scale=scale, mask=bias)
    return out.astype(v.dtype), lse.astype(v.dtype)


def int8_runner(driver, tiled) -> Callable:
    """Adapt an int8 driver: ``driver(q8, sq, k8, sk, v, bias, has_bias, scale, causal,
    offset, [block_q, block_kv,] out, lse)``."""

    def run(q8, sq, k8, sk, v, bias, scale, alignment, block_q, block_kv):
        B, H, Nq, d = q8.shape
        out = np.empty((B, H, Nq, d), dtype=v.dtype)
        lse = np.empty((B, H, Nq), dtype=v.dtype)
        offset = reference.causal_offset(Nq, k8.shape[2], alignment) if alignment else 0
        has_bias = bias is not None
        args = (q8, sq, k8, sk, v, bias if has_bias else _no_bias(v.dtype), has_bias,
                v.dtype.type(scale), alignment is not None, offset)
        if tiled:
            driver(*args, block_q or 1, block_kv or 1, out, lse)
        else:
            driver(*args, out, lse)
        return out, lse

    run.__name__ = f"run_{driver.__name__}"
    run.__doc__ = driver.__doc__
    return run


#: INT8 kernels (:func:`fa_lab.attention_int8`): ``run(q8, sq, k8, sk, v, bias, scale,
#: alignment, block_q, block_kv) -> (out, lse)`` with int8 ``q8``/``k8`` and per-row
#: float scales ``sq`` (B, H, Nq), ``sk`` (B, H_kv, Nk); same :class:`Kernel` record.
INT8_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "the integer reference: dequantized in float64 (exact int8 "
               "dot products), float64 attention", _int8_reference_run),
        Kernel("naive", 1, "scalar Numba, row by row, int32 dot products, float64 online "
               "softmax, 1 thread", int8_runner(int8.int8_naive_forward, False),
               int8.int8_naive_forward, scratch=int8.scratch_bytes_naive),
        Kernel("simd", 2, "tiled_simd's structure with int32 score blocks (vpmaddwd), "
               "flash's fused softmax, prange over (b, h, query block)",
               int8_runner(int8.int8_simd_forward, True), int8.int8_simd_forward,
               tiled=True, parallel=True, scratch=int8.scratch_bytes_simd),
        Kernel("sage", 3, "SageAttention-style: register-blocked micro-kernels (Q K^T with "
               "vpdpbusd or vpmaddwd, P V in bf16 with vdpbf16ps or fp32 FMAs, by CPU), "
               "flash's fused softmax, prange over (b, h, query block); float32",
               sage.run, sage.sage_forward, tiled=True, parallel=True,
               dtypes=(np.float32,), default_blocks=sage.DEFAULT_BLOCKS,
               scratch=sage.scratch_bytes, tags=("pv_dtype",), available=sage.unavailable),
    ]
}


def _cuda_fa2_run(q, k, v, bias, scale, alignment, block_q, block_kv):
    """Imports numba's CUDA target on first use only (fa_lab needs no CUDA otherwise)."""
    from fa_lab.kernels import cuda_fa2

    return cuda_fa2.run(q, k, v, bias, scale, alignment)


#: GPU kernels (``device="cuda"``): the same :class:`Kernel` record and ``run`` signature
#: as :data:`KERNELS`, reachable by name (``kernel="cuda_fa2"``) when a GPU or numba's CUDA
#: simulator is present; ``kernel="auto"`` never picks them (it searches :data:`KERNELS`).
CUDA_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("cuda_fa2", 6, "FlashAttention-2's forward as a numba.cuda kernel: a thread "
               "block per (b, h, query block), Qi, Kj, Vj tiles in shared memory, one thread "
               "per query row with m, l, acc in registers", _cuda_fa2_run,
               parallel=True, dtypes=(np.float32,), device="cuda", tags=("gpu",)),
    ]
}
