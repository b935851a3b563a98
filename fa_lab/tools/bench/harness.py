"""The one timing harness: validate first, then time contenders side by side, interleaved.

Rules (house style, rule 8): every kernel is checked against the reference once on
the benchmarked shape (that call also compiles it), then all kernels are timed in
rounds, one call each per round, so drift on a noisy VM hits all of them alike. Each
timed call follows an untimed pause (:data:`fa_lab.settings.config.BENCH_COOLDOWN_S`): without
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

import time
from dataclasses import dataclass

import numpy as np

from fa_lab.settings import config
from fa_lab.numerics import reference, verdict
from fa_lab.settings.machine import Load, LoadMonitor
from fa_lab.numerics.reference import flops  # noqa: F401  (re-exported: bench.flops)
from fa_lab.numerics.testing import assert_close


@dataclass
class Contender:
    """Something to time: a registry kernel or a baseline, as ``fn(q, k, v) -> out``."""

    name: str
    fn: object
    kind: str  # "kernel" or "baseline"


class Timings(dict):
    """``{name: [seconds, ...]}`` from :func:`time_calls`, with ``load``: the machine's
    :class:`fa_lab.settings.machine.Load` during the timed rounds."""

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

    def ms(self, name: str, per: float = 1.0) -> dict:
        """``median_ms``, ``q25_ms``, ``q75_ms`` of one contender (divided by ``per``, e.g.
        tokens per call) and the load columns: the millisecond form of :meth:`summary`."""
        q25, med, q75 = (x * 1e3 / per for x in verdict.quartiles(self[name]))
        row = {"median_ms": med, "q25_ms": q25, "q75_ms": q75}
        if self.load is not None:
            row.update(self.load.columns())
        return row

    def ratio(self, slow: str, fast: str) -> tuple[float, float, float]:
        """``(low, median ratio, high)`` of ``slow``'s time over ``fast``'s (a speedup)."""
        return verdict.ratio_range(self[slow], self[fast])


def time_calls(contenders_, args, *, repeats=5, warmup=1, min_time=0.0, cooldown=None):
    """Interleaved timing: ``repeats`` rounds, each calls every contender once.

    Returns :class:`Timings` (``{name: [seconds, ...]}`` plus the load of the window).
    ``min_time`` adds rounds until each contender has run at least that long in total
    (for tiny problems). Each timed call is preceded
    by an untimed pause of ``cooldown`` seconds (default
    :data:`fa_lab.settings.config.BENCH_COOLDOWN_S`) so that one contender's spinning thread
    pool (NumPy's OpenBLAS) does not slow the next one, and, for contenders whose last
    call took under :data:`fa_lab.settings.config.REWARM_BELOW_S`, by one untimed call that wakes its threads.
    """
    cooldown = config.BENCH_COOLDOWN_S if cooldown is None else cooldown
    # Always settle once first: validation just ran NumPy's multi-threaded BLAS, whose
    # spinning threads would slow the first ~100 ms of rounds (a whole decode benchmark).
    time.sleep(config.BENCH_COOLDOWN_S)
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
                    if last < config.REWARM_BELOW_S:  # wake this contender's threads, untimed
                        c.fn(*args)
                t0 = time.perf_counter()
                c.fn(*args)
                times[c.name].append(time.perf_counter() - t0)
            rounds += 1
            if rounds >= 50 * max(repeats, 1):
                break
    times.load = monitor.load
    return times


#: Contenders timed in a window of their own (:func:`time_apart`): PyTorch's OpenMP
#: workers keep spinning after each call and take the cores from whatever runs next.
APART = ("torch_sdpa",)

#: How a result row was timed (its ``timing`` column): :func:`time_calls` with its pause
#: before each call, and :func:`time_apart` back to back (the isolated harness says
#: ``"separate processes, ..."``).
TIMING_INTERLEAVED = "one process, interleaved rounds, a pause before each call"
TIMING_APART = (f"one process, back to back; {', '.join(APART)} in rounds of its own "
                "after the others'")


def time_apart(contenders_, args, *, apart=APART, **kw) -> Timings:
    """:func:`time_calls` for back-to-back timings (``cooldown=0``), with the contenders
    named in ``apart`` timed in their own rounds after the others', so their runtime's
    spinning threads never run beside another contender (interleaved, they once read a
    decode step's time 1.8x slower). One :class:`Timings`, its load the worse window's."""
    mine = [c for c in contenders_ if c.name not in apart]
    theirs = [c for c in contenders_ if c.name in apart]
    times = time_calls(mine, args, **kw) if mine else Timings()
    if theirs:
        other = time_calls(theirs, args, **kw)
        times.update(other)
        times.load = Load.merge([times.load, other.load])
    return times


def validate(contender: Contender, q, k, v, causal=False) -> dict:
    """Check one contender against the float64 reference on the benchmark's own inputs."""
    expected, _ = reference.attention(q, k, v, causal=causal)
    baseline, _ = reference.attention(q, k, v, causal=causal, dtype=q.dtype.type)
    return assert_close(contender.fn(q, k, v), expected, baseline=baseline,
                        what=contender.name, magnitude=np.abs(v).max())


def load_of(row) -> Load | None:
    """The :class:`Load` stored in a result row's load columns (None if it has none)."""
    if "others_pct" not in row or row["others_pct"] != row["others_pct"]:
        return None
    return Load(0.0, row.get("load1_start", float("nan")), row.get("load1_end", float("nan")),
                row["others_pct"] / 100, row.get("steal_pct", 0.0) / 100)

