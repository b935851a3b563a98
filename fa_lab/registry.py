"""The kernel registry: the one list that feeds the API, the tests, the benchmarks and
the notebooks. Adding a kernel is one :class:`Kernel` entry in :data:`KERNELS`.

Every entry's ``run`` takes the canonical arguments built by :func:`fa_lab.api.prepare`::

    run(arrays, bias, scale, alignment, block_q, block_kv, *, dropout_p=0.0, seed=0,
        splits=None, stage=Stage.FULL, kv_len=None) -> outputs

    arrays: (q, k, v) for KERNELS; (q, k, v, out, dout, lse) for BACKWARD_KERNELS;
            (q8, sq, k8, sk, v) for INT8_KERNELS. q (B, H, Nq, d), k/v (B, H_kv, Nk, d):
            C-contiguous, one float dtype
    bias: None or a read-only (B, H, Nq, Nk) additive float view of the float dtype
    alignment: None, "top_left" or "bottom_right"
    block_q, block_kv: positive ints (only for kernels with ``tiled=True``)
    outputs: (out, lse) forward; (dq, dk, dv) backward

Numba kernels get there through :class:`~fa_lab.kernels.runner.Runner`, the one adapter from this call to a
jitted driver (:mod:`fa_lab.kernels` documents the drivers' signature); :func:`flex_run`
is the door to the programmable kernel (:func:`fa_lab.flex_attention`). Choosing a kernel
for a call (:func:`choose_kernel`) and its tiles (:func:`effective_blocks`) are here too;
:mod:`fa_lab.api` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fa_lab.numerics import reference
from fa_lab.settings import config
from fa_lab.settings.machine import cuda_device
from fa_lab.numerics.scoremod import NONE as NO_MODS
from fa_lab.kernels.backward import naive as backward_naive, tiled as backward_tiled
from fa_lab.kernels import flex
from fa_lab.kernels.ladder import fa1, flash, naive, online, tiled, tiled_simd
from fa_lab.kernels.lowprec import amx, int8, quantize, sage
from fa_lab.kernels.layouts import paged, quantized, varlen
from fa_lab.kernels.common import Stage, no_bias  # noqa: F401  (Stage: fa_lab.registry.Stage)
from fa_lab.kernels.ladder.flash import flash_forward, flash_splitkv_forward
from fa_lab.kernels.runner import Runner, backward_outputs


@dataclass(frozen=True)
class Request:
    """What a call needs from a kernel (built by the API, checked by :meth:`Kernel.unsupported`)."""

    dtype: np.dtype
    causal: bool = False
    mask: bool = False
    gqa: bool = False
    blocks: bool = False
    dropout: bool = False
    window: bool = False  # a sliding window (fa_lab.numerics.scoremod)
    softcap: bool = False
    alibi: bool = False
    dv: bool = False  # a value head dimension d_v != d (MLA)
    kv_format: str = "float"  # a KV cache's format: "float", "int8" or "int4"


@dataclass(frozen=True)
class Kernel:
    """One rung of the ladder and what it supports."""

    name: str
    rung: int
    summary: str
    run: Callable  # the canonical call (module docstring): a Runner, or a NumPy function
    driver: Callable | None = None  # the jitted driver, for source display and assembly
    tiled: bool = False  # accepts block_q / block_kv
    parallel: bool = False  # uses all numba threads
    dtypes: tuple = (np.float32, np.float64)
    causal: bool = True
    mask: bool = True
    gqa: bool = True
    dropout: bool = False  # run() uses dropout_p and seed
    # flash-attn's score modifiers (fa_lab.numerics.scoremod); run() then takes mods=ScoreMods
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    dv: bool = False  # v's head dimension may differ from q's and k's
    kv_formats: tuple = ("float",)  # KV-cache formats read (fa_lab.numerics.kvquant)
    # the config setting naming its (Br, Bc), read at call time; None: config.BLOCK_Q/KV
    blocks_setting: str | None = None
    scratch: Callable | None = None  # byte model of the kernel's own allocations
    tags: tuple = field(default_factory=tuple)
    device: str = "cpu"  # "cpu", or "cuda" (an NVIDIA GPU, or numba's CUDA simulator)
    available: Callable | None = None  # () -> why this CPU cannot run it, or None
    # device kernels: (q, k, v) -> a callable running on device-resident copies (timing)
    device_call: Callable | None = None

    @property
    def default_blocks(self) -> tuple | None:
        """The kernel's default tiles ``(Br, Bc)``, read from :mod:`fa_lab.settings.config`
        at every call (a lesson that changes the setting changes the kernel's tiles)."""
        return getattr(config, self.blocks_setting) if self.blocks_setting else None

    def unsupported(self, req: Request) -> str | None:
        """Why this kernel cannot serve ``req`` (an option name and a sentence), or None."""
        if self.device == "cuda" and cuda_device() is None:
            return (f"kernel {self.name!r} needs an NVIDIA GPU, or numba's CUDA simulator "
                    "(NUMBA_ENABLE_CUDASIM=1, or fa_lab.tools.gpu.use_simulator() before first use)")
        missing = self.available() if self.available else None
        if missing:
            return missing
        if np.dtype(req.dtype) not in [np.dtype(t) for t in self.dtypes]:
            return f"kernel {self.name!r} does not support dtype={np.dtype(req.dtype).name}"
        for option in ("causal", "mask", "gqa", "dropout", "window", "softcap", "alibi"):
            if getattr(req, option) and not getattr(self, option):
                return f"kernel {self.name!r} does not support {option}"
        if req.dv and not self.dv:
            return (f"kernel {self.name!r} does not support a value head dimension d_v "
                    "different from d")
        if req.kv_format not in self.kv_formats:
            return f"kernel {self.name!r} does not read a KV cache of format {req.kv_format!r}"
        if req.blocks and not self.tiled:
            return (f"kernel {self.name!r} is not tiled: block_q/block_kv are not options "
                    "of it")
        return None


def _reference_run(arrays, bias, scale, alignment, block_q=None, block_kv=None, *,
                   dropout_p=0.0, seed=0, mods=None, **_):
    q, k, v = arrays
    out, lse = reference.attention(q, k, v, causal=alignment or False, scale=scale, mask=bias,
                                   dropout_p=dropout_p, seed=seed,
                                   **(mods or NO_MODS).reference_kwargs())
    return out.astype(q.dtype), lse.astype(q.dtype)


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "float64 NumPy, materializes the N x N scores (source of truth)",
               _reference_run, dropout=True, window=True, softcap=True, alibi=True, dv=True,
               scratch=reference.scratch_bytes),
        Kernel("naive", 1, "scalar Numba, three passes over a row of scores, 1 thread",
               Runner(naive.naive_forward), naive.naive_forward, scratch=naive.scratch_bytes),
        Kernel("online", 2, "scalar Numba, one pass with running max and sum, 1 thread",
               Runner(online.online_forward), online.online_forward, scratch=online.scratch_bytes),
        Kernel("tiled", 3, "Br x Bc blocks, online softmax across blocks, causal block "
               "skipping; scalar, 1 thread", Runner(tiled.tiled_forward), tiled.tiled_forward,
               tiled=True, scratch=tiled.scratch_bytes),
        # Same rung as tiled and listed after it, so kernel="auto" (highest rung first,
        # ties in this order) never picks it: a teaching contrast, not a faster kernel.
        Kernel("fa1", 3, "FlashAttention-1's order: K/V blocks outside, Q blocks inside, "
               "O, m, l written back and O normalized every pass; scalar, 1 thread",
               Runner(fa1.fa1_forward), fa1.fa1_forward, tiled=True, scratch=fa1.scratch_bytes,
               tags=("teaching",)),
        Kernel("tiled_simd", 4, "tiled, inner loops vectorized by LLVM (packed FMA), "
               "prange over (b, h, query block)",
               Runner(tiled_simd.tiled_simd_forward, dropout="after", mods=True),
               tiled_simd.tiled_simd_forward, tiled=True, parallel=True, dropout=True,
               window=True, softcap=True, alibi=True, dv=True,
               scratch=tiled_simd.scratch_bytes),
        Kernel("flash", 5, "tiled_simd with BLAS block products (np.dot; P V optionally on "
               "fa_lab's fp32 micro-kernel, pv=) and a vectorized polynomial exp, fused "
               "max/exp/sum pass; split-KV (Flash-Decoding) when there are too few query "
               "blocks for the threads",
               Runner(flash_forward, staged=True, split_driver=flash_splitkv_forward,
                      warm=flash.ensure_blas_threads, mods=True, pv=True),
               flash_forward, tiled=True, parallel=True, window=True, softcap=True, alibi=True,
               dv=True, blocks_setting="FLASH_BLOCKS", scratch=flash.scratch_bytes,
               tags=("pv",)),
    ]
}


def _reference_backward_run(arrays, bias, scale, alignment, block_q=None, block_kv=None, *,
                            dropout_p=0.0, seed=0, mods=None, sinks=None, **_):
    q, k, v, out, dout, lse = arrays
    grads = reference.attention_backward(q, k, v, dout, causal=alignment or False, scale=scale,
                                         mask=bias, dropout_p=dropout_p, seed=seed, sinks=sinks,
                                         **(mods or NO_MODS).reference_kwargs())
    return tuple(g.astype(q.dtype) for g in grads)


#: Backward kernels: ``run((q, k, v, out, dout, lse), bias, scale, alignment, block_q,
#: block_kv, dropout_p=, seed=) -> (dq, dk, dv)``; same :class:`Kernel` record.
BACKWARD_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "float64 NumPy, materializes P and the softmax Jacobian",
               _reference_backward_run, dropout=True, window=True, softcap=True, alibi=True,
               dv=True,
               # recomputes P from the scores, so it needs the sinks themselves; the
               # jitted kernels read them from the sink-merged O and lse
               tags=("sinks",)),
        Kernel("naive", 1, "scalar Numba, one query row at a time, recomputes P from the "
               "LSE, float64 accumulators, 1 thread",
               Runner(backward_naive.naive_backward, backward_outputs, dropout="before"),
               backward_naive.naive_backward, dropout=True, scratch=backward_naive.scratch_bytes),
        Kernel("tiled", 2, "FlashAttention-2 tiles in two race-free prange passes (dK, dV "
               "over key blocks; dQ over query blocks)",
               Runner(backward_tiled.tiled_backward, backward_outputs, dropout="before",
                      mods=True),
               backward_tiled.tiled_backward, tiled=True, parallel=True, dropout=True,
               window=True, softcap=True, alibi=True, dv=True,
               scratch=backward_tiled.scratch_bytes),
    ]
}


def ladder() -> list[Kernel]:
    """Kernels in rung order (slowest, most obvious first)."""
    return sorted(KERNELS.values(), key=lambda k: k.rung)


def _int8_reference_run(arrays, bias, scale, alignment, block_q=None, block_kv=None, **_):
    out, lse = reference.attention_int8(*arrays, causal=alignment or False, scale=scale, mask=bias)
    return out.astype(arrays[-1].dtype), lse.astype(arrays[-1].dtype)


#: INT8 kernels (:func:`fa_lab.attention_int8`): ``run((q8, sq, k8, sk, v), bias, scale,
#: alignment, block_q, block_kv) -> (out, lse)`` with int8 ``q8``/``k8`` and per-row
#: float scales ``sq`` (B, H, Nq), ``sk`` (B, H_kv, Nk); same :class:`Kernel` record.
INT8_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "the integer reference: dequantized in float64 (exact int8 "
               "dot products), float64 attention", _int8_reference_run),
        Kernel("naive", 1, "scalar Numba, row by row, int32 dot products, float64 online "
               "softmax, 1 thread", Runner(int8.int8_naive_forward, keys=2, blocks=False),
               int8.int8_naive_forward, scratch=int8.scratch_bytes_naive),
        Kernel("simd", 2, "tiled_simd's structure with int32 score blocks (vpmaddwd), "
               "flash's fused softmax, prange over (b, h, query block)",
               Runner(int8.int8_simd_forward, keys=2), int8.int8_simd_forward,
               tiled=True, parallel=True, scratch=int8.scratch_bytes_simd),
        Kernel("sage", 3, "SageAttention-style: register-blocked micro-kernels (Q K^T with "
               "vpdpbusd or vpmaddwd, P V in bf16 with vdpbf16ps or fp32 FMAs, by CPU), "
               "flash's fused softmax, prange over (b, h, query block); float32",
               sage.run, sage.sage_forward, tiled=True, parallel=True,
               dtypes=(np.float32,), blocks_setting="SAGE_BLOCKS",
               scratch=sage.scratch_bytes, tags=("pv_dtype",), available=sage.unavailable),
        # bf16 P V only: kernel="auto" takes it for pv_dtype="bfloat16" (fa_lab.int8)
        Kernel("amx", 4, "Intel AMX tiles: Q K^T with tdpbssd, P V in bf16 with tdpbf16ps, "
               "the online softmax in fp32 zmm (fused with the dequantization), prange over "
               "(b, h, query block); float32, CPUs with AMX only",
               amx.run_int8, amx.amx_forward, tiled=True, parallel=True,
               dtypes=(np.float32,), blocks_setting="AMX_BLOCKS",
               scratch=amx.scratch_bytes, tags=("pv_dtype", "bf16_pv"),
               available=amx.unavailable),
    ]
}

#: bf16 kernels: both products in bf16 with fp32 softmax and accumulation, for
#: ``attention`` on ``bfloat16`` inputs (:func:`fa_lab.api.attention`); ``run((q, k, v),
#: ...)`` as :data:`KERNELS` with float32 arrays holding bf16 values.
BF16_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("amx", 1, "Intel AMX tiles: Q K^T and P V with tdpbf16ps, the online softmax "
               "in fp32 zmm, prange over (b, h, query block); CPUs with AMX only",
               amx.run_bf16, amx.amx_forward, tiled=True, parallel=True,
               dtypes=(np.float32,), blocks_setting="AMX_BLOCKS",
               scratch=amx.scratch_bytes, available=amx.unavailable),
    ]
}


@dataclass(frozen=True)
class Quantizers:
    """The compiled INT8 quantizers of :func:`fa_lab.attention_int8` (:mod:`fa_lab.numerics.quant`'s
    rules): ``mean(k, out)`` (per-channel means); ``blocks(x, rows, x8, scales, mean) ->
    (underflow, nonfinite)`` (``mean`` (R, d) subtracted first, or (0, d))."""

    mean: Callable
    blocks: Callable


INT8_QUANTIZERS = Quantizers(quantize.channel_mean, quantize.quantize_blocks)


def _cuda_fa2_run(arrays, bias, scale, alignment, block_q=None, block_kv=None, **_):
    """Imports the kernel on first use only: importing ``numba.cuda`` (the ``gpu`` extra)
    fixes whether its simulator is on (docs/ARCHITECTURE.md, exceptions)."""
    from fa_lab.kernels.gpu import cuda_fa2  # noqa: PLC0415  (documented exception)
    return cuda_fa2.run(*arrays, bias, scale, alignment)


def _cuda_fa2_device_call(q, k, v):
    """:func:`fa_lab.kernels.gpu.cuda_fa2.device_call`, imported on first use (as above)."""
    from fa_lab.kernels.gpu import cuda_fa2  # noqa: PLC0415  (documented exception)
    return cuda_fa2.device_call(q, k, v)


#: GPU kernels (``device="cuda"``): the same :class:`Kernel` record and ``run`` signature
#: as :data:`KERNELS`, reachable by name (``kernel="cuda_fa2"``) when a GPU or numba's CUDA
#: simulator is present; ``kernel="auto"`` never picks them (it searches :data:`KERNELS`).
CUDA_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("cuda_fa2", 6, "FlashAttention-2's forward as a numba.cuda kernel: a thread "
               "block per (b, h, query block), Qi, Kj, Vj tiles in shared memory, one thread "
               "per query row with m, l, acc in registers", _cuda_fa2_run,
               parallel=True, dtypes=(np.float32,), device="cuda", tags=("gpu",),
               device_call=_cuda_fa2_device_call),
    ]
}


def _varlen_reference_run(q, k, v, cu_q, cu_k, scale, alignment, block_q, block_kv,
                          mods=None):
    return reference.attention_varlen(q, k, v, cu_q, cu_k, scale=scale,
                                      causal=alignment or False, **(mods or NO_MODS).reference_kwargs())


def _varlen_flash_run(q, k, v, cu_q, cu_k, scale, alignment, block_q, block_kv, mods=None):
    flash.ensure_blas_threads()
    out, lse = np.empty(q.shape[:2] + v.shape[2:], q.dtype), np.empty(q.shape[:2], q.dtype)
    tasks = varlen.varlen_tasks(cu_q, q.shape[0], block_q)
    varlen.flash_varlen_forward(q, k, v, cu_q.astype(np.int64), cu_k.astype(np.int64), tasks,
                                no_bias(q.dtype), q.dtype.type(scale), alignment is not None,
                                alignment == "top_left", block_q, block_kv, out, lse,
                                *(mods or NO_MODS).kernel_args(q.dtype))
    return out, lse


#: Packed variable-length kernels (:func:`fa_lab.attention_varlen`): ``run(q, k, v, cu_q,
#: cu_k, scale, alignment, block_q, block_kv, mods) -> (out, lse)``, q (H, total_q, d).
VARLEN_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "float64 NumPy, one call per sequence", _varlen_reference_run,
               mask=False, window=True, softcap=True, alibi=True, dv=True),
        Kernel("flash", 5, "one prange over (sequence, head, query block) tasks of flash's "
               "tiles; no padding computed", _varlen_flash_run, varlen.flash_varlen_forward,
               tiled=True, parallel=True, mask=False, window=True, softcap=True, alibi=True,
               dv=True, blocks_setting="FLASH_BLOCKS"),
    ]
}


#: KV-cache kernels (:func:`fa_lab.attention_with_kvcache`): ``run(q, k_pages, v_pages,
#: block_table, lengths, scale, causal, block_q, block_kv, mods, splits=None, k_scale=None,
#: v_scale=None) -> (out, lse)``; a contiguous cache: pages of ``S_max`` rows,
#: ``block_table[b] = [b]``; int8 / int4 caches carry their scales (fa_lab.quantize_kv).
KVCACHE_KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("reference", 0, "gathers each sequence's pages, float64 NumPy",
               paged.reference_run, mask=False, window=True, softcap=True, alibi=True, dv=True,
               kv_formats=("float", "int8", "int4")),
        Kernel("flash", 5, "flash's tiles read in place through the block table (a tile "
               "never crosses a page), split-KV for long caches", paged.run,
               paged.paged_forward, tiled=True, parallel=True, mask=False, window=True,
               softcap=True, alibi=True, dv=True, blocks_setting="FLASH_BLOCKS"),
        # below flash, so float caches keep flash under "auto"; the one for int8 / int4
        Kernel("quantized", 4, "one task per (sequence, kv head, key split): the GQA group's "
               "rows share each cached row, dequantized in the inner loop (float32, int8, "
               "int4); split-KV", quantized.run, quantized.quantized_forward, tiled=True,
               parallel=True, mask=False, dtypes=(np.float32,), dv=True,
               kv_formats=("float", "int8", "int4"), blocks_setting="QUANTIZED_BLOCKS"),
        # by name only (queries quantized: not exact to float rounding, as the others are)
        Kernel("quantized_vnni", 3, "quantized, with each query row in int8 against the int8 "
               "keys (vpdpbusd, 64 products an instruction); one scale per token, d % 64 == 0",
               quantized.run_vnni, quantized.quantized_forward, tiled=True, parallel=True,
               mask=False, dtypes=(np.float32,), dv=True, kv_formats=("int8",),
               blocks_setting="QUANTIZED_BLOCKS", available=quantized.vnni_unavailable),
    ]
}


def flex_run(q, k, v, scale, score_mod, mask_mod, kinds, index, stored, block_q, block_kv):
    """:func:`fa_lab.kernels.flex.flex_forward`: ``(out, lse)`` (mods compiled or None)."""
    flash.ensure_blas_threads()
    out, lse = np.empty(q.shape[:3] + v.shape[3:], q.dtype), np.empty(q.shape[:3], q.dtype)
    flex.flex_forward(q, k, v, q.dtype.type(scale), score_mod or flex.identity_score,
                      score_mod is not None, mask_mod or flex.attend_all, kinds, index, stored,
                      block_q, block_kv, out, lse)
    return out, lse


def effective_blocks(Nq: int, Nk: int, block_q=None, block_kv=None,
                     defaults=None) -> tuple[int, int]:
    """The tile sizes a tiled kernel really uses: its defaults (or :mod:`fa_lab.settings.config`'s)
    where none are given, clamped to the problem (tiny inputs do not allocate big tiles)."""
    dq, dk = defaults or (config.BLOCK_Q, config.BLOCK_KV)
    return min(block_q or dq, max(Nq, 1)), min(block_kv or dk, max(Nk, 1))


def choose_kernel(kernel: str, req: Request, table=None) -> tuple[Kernel, list[str]]:
    """Resolve ``kernel`` (a registry name or ``"auto"``) for ``req`` in ``table``
    (default :data:`fa_lab.KERNELS`; :data:`fa_lab.BACKWARD_KERNELS` for gradients).

    Returns the kernel and, for ``"auto"``, the reasons why faster kernels were
    skipped. An explicit kernel that cannot serve the call raises NotImplementedError.
    """
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str (a name in fa_lab.KERNELS or 'auto'), "
                        f"got {kernel!r}")
    table = KERNELS if table is None else table
    if kernel != "auto":
        if table is KERNELS and kernel in CUDA_KERNELS:  # GPU kernels: by name only
            table = CUDA_KERNELS
        if kernel not in table:
            known = sorted(table) + (sorted(CUDA_KERNELS) if table is KERNELS else [])
            raise ValueError(f"kernel must be 'auto' or one of {known}, got {kernel!r}")
        reason = table[kernel].unsupported(req)
        if reason:
            raise NotImplementedError(reason)
        return table[kernel], []
    skipped = []
    for candidate in sorted(table.values(), key=lambda c: -c.rung):
        reason = candidate.unsupported(req)
        if reason is None:
            return candidate, skipped
        skipped.append(reason)
    raise NotImplementedError("no registered kernel supports this call: " + "; ".join(skipped))
