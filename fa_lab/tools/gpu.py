"""The GPU rung (lesson 12): where it can run, the simulator switch, and its benchmark.

``fa_lab.attention(..., kernel="cuda_fa2")`` runs FlashAttention-2's forward written with
``numba.cuda`` (:mod:`fa_lab.kernels.gpu.cuda_fa2`). It needs either an NVIDIA GPU (with
numba-cuda's driver bindings) or numba's **CUDA simulator**, which runs every thread of
every block as a Python thread on the CPU: correct, checkable on any machine, and far
too slow to time (small shapes only).

* :func:`status` says which of the two is present, without importing numba's CUDA target.
* :func:`use_simulator` switches the simulator on (it must run before anything imports
  ``numba.cuda``; ``NUMBA_ENABLE_CUDASIM=1`` in the environment does the same).
* :func:`benchmark` times the kernel against torch SDPA on the GPU, validated first,
  when there is a GPU; on a CPU machine it returns one row saying so, measuring nothing.
* :func:`shared_memory_budget` and :func:`occupancy` are the lesson's budget arithmetic.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from fa_lab.tools import bench
from fa_lab.numerics import reference
from fa_lab.api import attention
from fa_lab.registry import CUDA_KERNELS
from fa_lab.settings.machine import cuda_device

#: Shared memory a thread block may use, per current NVIDIA GPU generation (KiB): the
#: static limit every GPU has, and the opt-in maximum per block / per SM.
SHARED_KIB = {"static limit (all GPUs)": 48, "Ampere A100 (per SM)": 164,
              "Hopper H100 (per SM)": 228}


def status() -> dict:
    """``{"device": "gpu" | "simulator" | None, "note": ...}``."""
    dev = cuda_device()
    note = {"gpu": "an NVIDIA GPU is present: kernels run and are timed on it",
            "simulator": "numba's CUDA simulator: kernels run on the CPU, one Python thread "
                         "per GPU thread; correctness only, no timing",
            None: "no NVIDIA GPU and the simulator is off: the GPU kernel cannot run here"}[dev]
    return {"device": dev, "note": note}


def use_simulator() -> None:
    """Switch numba's CUDA simulator on for this process (before ``numba.cuda`` loads)."""
    if "numba.cuda" in sys.modules and cuda_device() != "simulator":
        raise RuntimeError("numba.cuda was already imported without the simulator; set "
                           "NUMBA_ENABLE_CUDASIM=1 before starting Python instead")
    import numba

    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    numba.core.config.ENABLE_CUDASIM = 1  # numba read the environment at its import


def shared_memory_budget(block_q: int, block_kv: int, d: int, itemsize: int = 4) -> dict:
    """Bytes of shared memory per thread block: the ``Qi`` tile and the ``Kj``, ``Vj``
    tiles (the kernel's layout: ``(Br + 2 Bc) x d``)."""
    q_tile, kv_tiles = block_q * d * itemsize, 2 * block_kv * d * itemsize
    return {"Qi": q_tile, "Kj + Vj": kv_tiles, "total": q_tile + kv_tiles}


def occupancy(block_threads: int, shared_bytes: int, *, sm_shared_kib=228, max_threads=2048,
              max_blocks=32) -> dict:
    """Blocks resident per SM, limited by shared memory, threads and the block cap, and
    the warps they keep busy (a budget: more resident warps hide more memory latency)."""
    by_shared = (sm_shared_kib * 1024) // max(shared_bytes, 1)
    by_threads = max_threads // block_threads
    blocks = int(min(by_shared, by_threads, max_blocks))
    limit = min((by_shared, "shared memory"), (by_threads, "threads"), (max_blocks, "block cap"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * -(-block_threads // 32),
            "max_warps": max_threads // 32, "limited_by": limit[1]}


def benchmark(shapes, *, repeats=10):
    """On a GPU: ``cuda_fa2`` against torch SDPA on CUDA (when a CUDA torch is installed),
    validated against the float64 reference first; median ms, GFLOP/s and achieved GB/s
    (Q, K, V read and O written once). Without a GPU: one row saying so."""
    import pandas as pd

    if cuda_device() != "gpu":
        return pd.DataFrame([{"contender": "cuda_fa2", "measured": False,
                              "note": status()["note"]}])
    rows = []
    for (B, H, N, d) in shapes:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
        expected, _ = reference.attention(q, k, v)
        got = attention(q, k, v, kernel="cuda_fa2")
        err = float(np.abs(got - expected).max())
        fns = {"cuda_fa2": CUDA_KERNELS["cuda_fa2"].device_call(q, k, v)}
        try:
            import torch

            if torch.cuda.is_available():
                tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
                fns["torch_sdpa (cuda)"] = lambda: (
                    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
                    torch.cuda.synchronize())
        except ImportError:
            pass
        flops, nbytes = 4.0 * B * H * N * N * d, 4.0 * 4 * B * H * N * d
        cs = [bench.Contender(name, fn, "kernel") for name, fn in fns.items()]
        times = bench.time_calls(cs, (), repeats=repeats, warmup=1, cooldown=0)
        for c in cs:
            row = times.summary(c.name, flops)
            rows.append({"contender": c.name, "measured": True, "B": B, "H": H, "N": N, "d": d,
                         "median_ms": row["median_s"] * 1e3, "gbps": nbytes / row["median_s"] / 1e9,
                         "max_error": err, "note": "validated against the float64 reference",
                         **row})
    return pd.DataFrame(rows)


__all__ = ["status", "use_simulator", "shared_memory_budget", "occupancy", "benchmark",
           "SHARED_KIB"]
