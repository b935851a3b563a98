"""The memory hierarchy, measured: cache sizes, bandwidth per level, the FMA peak, the
floor of a decode step, and hardware counters where the machine exposes them.

* :func:`cache_levels` -- sizes from ``/sys/devices/system/cpu/cpu0/cache/index*``
  (``level``, ``type``, ``size``, ``shared_cpu_list``), ``lscpu`` as fallback.
* :func:`bandwidth_sweep` -- GB/s of a streaming read and of STREAM's triad
  (:mod:`fa_lab.kernels.probes.stream`) over working sets from a few KiB to hundreds of MiB,
  on 1 thread and on all; every point validated, then timed with
  :func:`fa_lab.tools.bench.time_calls` (interleaved rounds, load recorded).
  :func:`level_bandwidths` reads one number per level off the curve.
* :func:`fma_peak` -- the register-resident FMA loop's GFLOP/s (the compute ceiling
  beside :func:`fa_lab.tools.bench.matmul_peak`).
* :func:`decode_vs_floor` -- a decode step must read all of K and V: its floor is
  ``bytes(K, V) / bandwidth`` of the level the cache fits in; a decode latency table's
  times against it.
* :func:`perf_counters` -- ``perf stat`` of a known stream (LLC misses), or why not.

``python -m fa_lab bench --sweep bandwidth`` runs the sweep from the command line.
Results on this machine are in lesson ``09_memory_hierarchy``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from fa_lab.numerics import verdict
from fa_lab.tools import traffic
from fa_lab.tools.bench import Contender, load_of, time_calls
from fa_lab.kernels.probes import stream

SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Cache:
    """One cache level of cpu0: ``level`` 1-3, ``type`` (Data/Instruction/Unified),
    ``size`` in bytes, ``shared`` = how many CPUs share it, ``source``."""

    level: int
    type: str
    size: int
    shared: int
    source: str

    @property
    def name(self) -> str:
        return f"L{self.level}{'i' if self.type == 'Instruction' else ''}"


def _size(text: str) -> int:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)i?B?", text.strip(), re.I)
    if not m:
        raise ValueError(f"cannot read a cache size from {text!r}")
    return int(float(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": 1024 * MiB}[m.group(2).upper()])


def _cpus(text: str) -> int:
    n = 0
    for part in text.strip().split(","):
        a, _, b = part.partition("-")
        n += int(b or a) - int(a) + 1 if a else 0
    return max(n, 1)


def cache_levels(root: Path = SYS_CACHE) -> list[Cache]:
    """The caches of cpu0 (from sysfs; from ``lscpu`` where sysfs has none)."""
    out = []
    for index in sorted(Path(root).glob("index*")):
        try:
            read = lambda f: (index / f).read_text().strip()  # noqa: E731
            shared = _cpus(read("shared_cpu_list")) if (index / "shared_cpu_list").exists() else 1
            out.append(Cache(int(read("level")), read("type"), _size(read("size")), shared,
                             "sysfs"))
        except (OSError, ValueError):
            continue
    return out or _lscpu_levels()


def _lscpu_levels() -> list[Cache]:
    if not shutil.which("lscpu"):
        return []
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    out = []
    for m in re.finditer(r"^L(\d)([di]?) cache:\s*([\d.]+ [KMG]i?B)(?: \((\d+) instances?\))?",
                         text, re.M):
        level, kind, size, inst = int(m.group(1)), m.group(2), _size(m.group(3)), m.group(4)
        total = size // int(inst) if inst else size  # lscpu sums the instances
        out.append(Cache(level, {"d": "Data", "i": "Instruction"}.get(kind, "Unified"),
                         total, 1, "lscpu"))
    return out


def data_levels(caches=None) -> dict:
    """``{"L1": bytes, "L2": bytes, "L3": bytes}``: the data/unified caches of one core."""
    caches = cache_levels() if caches is None else caches
    return {c.name: c.size for c in caches if c.type != "Instruction"}


def working_sets(lo=4 * KiB, hi=256 * MiB, per_octave=2) -> list[int]:
    """Geometric working-set sizes (bytes, multiples of 64) from ``lo`` to ``hi``."""
    n = int(round(np.log2(hi / lo) * per_octave)) + 1
    return sorted({int(x) // 64 * 64 for x in np.geomspace(lo, hi, n)})


STREAMS = {"read": 4, "triad": 12}  # bytes per element per pass (STREAM's convention)


def _stream_contender(kind, ws, threads, buf, target_bytes):
    per = STREAMS[kind]
    n = max(ws // per, 16)
    reps = max(1, int(target_bytes // (n * per)))
    if kind == "read":
        x = buf[0][:n]
        args = (x, reps) if threads == 1 else (x, reps, threads)
        fn = stream.read_serial if threads == 1 else stream.read_parallel
        want = reps * float(x.sum(dtype=np.float64))
        check = lambda r: abs(r - want) <= 1e-3 * abs(want)  # noqa: E731
    else:
        a, b, c = (x[:n] for x in buf)
        args = (a, b, c, np.float32(3.0), reps) + (() if threads == 1 else (threads,))
        fn = stream.triad_serial if threads == 1 else stream.triad_parallel
        t = np.float32(3.0) + np.float32(reps - 1) * np.float32(1e-7)
        check = lambda r: np.allclose(a, b + t * c, rtol=1e-5)  # noqa: E731

    def run():
        numba.set_num_threads(threads)
        return fn(*args)

    return Contender(f"{kind} t{threads} {ws}", run, "kernel"), check, reps * n * per


def bandwidth_sweep(sizes=None, *, kinds=("read", "triad"), threads=None, repeats=3,
                    target_bytes=64 * MiB, progress=None):
    """GB/s per (stream, threads, working set), validated, then timed interleaved.

    ``sizes``: working sets in bytes (default :func:`working_sets`); ``threads``:
    thread counts (default 1 and all numba threads). Returns a DataFrame with the
    median and quartile GB/s and the load columns.
    """
    import pandas as pd

    sizes = list(sizes or working_sets())
    before = numba.get_num_threads()
    threads = list(threads or sorted({1, before}))
    n_max = max(sizes) // 4 + 16
    buf = [np.ones(n_max, np.float32), np.full(n_max, 0.5, np.float32),
           np.full(n_max, 0.25, np.float32)]
    buf[0][::7] = 2.0  # a sum that is not a multiple of one value
    rows = []
    try:
        for kind in kinds:
            for t in threads:
                if progress:
                    progress(f"{kind} stream, {t} thread(s), {len(sizes)} working sets")
                cs = []
                for ws in sizes:
                    c, check, nbytes = _stream_contender(kind, ws, t, buf, target_bytes)
                    if not check(c.fn()):
                        raise AssertionError(f"{c.name}: wrong result, not timed")
                    cs.append((ws, c, nbytes))
                times = time_calls([c for _, c, _ in cs], (), repeats=repeats, warmup=1,
                                   cooldown=0)
                for ws, c, nbytes in cs:
                    s = times.summary(c.name)
                    rows.append({"stream": kind, "threads": t, "ws_bytes": ws,
                                 "bytes_per_call": nbytes, "gbps": nbytes / s["median_s"] / 1e9,
                                 "gbps_low": nbytes / s["q75_s"] / 1e9,
                                 "gbps_high": nbytes / s["q25_s"] / 1e9, **s})
    finally:
        numba.set_num_threads(before)
    return pd.DataFrame(rows)


def level_bandwidths(sweep, levels: dict, stream_kind="read"):
    """One bandwidth per level, read off the sweep: the median GB/s of the working sets
    that sit well inside it (at most half its size, at least twice the level above;
    private levels count once per thread), and of those beyond twice the last level
    (``DRAM``). Returns a DataFrame: level, threads, gbps (and its quartile range)."""
    import pandas as pd

    names = list(levels)
    rows = []
    for t, g in sweep[sweep["stream"] == stream_kind].groupby("threads"):
        caps = [levels[n] * (1 if n == names[-1] else t) for n in names]
        bands = [(0 if i == 0 else 2 * caps[i - 1], caps[i] / 2) for i in range(len(caps))]
        bands.append((2 * caps[-1], np.inf))
        for name, (lo, hi) in zip(names + ["DRAM"], bands):
            sel = g[(g["ws_bytes"] >= lo) & (g["ws_bytes"] <= hi)]
            if len(sel):
                rows.append({"level": name, "threads": t, "gbps": float(sel["gbps"].median()),
                             "gbps_low": float(sel["gbps_low"].median()),
                             "gbps_high": float(sel["gbps_high"].median()),
                             "points": len(sel), "ws_from": int(sel["ws_bytes"].min()),
                             "ws_to": int(sel["ws_bytes"].max())})
    return pd.DataFrame(rows)


def fma_peak(*, threads=None, repeats=5, steps=2_000_000):
    """GFLOP/s of the register-resident FMA loop (:data:`fa_lab.kernels.probes.stream.LANES`
    float32 accumulators), on each thread count; validated against float64 first."""
    import pandas as pd

    before = numba.get_num_threads()
    threads = list(threads or sorted({1, before}))
    seed = np.linspace(0.1, 0.2, stream.LANES).astype(np.float32)
    a, b = np.float32(0.999999), np.float32(1e-6)
    x = seed.astype(np.float64)
    for _ in range(1000):
        x = x * float(a) + float(b)
    if not np.isclose(stream.fma_serial(seed, 1000, a, b), x.sum(), rtol=1e-4):
        raise AssertionError("fma loop: wrong result, not timed")
    cs = []
    for t in threads:
        fn = ((lambda: stream.fma_serial(seed, steps, a, b)) if t == 1 else
              (lambda _t=t: (numba.set_num_threads(_t),
                             stream.fma_parallel(seed, steps, a, b, _t))))
        cs.append((t, Contender(f"fma t{t}", fn, "kernel")))
    try:
        times = time_calls([c for _, c in cs], (), repeats=repeats, warmup=1)
    finally:
        numba.set_num_threads(before)
    return pd.DataFrame([{"name": "fma loop", "threads": t,
                          **times.summary(c.name, 2.0 * stream.LANES * steps * t)}
                         for t, c in cs])


def fit_level(nbytes: float, levels: dict, threads: int) -> str:
    """The smallest level that holds ``nbytes`` (private levels: once per thread)."""
    names = list(levels)
    for n in names:
        if nbytes <= levels[n] * (1 if n == names[-1] else threads):
            return n
    return "DRAM"


def decode_vs_floor(latency, bandwidths, levels, *, name="fa_lab.decode"):
    """Each decode step of a :func:`fa_lab.tools.bench.decode_latency` table (its ``name``
    rows: one new token, float32 cache, timed back to back as in a decoding loop) against
    its floor, ``bytes(K, V) / bandwidth`` of the level the cache fits in
    (``bandwidths``: a :func:`level_bandwidths` table of the all-thread read stream).
    Reads the timings, does not time again: one measurement per fact."""
    import pandas as pd

    t = numba.get_num_threads()
    bw = bandwidths[bandwidths["threads"] == bandwidths["threads"].max()].set_index("level")
    rows = []
    for _, r in latency[latency["name"] == name].iterrows():
        L = int(r["context"])
        nbytes = 2 * int(r["H_kv"]) * L * int(r["d"]) * np.dtype(np.float32).itemsize
        level = fit_level(nbytes, levels, t)
        level = level if level in bw.index else bw.index[-1]
        floor = nbytes / (bw.loc[level, "gbps"] * 1e9)
        s = {f"{q}_s": r[f"{q}_ms"] / 1e3 for q in ("median", "q25", "q75")}
        loads = {k: r[k] for k in r.index if k not in ("context", "name") and not
                 k.endswith("_ms") and k not in ("H", "H_kv", "d")}
        rows.append({"tokens": L, "H": int(r["H"]), "H_kv": int(r["H_kv"]), "d": int(r["d"]),
                     "kv_bytes": nbytes, "level": level, "level_gbps": bw.loc[level, "gbps"],
                     "floor_s": floor, **s, **loads, "x_floor": s["median_s"] / floor,
                     "x_floor_low": s["q25_s"] / floor, "x_floor_high": s["q75_s"] / floor})
    if not rows:
        raise ValueError(f"latency: no rows named {name!r}")
    return pd.DataFrame(rows)


def judge_ratio(what, row, need, lo="x_floor_low", mid="x_floor", hi="x_floor_high"):
    """A verdict on a ratio column with its quartile range and the row's load."""
    return verdict.judge(what, row[mid], need, at_least=False, low=row[lo], high=row[hi],
                         load=load_of(row))


PERF_SCRIPT = ("import numpy as np; a = np.ones({n}, np.float32)\n"
               "for _ in range({reps}): a.sum()")


def perf_counters(events=("LLC-load-misses", "LLC-loads"), nbytes=128 * MiB, reps=8):
    """``perf stat`` of a child process that streams ``nbytes`` ``reps`` times.

    Returns ``{"available": bool, "values": {event: count}, "expected_lines":
    reps * nbytes / 64, "output": perf's text, "reason": why not}``. Containers and
    VMs often hide the performance counters (``<not supported>``) or forbid them
    (``perf_event_paranoid``).
    """
    info = {"available": False, "values": {}, "expected_lines": reps * nbytes // 64,
            "output": "", "reason": ""}
    perf = shutil.which("perf")
    if perf is None:
        info["reason"] = "perf is not installed (no `perf` on PATH)"
        return info
    code = PERF_SCRIPT.format(n=nbytes // 4, reps=reps)
    try:
        done = subprocess.run([perf, "stat", "-x", ",", "-e", ",".join(events), "--",
                               sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["reason"] = f"perf could not run: {exc}"
        return info
    info["output"] = (done.stderr or "").strip()[-2000:]
    for line in info["output"].splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in events and parts[0].strip().isdigit():
            info["values"][parts[2]] = int(parts[0])
    if done.returncode or len(info["values"]) < len(events):
        try:
            paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
        except OSError:
            paranoid = "unknown"
        missing = [e for e in events if e not in info["values"]]
        info["reason"] = (f"perf ran (exit {done.returncode}) but could not read {missing}: "
                          f"the hardware counters are not exposed here (a VM whose "
                          f"hypervisor hides the PMU reads '<not supported>'; "
                          f"perf_event_paranoid = {paranoid})")
    info["available"] = not info["reason"]
    return info


__all__ = ["Cache", "cache_levels", "data_levels", "working_sets", "bandwidth_sweep",
           "level_bandwidths", "fma_peak", "fit_level", "decode_vs_floor", "judge_ratio",
           "perf_counters", "STREAMS"]


def roofline_points(run, N, d, H, levels: dict, bandwidths, peak_gflops: float, *, B=1):
    """Place every contender of a :func:`fa_lab.tools.bench.run` table on the roofline.

    Each contender gets one point per memory level (its modelled arithmetic intensity at
    that level, :func:`fa_lab.tools.traffic.table`, and its measured GFLOP/s); ``roof`` is
    ``min(peak, intensity x that level's bandwidth)`` (``peak_gflops``: the compute
    ceiling, e.g. the larger of the FMA loop and the BLAS matmul peak; all-thread GB/s from
    :func:`level_bandwidths`), ``share_of_roof`` the measured fraction of it, and
    ``bound by`` the level (or compute) that sets the lowest roof. Returns
    ``(points, ceilings)``: the table and ``{level: GB/s}`` for :func:`fa_lab.viz.roofline`.
    """
    serving = {"L2": levels["L1"], "L3": levels["L2"], "DRAM": levels["L3"]}
    names = list(run["name"])
    model = traffic.table(names, N, N, d, serving, B=B, H=H)
    cols = ["name", "gflops", "median_s", "q25_s", "q75_s", "others_pct", "busy"]
    pts = model.merge(run[[c for c in cols if c in run]], on="name")
    top = bandwidths[bandwidths["threads"] == bandwidths["threads"].max()]
    ceilings = {lv: g for lv, g in top.set_index("level")["gbps"].items() if lv in serving}
    pts["roof"] = [min(peak_gflops, r.intensity * ceilings.get(r.level, np.inf))
                   for r in pts.itertuples()]
    pts["share_of_roof"] = pts["gflops"] / pts["roof"]
    pts["bound by"] = [r.level if r.intensity * ceilings.get(r.level, np.inf) < peak_gflops
                       else "compute" for r in pts.itertuples()]
    return pts, ceilings
