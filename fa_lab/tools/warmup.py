"""Compile (or load from numba's cache) every kernel for every dtype and option path, so
that no lesson, test or benchmark pays a compilation (``python -m fa_lab warmup``)."""

from __future__ import annotations

import time

import numpy as np

from fa_lab.api import attention
from fa_lab.features.backward import attention_backward
from fa_lab.features.int8 import attention_int8
from fa_lab.features.retrieval import topk_attention
from fa_lab.registry import BACKWARD_KERNELS, INT8_KERNELS, KERNELS
from fa_lab.tools import hierarchy


def warmup() -> str:
    """Compile every kernel (module docstring); returns one line: how many, how long."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        q = rng.standard_normal((1, 2, 5, 3)).astype(dtype)
        kv = rng.standard_normal((1, 1, 4, 3)).astype(dtype)
        masks = [None, np.ones((5, 4), bool), np.ones((1, 2, 5, 4), bool)]
        for mask in masks:
            for name in KERNELS:
                attention(q, kv, kv, kernel=name, mask=mask, causal=True)
            out, lse = attention(q, kv, kv, mask=mask, return_lse=True)
            for name in BACKWARD_KERNELS:
                attention_backward(q, kv, kv, out, lse, out, mask=mask, kernel=name)
        # flash's split-KV (Flash-Decoding) driver: one query row against 1100 keys
        q1 = rng.standard_normal((1, 1, 1, 3)).astype(dtype)
        kv1 = rng.standard_normal((1, 1, 1100, 3)).astype(dtype)
        for mask in [None, np.ones((1, 1100), bool), np.ones((1, 1, 1, 1100), bool)]:
            attention(q1, kv1, kv1, kernel="flash", mask=mask, causal="bottom_right")
        # INT8 kernels (the int8 inputs and per-row scales have one type per dtype)
        for mask in masks:
            for name, kern in INT8_KERNELS.items():
                if "pv_dtype" not in kern.tags:
                    attention_int8(q, kv, kv, kernel=name, mask=mask, causal=True)
                elif dtype == np.float32 and kern.available() is None:  # sage: fp32, AVX-512
                    for pv in ("float32", "bfloat16"):
                        attention_int8(q, kv, kv, kernel=name, mask=mask, causal=True,
                                       pv_dtype=pv)
        # top-K retrieval's merge (one type per dtype)
        topk_attention(q[0, 0], kv[0, 0], k=2)
    # the memory-hierarchy micro-kernels (lesson 09)
    hierarchy.bandwidth_sweep([4096], repeats=1, target_bytes=4096)
    hierarchy.fma_peak(repeats=1, steps=10)

    n = len(KERNELS) + len(BACKWARD_KERNELS) + len(INT8_KERNELS)
    return f"{n} kernels ready in {time.perf_counter() - t0:.1f} s"
