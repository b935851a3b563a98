"""Sweeps over kernels, shapes, tiles, threads and key splits, each validated against the
float64 reference first and timed by :func:`fa_lab.tools.bench.harness.time_calls`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pandas as pd

from fa_lab.numerics import reference
from fa_lab.api import attention, prepare
from fa_lab.tools.bench.contenders import contenders
from fa_lab.tools.bench.harness import (TIMING_APART, TIMING_INTERLEAVED, Contender, flops,
                                        time_apart, time_calls, validate)
from fa_lab.settings.config import num_threads
from fa_lab.kernels.probes.tiles import blas_tiles
from fa_lab.settings.machine import machine
from fa_lab.registry import KERNELS
from fa_lab.numerics.testing import Case, assert_close


def run(kernels=None, shapes=None, *, causal=False, dtype=np.float32, repeats=5,
        block_q=None, block_kv=None, baseline="numpy_standard", with_baselines=True,
        seed=0, progress=None):
    """Benchmark ``kernels`` (registry names) on ``shapes``; returns a pandas DataFrame.

    ``shapes`` is a list of :class:`fa_lab.numerics.testing.Case` or ``(B, H, Nq, Nk, d)``
    tuples. One row per (shape, contender): median and quartiles of seconds,
    GFLOP/s, ratio of the baseline's median time to this one's (>1 = faster than the
    baseline), the validation error, and the machine.
    """
    kernels = list(kernels or [k for k in KERNELS if k != "reference"])
    shapes = shapes or [Case(B=1, H=8, Nq=1024, d=64)]
    info = machine()
    rows = []
    for shape in shapes:
        if not isinstance(shape, Case):
            B, H, Nq, Nk, d = shape
            shape = Case(B=B, H=H, Nq=Nq, Nk=Nk, d=d)
        q, k, v = shape.inputs(dtype=dtype, seed=seed)
        cs = contenders(kernels, causal=causal, block_q=block_q, block_kv=block_kv,
                        with_baselines=with_baselines)
        errors = {}
        for c in cs:
            if progress:
                progress(f"validate {c.name} on {shape.id}")
            errors[c.name] = validate(c, q, k, v, causal)["max_error"]
        if progress:
            progress(f"time {len(cs)} contenders x {repeats} rounds on {shape.id}")
        times = time_calls(cs, (q, k, v), repeats=repeats, warmup=0)
        nk = shape.Nk if shape.Nk is not None else shape.Nq
        f = flops(shape.B, shape.H, shape.Nq, nk, shape.d, causal)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for c in cs:
            rows.append({
                "name": c.name, "kind": c.kind, "B": shape.B, "H": shape.H,
                "Nq": shape.Nq, "Nk": nk, "d": shape.d, "causal": causal,
                "dtype": np.dtype(dtype).name, **times.summary(c.name, f),
                f"speedup_vs_{baseline}": (medians[baseline] / medians[c.name]
                                           if baseline in medians else float("nan")),
                "max_error": errors[c.name], "timing": TIMING_INTERLEAVED,
                **{f"machine_{k}": v for k, v in info.items()},
            })
    return pd.DataFrame(rows)


def sweep_blocks(kernel, case: Case, blocks_q, blocks_kv, *, causal=False,
                 dtype=np.float32, repeats=3, seed=0):
    """Time ``kernel`` for every (block_q, block_kv); each combination validated first.

    Returns a DataFrame with one row per combination (interleaved rounds).
    """
    if not KERNELS[kernel].tiled:
        raise ValueError(f"kernel: {kernel!r} is not tiled; block sizes do not apply")
    q, k, v = case.inputs(dtype=dtype, seed=seed)
    expected, _ = reference.attention(q, k, v, causal=causal)
    baseline, _ = reference.attention(q, k, v, causal=causal, dtype=np.dtype(dtype).type)
    cs = []
    for bq in blocks_q:
        for bk in blocks_kv:
            c = Contender(f"{bq}x{bk}", lambda q, k, v, _b=(bq, bk): attention(
                q, k, v, causal=causal, kernel=kernel, block_q=_b[0], block_kv=_b[1]),
                "kernel")
            assert_close(c.fn(q, k, v), expected, baseline=baseline, what=f"{kernel} {c.name}",
                         magnitude=np.abs(v).max())
            cs.append((bq, bk, c))
    times = time_calls([c for *_, c in cs], (q, k, v), repeats=repeats, warmup=0)
    nk = case.Nk if case.Nk is not None else case.Nq
    f = flops(case.B, case.H, case.Nq, nk, case.d, causal)
    return pd.DataFrame([{"kernel": kernel, "block_q": bq, "block_kv": bk,
                          **times.summary(c.name, f)} for bq, bk, c in cs])


def thread_scaling(kernel, case: Case, threads=None, *, causal=False, dtype=np.float32,
                   repeats=3, seed=0):
    """Time ``kernel`` with 1..all numba threads, or the given counts (interleaved, in
    that order); ``speedup_vs_1`` is relative to the 1-thread row (added if missing)."""
    threads = list(threads or range(1, numba.config.NUMBA_NUM_THREADS + 1))
    if 1 not in threads:
        threads.insert(0, 1)
    q, k, v = case.inputs(dtype=dtype, seed=seed)
    before = num_threads()

    def with_threads(t):
        def fn(q, k, v):
            numba.set_num_threads(t)
            return attention(q, k, v, causal=causal, kernel=kernel)
        return Contender(f"{t}", fn, "kernel")

    cs = [with_threads(t) for t in threads]
    try:
        validate(cs[-1], q, k, v, causal)
        times = time_calls(cs, (q, k, v), repeats=repeats, warmup=1)
    finally:
        numba.set_num_threads(before)
    nk = case.Nk if case.Nk is not None else case.Nq
    f = flops(case.B, case.H, case.Nq, nk, case.d, causal)
    df = pd.DataFrame([{"kernel": kernel, "threads": t, **times.summary(str(t), f)}
                       for t in threads])
    df["speedup_vs_1"] = df.loc[df["threads"] == 1, "median_s"].iloc[0] / df["median_s"]
    ranges = [times.ratio("1", str(t)) for t in threads]
    df["speedup_low"], df["speedup_high"] = [r[0] for r in ranges], [r[2] for r in ranges]
    return df


def matmul_peak(n=2048, *, repeats=5, dtype=np.float32, block=256):
    """The machine's measured float32 matrix-product throughput, two ways, same run:

    * ``numpy_matmul``: ``A @ A`` for an ``n x n`` matrix, NumPy's BLAS with its threads;
    * ``blas_tiles_per_thread``: what the ``flash`` kernel's block products get, one
      ``block x block`` gemm per ``prange`` iteration through SciPy's BLAS limited to one
      thread (:func:`fa_lab.kernels.probes.tiles.blas_tiles`).

    Returns a DataFrame with GFLOP/s (``2 n^3`` per product); the peak used for the
    roofline is the larger of the two.
    """
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    tiles = max(64, 4 * num_threads())
    x = np.random.default_rng(1).standard_normal((block, block)).astype(dtype)
    cs = [Contender("numpy_matmul", lambda: a @ a, "baseline"),
          Contender("blas_tiles_per_thread", lambda: blas_tiles(x, tiles), "kernel")]
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    work = {"numpy_matmul": 2.0 * n ** 3, "blas_tiles_per_thread": 2.0 * block ** 3 * tiles}
    return pd.DataFrame([{"name": c.name, "shape": f"{n}x{n}" if c.name == "numpy_matmul"
                          else f"{tiles} x ({block}x{block})",
                          **times.summary(c.name, work[c.name]),
                          **{f"machine_{k}": v for k, v in machine().items()}} for c in cs])


def decode_splits(B=1, H=8, H_kv=None, Nk=4096, d=64, splits=(1, 2, 4, 8), *,
                  dtype=np.float32, repeats=20, seed=0, with_torch=True):
    """Decode (``Nq = 1``, bottom-right causal) with the ``flash`` kernel forced to each
    number of key splits (Flash-Decoding), torch SDPA beside it (timed in its own rounds,
    :func:`~fa_lab.tools.bench.harness.time_apart`); validated first.

    Returns one row per contender: median ms, spread, and ``auto_splits`` (what
    ``plan()`` picks for this shape).
    """
    H_kv = H_kv or H
    case = Case(B=B, H=H, Nq=1, Nk=Nk, d=d, H_kv=H_kv)
    q, k, v = case.inputs(dtype=dtype, seed=seed)
    call = prepare(q, k, v, causal="bottom_right")
    cs = []
    for s in splits:
        c = Contender(f"flash, {s} split{'s' if s > 1 else ''}", lambda q, k, v, _s=s: call.run(
            "flash", splits=_s)[0], "kernel")
        validate(c, q, k, v, "bottom_right")
        cs.append(c)
    if with_torch:
        cs += [c for c in contenders([], causal="bottom_right", with_baselines=True)
               if c.name == "torch_sdpa"]
        for c in cs[len(splits):]:
            validate(c, q, k, v, "bottom_right")
    # Back to back, as in a decoding loop: after a pause, the first call pays the wake-up
    # of sleeping threads (4-12 ms here, 20-50x a decode step; see REWARM_BELOW_S). torch
    # in its own rounds, after fa_lab's: its spinning threads would slow the next call.
    times = time_apart(cs, (q, k, v), repeats=repeats, warmup=2, cooldown=0)
    auto = call.plan()["splits"]  # what kernel="auto" runs (measured splits where tuned)
    rows = []
    for c in cs:
        rows.append({"name": c.name, "B": B, "H": H, "H_kv": H_kv, "Nk": Nk, "d": d,
                     "auto_splits": auto, **times.ms(c.name), "timing": TIMING_APART})
    return pd.DataFrame(rows)


def run_with_env(env: dict, args: list[str], csv: Path, timeout=1800):
    """Run ``python -m fa_lab <args> --csv csv`` in a fresh process with extra
    environment variables (e.g. ``OPENBLAS_CORETYPE``, read only when BLAS loads);
    returns the table it wrote."""
    full = {**os.environ, **{k: str(v) for k, v in env.items()}}
    done = subprocess.run([sys.executable, "-m", "fa_lab", *args, "--csv", str(csv)],
                          env=full, timeout=timeout, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m fa_lab {' '.join(args)} failed with {env}: "
                           f"{done.stderr[-2000:]}")
    return pd.read_csv(csv)

