"""Compile (or load from numba's cache) every kernel for every dtype and option path, so
that no lesson, test or benchmark pays a compilation (``python -m fa_lab warmup``).

A cold cache takes minutes: :func:`warmup` reports each step as it finishes (one line
per step, or one updated line on a terminal)."""

from __future__ import annotations

import sys
import time

import numpy as np

from fa_lab.api import attention
from fa_lab.features.backward import attention_backward
from fa_lab.features.int8 import attention_int8
from fa_lab.features.kvcache import attention_with_kvcache
from fa_lab.features.retrieval import topk_attention
from fa_lab.features.varlen import attention_varlen
from fa_lab.numerics.kvquant import quantize_kv
from fa_lab.registry import (BACKWARD_KERNELS, BF16_KERNELS, INT8_KERNELS, KERNELS,
                             KVCACHE_KERNELS, VARLEN_KERNELS, Request)
from fa_lab.tools import hierarchy


def _steps(dtype):
    """``(label, thunk)`` for one dtype: every kernel table, every mask path."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 5, 3)).astype(dtype)
    kv = rng.standard_normal((1, 1, 4, 3)).astype(dtype)
    masks = [None, np.ones((5, 4), bool), np.ones((1, 2, 5, 4), bool)]
    name = np.dtype(dtype).name

    def forward_and_backward():
        for mask in masks:
            for kernel in KERNELS:
                attention(q, kv, kv, kernel=kernel, mask=mask, causal=True)
            out, lse = attention(q, kv, kv, mask=mask, return_lse=True)
            for kernel in BACKWARD_KERNELS:
                attention_backward(q, kv, kv, out, lse, out, mask=mask, kernel=kernel)

    def split_kv():  # flash's Flash-Decoding driver: one query row against 1100 keys
        q1 = rng.standard_normal((1, 1, 1, 3)).astype(dtype)
        kv1 = rng.standard_normal((1, 1, 1100, 3)).astype(dtype)
        for mask in [None, np.ones((1, 1100), bool), np.ones((1, 1, 1, 1100), bool)]:
            attention(q1, kv1, kv1, kernel="flash", mask=mask, causal="bottom_right")

    def layouts():  # a KV cache (decode runs through it) and packed varlen batches
        cache = rng.standard_normal((2, 1, 8, 3)).astype(dtype)
        for kernel, kern in KVCACHE_KERNELS.items():
            if kern.unsupported(Request(dtype=np.dtype(dtype), causal=True, gqa=True)) is None:
                attention_with_kvcache(q[:, :, :1].repeat(2, axis=0), cache, cache.copy(),
                                       cache_seqlens=5, kernel=kernel)
        if dtype == np.float32:  # int8 and int4 caches (one compilation per format)
            c4 = rng.standard_normal((2, 1, 8, 32)).astype(dtype)
            for bits in (8, 4):
                kq, ks, vq, vs = quantize_kv(c4, c4, bits=bits)
                attention_with_kvcache(c4[:, :, :1].repeat(2, axis=1), kq, vq, cache_seqlens=5,
                                       k_scale=ks, v_scale=vs)
            if KVCACHE_KERNELS["quantized_vnni"].available() is None:  # int8 queries: VNNI
                c64 = rng.standard_normal((2, 1, 8, 64)).astype(dtype)
                kq, ks, vq, vs = quantize_kv(c64, c64)
                attention_with_kvcache(c64[:, :, :1].repeat(2, axis=1), kq, vq, cache_seqlens=5,
                                       k_scale=ks, v_scale=vs, kernel="quantized_vnni")
        packed = rng.standard_normal((7, 2, 3)).astype(dtype)
        cu = np.array([0, 3, 7], np.int32)
        for kernel in VARLEN_KERNELS:
            attention_varlen(packed, packed[:, :1], packed[:, :1], cu, cu, max_seqlen_q=4,
                             max_seqlen_k=4, causal=True, kernel=kernel)

    def int8():  # the int8 inputs and per-row scales have one type per dtype
        for mask in masks:
            for kernel, kern in INT8_KERNELS.items():
                if "pv_dtype" not in kern.tags:
                    attention_int8(q, kv, kv, kernel=kernel, mask=mask, causal=True)
                elif dtype == np.float32 and kern.available() is None:  # sage, amx: by CPU
                    for pv in ("bfloat16", "float32")[:1 + ("bf16_pv" not in kern.tags)]:
                        attention_int8(q, kv, kv, kernel=kernel, mask=mask, causal=True,
                                       pv_dtype=pv)
        if dtype == np.float32 and BF16_KERNELS["amx"].available() is None:
            import ml_dtypes  # only with AMX (elsewhere LLVM cannot compile the tiles)

            for mask in masks:  # bfloat16 inputs: both products on AMX tiles
                attention(*(x.astype(ml_dtypes.bfloat16) for x in (q, kv, kv)), mask=mask)
        topk_attention(q[0, 0], kv[0, 0], k=2)  # top-K retrieval's merge

    return [(f"{name}: forward and backward kernels", forward_and_backward),
            (f"{name}: split-KV decoding", split_kv),
            (f"{name}: KV cache and varlen layouts", layouts),
            (f"{name}: INT8 kernels and top-K", int8)]


def _hierarchy():  # the memory-hierarchy micro-kernels (lesson 09)
    hierarchy.bandwidth_sweep([4096], repeats=1, target_bytes=4096)
    hierarchy.fma_peak(repeats=1, steps=10)


def warmup(progress=None) -> str:
    """Compile every kernel (module docstring); returns one line: how many, how long.
    ``progress(i, n, label, seconds)`` is called after each step (default: a line on
    stderr per step, or one updated line when stderr is a terminal)."""
    steps = _steps(np.float32) + _steps(np.float64) + [("memory-hierarchy probes", _hierarchy)]
    progress = progress or _print_progress
    t0 = time.perf_counter()
    for i, (label, step) in enumerate(steps, 1):
        step()
        progress(i, len(steps), label, time.perf_counter() - t0)
    n = (len(KERNELS) + len(BACKWARD_KERNELS) + len(INT8_KERNELS) + len(BF16_KERNELS)
         + len(KVCACHE_KERNELS) + len(VARLEN_KERNELS))
    return f"{n} kernels ready in {time.perf_counter() - t0:.1f} s"


def _print_progress(i, n, label, seconds):
    tty = sys.stderr.isatty()
    end = "\n" if (not tty or i == n) else ""
    print(f"{chr(13) if tty else ''}[warmup] {i}/{n} {label} ({seconds:.0f} s)"
          f"{' ' * 10 if tty else ''}", end=end, file=sys.stderr, flush=True)
