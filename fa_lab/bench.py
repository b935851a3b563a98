"""Benchmarks: validate first, then time kernels side by side, interleaved.

Rules (house style, rule 8): every kernel is checked against the reference once on
the benchmarked shape (that call also compiles it), then all kernels are timed in
rounds, one call each per round, so drift on a noisy VM hits all of them alike. Each
timed call follows an untimed pause (:data:`fa_lab.config.BENCH_COOLDOWN_S`): without
it, whatever ran right after NumPy's multi-threaded BLAS was measured up to 2x slow. We
report the median and the spread (25th-75th percentile) over rounds, GFLOP/s from an
explicit FLOP count, the ratio to a chosen baseline, and the machine in every row.

FLOP count: ``4 * B * H * Nq * Nk * d`` (two matrix products of ``2 N^2 d``), halved
for causal (the convention of FlashAttention's and Triton's benchmarks). The softmax's
exponentials are not counted.

Baselines that are not kernels of the registry: ``numpy_standard`` (float32 NumPy
materializing the scores, the textbook implementation) and ``torch_sdpa``
(``torch.nn.functional.scaled_dot_product_attention``) when torch is installed.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fa_lab import reference, verdict
from fa_lab.api import attention
from fa_lab.machine import Load, LoadMonitor, describe_machine, machine
from fa_lab.registry import KERNELS
from fa_lab.testing import Case, assert_close


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def flops(B, H, Nq, Nk, d, causal=False) -> float:
    """``4 B H Nq Nk d``, halved when causal."""
    f = 4.0 * B * H * Nq * Nk * d
    return f / 2 if causal else f


@dataclass
class Contender:
    """Something to time: a registry kernel or a baseline, as ``fn(q, k, v) -> out``."""

    name: str
    fn: object
    kind: str  # "kernel" or "baseline"


def contenders(names, *, causal=False, block_q=None, block_kv=None,
               with_baselines=True) -> list[Contender]:
    """Registry kernels by name (plus the NumPy and torch baselines)."""
    out = []
    for name in names:
        if name not in KERNELS:
            raise ValueError(f"kernels: unknown kernel {name!r}; known: {sorted(KERNELS)}")
        kw = {"block_q": block_q, "block_kv": block_kv} if KERNELS[name].tiled else {}
        out.append(Contender(name, lambda q, k, v, _n=name, _kw=kw: attention(
            q, k, v, causal=causal, kernel=_n, **_kw), "kernel"))
    if with_baselines:
        out.append(Contender("numpy_standard", lambda q, k, v: reference.attention(
            q, k, v, causal=causal, dtype=np.float32)[0], "baseline"))
        torch = _torch()
        if torch is not None:
            F = torch.nn.functional

            alignment = reference.causal_alignment(causal)

            def sdpa(q, k, v):
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
                gqa = tq.shape[-3] != tk.shape[-3]
                Nq, Nk = q.shape[-2], k.shape[-2]
                mask, is_causal = None, alignment is not None
                if alignment == "bottom_right" and Nq != Nk:
                    # torch's is_causal is top-left; bottom-right needs a mask (none
                    # at all for one query row, which sees every key).
                    is_causal = False
                    if Nq > 1:
                        mask = torch.from_numpy(reference.causal_mask(Nq, Nk, alignment))
                with torch.no_grad():
                    o = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask,
                                                       is_causal=is_causal, enable_gqa=gqa)
                return o.numpy()

            out.append(Contender("torch_sdpa", sdpa, "baseline"))
    return out


#: After the cooldown pause, contenders faster than this get one untimed call first.
#: Measured here: the first multi-threaded call after 0.1 s idle costs 4-12 ms more (the
#: sleeping threads of numba's OpenMP pool, or torch's, wake up; on this VM that is
#: slow): decode calls of ~0.2 ms read as 7-12 ms. Back-to-back calls (a decode loop,
#: consecutive layers) do not pay it, so the timed call follows a warm one.
REWARM_BELOW_S = 0.25


class Timings(dict):
    """``{name: [seconds, ...]}`` from :func:`time_calls`, with ``load``: the machine's
    :class:`fa_lab.machine.Load` during the timed rounds."""

    load: Load | None = None

    def summary(self, name: str, work: float | None = None) -> dict:
        """Median and quartiles (seconds) of one contender, GFLOP/s from ``work`` FLOPs,
        and the load columns: the one summary every benchmark row uses."""
        q25, med, q75 = verdict.quartiles(self[name])
        row = {"median_s": med, "q25_s": q25, "q75_s": q75, "repeats": len(self[name])}
        if work is not None:
            row["gflops"] = work / med / 1e9
        if self.load is not None:
            row.update(self.load.columns())
        return row

    def ratio(self, slow: str, fast: str) -> tuple[float, float, float]:
        """``(low, median ratio, high)`` of ``slow``'s time over ``fast``'s (a speedup)."""
        return verdict.ratio_range(self[slow], self[fast])


def time_calls(contenders_, args, *, repeats=5, warmup=1, min_time=0.0, cooldown=None):
    """Interleaved timing: ``repeats`` rounds, each calls every contender once.

    Returns :class:`Timings` (``{name: [seconds, ...]}`` plus the load of the window). ``min_time`` adds rounds until each contender
    has run at least that long in total (for tiny problems). Each timed call is preceded
    by an untimed pause of ``cooldown`` seconds (default
    :data:`fa_lab.config.BENCH_COOLDOWN_S`) so that one contender's spinning thread
    pool (NumPy's OpenBLAS) does not slow the next one, and, for contenders whose last
    call took under :data:`REWARM_BELOW_S`, by one untimed call that wakes its threads.
    """
    from fa_lab.config import BENCH_COOLDOWN_S

    cooldown = BENCH_COOLDOWN_S if cooldown is None else cooldown
    # Always settle once first: validation just ran NumPy's multi-threaded BLAS, whose
    # spinning threads would slow the first ~100 ms of rounds (a whole decode benchmark).
    time.sleep(BENCH_COOLDOWN_S)
    for c in contenders_:
        for _ in range(warmup):
            c.fn(*args)
    times = Timings({c.name: [] for c in contenders_})
    rounds = 0
    with LoadMonitor() as monitor:
        while rounds < repeats or min(sum(t) for t in times.values()) < min_time:
            for c in contenders_:
                if cooldown:
                    time.sleep(cooldown)
                    last = times[c.name][-1] if times[c.name] else 0.0
                    if last < REWARM_BELOW_S:  # wake this contender's threads, untimed
                        c.fn(*args)
                t0 = time.perf_counter()
                c.fn(*args)
                times[c.name].append(time.perf_counter() - t0)
            rounds += 1
            if rounds >= 50 * max(repeats, 1):
                break
    times.load = monitor.load
    return times


def validate(contender: Contender, q, k, v, causal=False) -> dict:
    """Check one contender against the float64 reference on the benchmark's own inputs."""
    expected, _ = reference.attention(q, k, v, causal=causal)
    baseline, _ = reference.attention(q, k, v, causal=causal, dtype=q.dtype.type)
    return assert_close(contender.fn(q, k, v), expected, baseline=baseline,
                        what=contender.name, magnitude=np.abs(v).max())


def run(kernels=None, shapes=None, *, causal=False, dtype=np.float32, repeats=5,
        block_q=None, block_kv=None, baseline="numpy_standard", with_baselines=True,
        seed=0, progress=None):
    """Benchmark ``kernels`` (registry names) on ``shapes``; returns a pandas DataFrame.

    ``shapes`` is a list of :class:`fa_lab.testing.Case` or ``(B, H, Nq, Nk, d)``
    tuples. One row per (shape, contender): median and quartiles of seconds,
    GFLOP/s, ratio of the baseline's median time to this one's (>1 = faster than the
    baseline), the validation error, and the machine.
    """
    import pandas as pd

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
                "max_error": errors[c.name], **{f"machine_{k}": v for k, v in info.items()},
            })
    return pd.DataFrame(rows)


def plot_ladder(df, path=None, title="Kernel ladder"):
    """Bar chart of median time per contender (log scale) with the quartile spread."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 1.35 * len(df)), 4.2))
    colors = ["tab:blue" if k == "kernel" else "tab:gray" for k in df["kind"]]
    med = df["median_s"] * 1e3
    err = np.vstack([med - df["q25_s"] * 1e3, df["q75_s"] * 1e3 - med])
    ax.bar(df["name"], med, yerr=err, color=colors, capsize=3)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    for x, (m, top, g) in enumerate(zip(med, df["q75_s"] * 1e3, df["gflops"])):
        ax.annotate(f"{m:.3g} ms\n{g:.3g} GFLOP/s", (x, max(m, top)), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 3), textcoords="offset points")
    r = df.iloc[0]
    ax.set_title(f"{title}: B={r['B']}, H={r['H']}, Nq={r['Nq']}, Nk={r['Nk']}, d={r['d']}, "
                 f"{r['dtype']}{', causal' if r['causal'] else ''}", fontsize=10)
    ax.margins(y=0.25)
    fig.tight_layout()
    if path:
        from fa_lab.viz import footer

        footer(fig, describe_machine())
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def sweep_blocks(kernel, case: Case, blocks_q, blocks_kv, *, causal=False,
                 dtype=np.float32, repeats=3, seed=0):
    """Time ``kernel`` for every (block_q, block_kv); each combination validated first.

    Returns a DataFrame with one row per combination (interleaved rounds).
    """
    import pandas as pd

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
    """Time ``kernel`` with 1..all numba threads (interleaved); speedup vs 1 thread."""
    import numba
    import pandas as pd

    threads = list(threads or range(1, numba.config.NUMBA_NUM_THREADS + 1))
    q, k, v = case.inputs(dtype=dtype, seed=seed)
    before = numba.get_num_threads()

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
    df["speedup_vs_1"] = df["median_s"].iloc[0] / df["median_s"]
    ranges = [times.ratio(str(threads[0]), str(t)) for t in threads]
    df["speedup_low"], df["speedup_high"] = [r[0] for r in ranges], [r[2] for r in ranges]
    return df


def backward_vs_forward(cases, *, forward="tiled_simd", backward="tiled", causal=False,
                        dtype=np.float32, repeats=5, seed=0):
    """Time a forward kernel and a backward kernel side by side (validated first).

    Returns one row per case: medians, the measured time ratio, and the FLOP ratio of
    the backward as implemented (7 block products for ``tiled``: 3.5x the forward's 2)
    next to FlashAttention-2's 2.5x (5 products).
    """
    import pandas as pd

    from fa_lab.backward import attention_backward

    rows = []
    for case in cases:
        q, k, v = case.inputs(dtype=dtype, seed=seed)
        dout = np.random.default_rng(seed + 1).standard_normal(q.shape).astype(dtype)
        out, lse = attention(q, k, v, causal=causal, kernel=forward, return_lse=True)
        exp = reference.attention_backward(q, k, v, dout, causal=causal)
        base = reference.attention_backward(q, k, v, dout, causal=causal,
                                            dtype=np.dtype(dtype).type)
        grads = attention_backward(q, k, v, out, lse, dout, causal=causal, kernel=backward)
        errors = {}
        for name, g, e, b in zip(("dq", "dk", "dv"), grads, exp, base):
            errors[name] = assert_close(g, e, baseline=b, rule="float32_grad",
                                        what=f"{backward} {name}")
        cs = [Contender("forward", lambda q, k, v: attention(
                  q, k, v, causal=causal, kernel=forward, return_lse=True), "kernel"),
              Contender("backward", lambda q, k, v: attention_backward(
                  q, k, v, out, lse, dout, causal=causal, kernel=backward), "kernel")]
        times = time_calls(cs, (q, k, v), repeats=repeats, warmup=0)
        fwd, bwd = (statistics.median(times[c.name]) for c in cs)
        low, _, high = times.ratio("backward", "forward")
        nk = case.Nk if case.Nk is not None else case.Nq
        f = flops(case.B, case.H, case.Nq, nk, case.d, causal)
        rows.append({"B": case.B, "H": case.H, "N": case.Nq, "d": case.d, "causal": causal,
                     "forward_kernel": forward, "backward_kernel": backward,
                     "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "ratio": bwd / fwd,
                     "ratio_low": low, "ratio_high": high, **times.load.columns(),
                     "flop_ratio_as_implemented": 3.5, "flop_ratio_fa2": 2.5,
                     "forward_gflops": f / fwd / 1e9, "backward_gflops": 3.5 * f / bwd / 1e9,
                     **{f"{n}_max_error": e["max_error"] for n, e in errors.items()},
                     **{f"{n}_allowed": e["allowed"] for n, e in errors.items()}})
    return pd.DataFrame(rows)


def matmul_peak(n=2048, *, repeats=5, dtype=np.float32, block=256):
    """The machine's measured float32 matrix-product throughput, two ways, same run:

    * ``numpy_matmul``: ``A @ A`` for an ``n x n`` matrix, NumPy's BLAS with its threads;
    * ``blas_tiles_per_thread``: what the ``flash`` kernel's block products get, one
      ``block x block`` gemm per ``prange`` iteration through SciPy's BLAS limited to one
      thread (:func:`fa_lab.kernels.flash.tile_gemm_gflops`).

    Returns a DataFrame with GFLOP/s (``2 n^3`` per product); the peak used for the
    roofline is the larger of the two.
    """
    import pandas as pd

    from fa_lab.kernels import flash

    flash.ensure_blas_threads()
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    from fa_lab.config import num_threads

    tiles = max(64, 4 * num_threads())
    x = np.random.default_rng(1).standard_normal((block, block)).astype(dtype)
    cs = [Contender("numpy_matmul", lambda: a @ a, "baseline"),
          Contender("blas_tiles_per_thread", lambda: flash.tile_gemms(x, tiles), "kernel")]
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    work = {"numpy_matmul": 2.0 * n ** 3, "blas_tiles_per_thread": 2.0 * block ** 3 * tiles}
    return pd.DataFrame([{"name": c.name, "shape": f"{n}x{n}" if c.name == "numpy_matmul"
                          else f"{tiles} x ({block}x{block})",
                          **times.summary(c.name, work[c.name]),
                          **{f"machine_{k}": v for k, v in machine().items()}} for c in cs])


#: The four parts of :func:`breakdown`, in the order the kernel runs them.
BREAKDOWN_PARTS = ("loop, Q scaling, epilogue", "S = Q K^T (BLAS)", "softmax (max, exp, sum)",
                   "P V (BLAS) + rescale")


def breakdown(case: Case, *, causal=False, dtype=np.float32, repeats=5, block_q=None,
              block_kv=None, seed=0):
    """Where the ``flash`` kernel's time goes: the same driver stopped after each stage.

    Stage 0 runs only the loops (plus Q scaling and the epilogue), stage 1 adds
    ``S = Qi Kj^T``, stage 2 the softmax, stage 3 ``P Vj`` and the rescale (the whole
    kernel, validated first). Part times are differences of interleaved medians, so
    they carry the noise of two measurements (a small negative part means "lost in
    the noise"). Returns one row per part with ms and the share of the total.
    """
    import pandas as pd

    from fa_lab.api import _prepare, effective_blocks
    from fa_lab.kernels import flash

    q, k, v = case.inputs(dtype=dtype, seed=seed)
    validate(Contender("flash", lambda q, k, v: attention(
        q, k, v, causal=causal, kernel="flash", block_q=block_q, block_kv=block_kv), "kernel"),
        q, k, v, causal)
    call = _prepare(q, k, v, causal, None, None, block_q, block_kv, 0.0, None)
    bq, bk = effective_blocks(call.Nq, call.Nk, block_q, block_kv, flash.DEFAULT_BLOCKS)
    cs = [Contender(f"stage{s}", lambda q, k, v, _s=s: flash.run(
        call.q4, call.k4, call.v4, None, call.scale, call.alignment, bq, bk, splits=1,
        stage=_s), "kernel") for s in range(4)]
    # Back to back (no cooldown): only fa_lab's own threads run here, and a pause would
    # put them to sleep, adding their wake-up (ms on this VM) to the short stages.
    times = time_calls(cs, (q, k, v), repeats=repeats, warmup=1, cooldown=0)
    med = [statistics.median(times[f"stage{s}"]) for s in range(4)]
    parts = [med[0], med[1] - med[0], med[2] - med[1], med[3] - med[2]]
    nk = case.Nk if case.Nk is not None else case.Nq
    f = flops(case.B, case.H, case.Nq, nk, case.d, causal)
    return pd.DataFrame([{"part": name, "ms": p * 1e3, "share": p / med[3],
                          "B": case.B, "H": case.H, "Nq": case.Nq, "Nk": nk, "d": case.d,
                          "causal": causal, "block_q": bq, "block_kv": bk,
                          "total_ms": med[3] * 1e3, "total_gflops": f / med[3] / 1e9,
                          **times.load.columns()}
                         for name, p in zip(BREAKDOWN_PARTS, parts)])


def decode_splits(B=1, H=8, H_kv=None, Nk=4096, d=64, splits=(1, 2, 4, 8), *,
                  dtype=np.float32, repeats=20, seed=0, with_torch=True):
    """Decode (``Nq = 1``, bottom-right causal) with the ``flash`` kernel forced to each
    number of key splits (Flash-Decoding), torch SDPA beside it; validated first.

    Returns one row per contender: median ms, spread, and ``auto_splits`` (what
    :func:`fa_lab.kernels.flash.plan_splits` picks for this shape).
    """
    import numba
    import pandas as pd

    from fa_lab.api import _prepare, effective_blocks
    from fa_lab.kernels import flash

    H_kv = H_kv or H
    case = Case(B=B, H=H, Nq=1, Nk=Nk, d=d, H_kv=H_kv)
    q, k, v = case.inputs(dtype=dtype, seed=seed)
    call = _prepare(q, k, v, "bottom_right", None, None, None, None, 0.0, None)
    bq, bk = effective_blocks(1, Nk, None, None, flash.DEFAULT_BLOCKS)
    cs = []
    for s in splits:
        c = Contender(f"flash, {s} split{'s' if s > 1 else ''}", lambda q, k, v, _s=s: flash.run(
            call.q4, call.k4, call.v4, None, call.scale, call.alignment, bq, bk,
            splits=_s)[0].reshape(q.shape), "kernel")
        validate(c, q, k, v, "bottom_right")
        cs.append(c)
    if with_torch:
        cs += [c for c in contenders([], causal="bottom_right", with_baselines=True)
               if c.name == "torch_sdpa"]
        for c in cs[len(splits):]:
            validate(c, q, k, v, "bottom_right")
    # Back to back, as in a decoding loop: after a pause, the first call pays the wake-up
    # of sleeping threads (4-12 ms here, 20-50x a decode step; see REWARM_BELOW_S).
    times = time_calls(cs, (q, k, v), repeats=repeats, warmup=2, cooldown=0)
    auto = flash.plan_splits(B, H, 1, Nk, bq, bk, numba.get_num_threads())
    rows = []
    for c in cs:
        q25, med, q75 = verdict.quartiles(times[c.name])
        rows.append({"name": c.name, "B": B, "H": H, "H_kv": H_kv, "Nk": Nk, "d": d,
                     "median_ms": med * 1e3, "q25_ms": q25 * 1e3, "q75_ms": q75 * 1e3,
                     "auto_splits": auto, **times.load.columns()})
    return pd.DataFrame(rows)


def _verdict_columns(v: "verdict.Verdict") -> dict:
    return {"verdict": v.text, "status": v.status}


SPEED_CLAIMS_CSV = Path(__file__).resolve().parents[1] / "data" / "speed_claims.csv"


def check_speed_claims(path=SPEED_CLAIMS_CSV, *, kernel="flash", repeats=5, max_N=None,
                       progress=None):
    """Measure each published speed claim's configuration, side by side in one run.

    For each row of ``path``: ``kernel`` against NumPy standard attention (the
    ``numpy_standard`` baseline, the "standard attention" the claims compare with) and
    torch SDPA, validated first. The verdict compares the measured speedup over
    standard attention (its quartile range) with the claimed range
    (:func:`fa_lab.verdict.judge_claim`), or reads ``inconclusive`` when the machine was
    busy or the range straddles the claim's edge.
    ``max_N`` caps N (quick runs); a capped row says so.
    """
    import pandas as pd

    claims = pd.read_csv(path)
    rows = []
    for _, c in claims.iterrows():
        B, H, N, d = int(c["B"]), int(c["H"]), int(c["N"]), int(c["d"])
        causal = str(c["causal"]).strip().lower() == "true"
        note = c["unstated"]
        if max_N is not None and N > max_N:
            note = f"{note}; quick run: measured at N={max_N} instead of {N}"
            N = max_N
        if progress:
            progress(f"claim {c['claim']!r}")
        df = run([kernel], [(B, H, N, N, d)], causal=causal, dtype=np.dtype(c["dtype"]),
                 repeats=repeats).set_index("name")
        ms = df["median_s"] * 1e3
        speedup = ms["numpy_standard"] / ms[kernel]
        low = df.loc["numpy_standard", "q25_s"] / df.loc[kernel, "q75_s"]
        high = df.loc["numpy_standard", "q75_s"] / df.loc[kernel, "q25_s"]
        load = load_of(df.loc[kernel])
        claimed_ms = ("" if pd.isna(c["claimed_standard_ms"]) else
                      f"{c['claimed_standard_ms']:g} -> {c['claimed_flash_ms']:g} ms")
        rows.append({
            "claim": c["claim"], "config measured": f"B={B}, H={H}, N={N}, d={d}, "
                     f"{c['dtype']}{', causal' if causal else ''}",
            "claimed ms": claimed_ms, "standard ms": ms["numpy_standard"],
            f"{kernel} ms": ms[kernel],
            "torch_sdpa ms": ms.get("torch_sdpa", float("nan")),
            "speedup vs standard": speedup, "speedup low": low, "speedup high": high,
            "speedup vs torch_sdpa": (ms["torch_sdpa"] / ms[kernel] if "torch_sdpa" in ms
                                      else float("nan")),
            **_verdict_columns(verdict.judge_claim(
                c["claim"], speedup, c["claimed_speedup_low"], c["claimed_speedup_high"],
                low=low, high=high, load=load)), **load.columns(),
            "note": note, "source": c["source"],
            **{f"machine_{k}": v for k, v in machine().items()}})
    return pd.DataFrame(rows)


def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(df, peak_gflops: float, title="Throughput against N"):
    """GFLOP/s against N per contender (from :func:`run` over several N), with the
    measured matrix-product peak as a horizontal ceiling and 60% of it dashed. (Not a
    roofline: that needs arithmetic intensity on the x axis.)"""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"flash": ("tab:blue", "o", "-"), "torch_sdpa": ("tab:red", "s", "-"),
              "numpy_standard": ("tab:gray", "^", "-"), "tiled_simd": ("tab:green", "d", "-")}
    for (name, causal), g in df.groupby(["name", "causal"], sort=False):
        color, marker, _ = styles.get(name, ("tab:purple", "x", "-"))
        g = g.sort_values("Nq")
        label = f"{name}{' (causal)' if causal else ''}"
        # quartiles of time -> GFLOP/s range (the faster quartile gives the higher rate)
        low = g["gflops"] * g["median_s"] / g["q75_s"]
        high = g["gflops"] * g["median_s"] / g["q25_s"]
        ax.errorbar(g["Nq"], g["gflops"], yerr=[g["gflops"] - low, high - g["gflops"]],
                    marker=marker, color=color, capsize=3, linestyle="--" if causal else "-",
                    label=label)
    ax.axhline(peak_gflops, color="black", lw=1)
    ax.annotate(f"measured fp32 matmul peak {peak_gflops:.0f} GFLOP/s", (0.01, peak_gflops),
                xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
    ax.axhline(0.6 * peak_gflops, color="black", lw=0.8, ls=":")
    ax.annotate("60% of peak", (0.99, 0.6 * peak_gflops), xycoords=("axes fraction", "data"),
                va="bottom", ha="right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (= Nq = Nk)")
    ax.set_ylabel("GFLOP/s (4 B H N^2 d, halved when causal; bars: quartiles)")
    r = df.iloc[0]
    ax.set_title(f"{title}: B={r['B']}, H={r['H']}, d={r['d']}, {r['dtype']}", fontsize=10)
    ax.set_ylim(0, peak_gflops * 1.15)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_breakdown(df, title="Where flash's time goes"):
    """One horizontal stacked bar from :func:`breakdown` (ms per part, share labelled)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = 0.0
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for (_, r), color in zip(df.iterrows(), colors):
        width = max(r["ms"], 0.0)
        ax.barh([0], [width], left=left, color=color, label=f"{r['part']}: {r['ms']:.1f} ms "
                f"({100 * r['share']:.0f}%)")
        left += width
    r = df.iloc[0]
    ax.set_yticks([])
    ax.set_xlabel("ms (differences of medians of the staged kernel)")
    ax.set_title(f"{title}: B={r['B']}, H={r['H']}, N={r['Nq']}, d={r['d']}, "
                 f"tiles {r['block_q']}x{r['block_kv']}, total {r['total_ms']:.1f} ms",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2)
    fig.tight_layout()
    return fig


def plot_decode(frames, title="Decode: one new token against the KV cache"):
    """Grouped bars of median ms per contender for several decode shapes
    (a list of :func:`decode_splits` tables)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.8), squeeze=False)
    for ax, df in zip(axes[0], frames):
        colors = ["tab:red" if n == "torch_sdpa" else "tab:blue" for n in df["name"]]
        med = df["median_ms"]
        err = np.vstack([med - df["q25_ms"], df["q75_ms"] - med])
        ax.bar(range(len(df)), med, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(df)), [n.replace("flash, ", "") for n in df["name"]],
                      rotation=30, ha="right", fontsize=8)
        for x, m in enumerate(med):
            ax.annotate(f"{m:.3f}", (x, m), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        r = df.iloc[0]
        ax.set_title(f"H={r['H']}, H_kv={r['H_kv']}, Nk={r['Nk']} (auto: {r['auto_splits']} "
                     f"split{'s' if r['auto_splits'] > 1 else ''})", fontsize=9)
        ax.set_ylabel("median ms per call")
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def load_of(row) -> Load | None:
    """The :class:`Load` stored in a result row's load columns (None if it has none)."""
    if "others_pct" not in row or row["others_pct"] != row["others_pct"]:
        return None
    return Load(0.0, row.get("load1_start", float("nan")), row.get("load1_end", float("nan")),
                row["others_pct"] / 100, row.get("steal_pct", 0.0) / 100)


def _quart(row, unit="s"):
    med = row[f"median_{unit}"]
    return row.get(f"q25_{unit}", med), med, row.get(f"q75_{unit}", med)


def speedup(df, fast: str, slow: str, unit="s") -> tuple[float, float, float]:
    """``(low, value, high)``: how many times faster ``fast`` ran than ``slow`` in a
    result table of :func:`run` (rows by ``name``), with the quartile range
    (:func:`fa_lab.verdict.ratio_range`)."""
    rows = df.set_index("name")
    (f25, f50, f75), (s25, s50, s75) = _quart(rows.loc[fast], unit), _quart(rows.loc[slow], unit)
    return s25 / f75, s50 / f50, s75 / f25


def judge_speedup(df, fast: str, slow: str, need, what: str | None = None, unit="s",
                  **kw) -> "verdict.Verdict":
    """The verdict on "``fast`` is at least ``need`` times as fast as ``slow``" (or a
    ``(low, high)`` band) from one result table, on the quartile range, with its load."""
    low, value, high = speedup(df, fast, slow, unit)
    rows = df.set_index("name")
    load = Load.merge([load_of(rows.loc[fast]), load_of(rows.loc[slow])])
    return verdict.judge(what or f"{fast} vs {slow} (speed ratio)", value, need, low=low,
                         high=high, load=load if load.known else None, **kw)


def targets_table(throughput, decode_frames, peak, kernel="flash") -> "pd.DataFrame":
    """The performance issue's targets against this run's measurements, with verdicts
    (:func:`fa_lab.verdict.judge` on the quartile ranges; ``inconclusive`` under load).

    ``throughput``: :func:`run` rows (several N, causal and not) with ``torch_sdpa``;
    ``decode_frames``: :func:`decode_splits` tables; ``peak``: :func:`matmul_peak`.
    A target whose shape was not measured in this run (quick mode) is left out.
    """
    import pandas as pd

    rows = []

    def add(target, need, value, low, high, load, fmt="{:.2f}x"):
        v = verdict.judge(target, value, need, low=low, high=high, load=load, fmt=fmt)
        rows.append({"target": target, "need": f">= {fmt.format(need)}",
                     "measured": fmt.format(value), "verdict": v.text, "met": v.status == "met"})

    t = throughput.set_index(["name", "B", "H", "Nq", "causal"])
    for (B, H, N, causal, need) in [(1, 8, 2048, False, 1.2), (1, 8, 2048, True, 1.2),
                                    (1, 8, 512, False, 1.0), (1, 1, 8192, False, 1.0)]:
        try:
            mine, theirs = t.loc[(kernel, B, H, N, causal)], t.loc[("torch_sdpa", B, H, N, causal)]
        except KeyError:
            continue
        (m25, m50, m75), (t25, t50, t75) = _quart(mine), _quart(theirs)
        add(f"throughput vs torch SDPA, B={B}, H={H}, N={N}{', causal' if causal else ''}",
            need, t50 / m50, t25 / m75, t75 / m25, load_of(mine))
    for df in decode_frames:
        d = df.set_index("name")
        auto = int(df["auto_splits"].iloc[0])
        label = f"flash, {auto} split{'s' if auto > 1 else ''}"
        mine = d.loc[label] if label in d.index else d.filter(like="flash", axis=0).iloc[0]
        if "torch_sdpa" in d.index:
            (m25, m50, m75), (t25, t50, t75) = _quart(mine, "ms"), _quart(d.loc["torch_sdpa"], "ms")
            row = df.iloc[0]
            add(f"decode vs torch SDPA, Nq=1, Nk={row['Nk']}, H={row['H']}/{row['H_kv']} kv "
                f"(flash's own split choice: {auto})", 1.0, t50 / m50, t25 / m75, t75 / m25,
                load_of(mine))
    best = peak["gflops"].max()
    mine = throughput[throughput["name"] == kernel]
    if len(mine):
        top = mine.loc[mine["gflops"].idxmax()]
        q25, med, q75 = _quart(top)
        add(f"fraction of the measured fp32 matmul peak ({best:.0f} GFLOP/s), best {kernel} "
            f"row (N={top['Nq']}{', causal' if top['causal'] else ''})", 0.6,
            top["gflops"] / best, top["gflops"] * med / q75 / best,
            top["gflops"] * med / q25 / best, load_of(top), fmt="{:.0%}")
    return pd.DataFrame(rows)


def run_with_env(env: dict, args: list[str], csv: Path, timeout=1800):
    """Run ``python -m fa_lab <args> --csv csv`` in a fresh process with extra
    environment variables (e.g. ``OPENBLAS_CORETYPE``, read only when BLAS loads);
    returns the table it wrote."""
    import subprocess
    import sys

    import pandas as pd

    full = {**os.environ, **{k: str(v) for k, v in env.items()}}
    done = subprocess.run([sys.executable, "-m", "fa_lab", *args, "--csv", str(csv)],
                          env=full, timeout=timeout, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m fa_lab {' '.join(args)} failed with {env}: "
                           f"{done.stderr[-2000:]}")
    return pd.read_csv(csv)
