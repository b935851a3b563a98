"""Claims and targets judged on this run's measurements: speed ratios with their quartile
ranges, the published speed claims, and the performance targets; one verdict rule
(:mod:`fa_lab.numerics.verdict`), ``inconclusive`` under load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fa_lab.numerics import verdict
from fa_lab.tools.bench.harness import load_of
from fa_lab.tools.bench.sweeps import run
from fa_lab.settings.machine import Load, machine


def _verdict_columns(v: "verdict.Verdict") -> dict:
    return {"verdict": v.text, "status": v.status}


SPEED_CLAIMS_CSV = Path(__file__).resolve().parents[3] / "data" / "speed_claims.csv"


def check_speed_claims(path=SPEED_CLAIMS_CSV, *, kernel="flash", repeats=5, max_N=None,
                       progress=None):
    """Measure each published speed claim's configuration, side by side in one run.

    For each row of ``path``: ``kernel`` against NumPy standard attention (the
    ``numpy_standard`` baseline, the "standard attention" the claims compare with) and
    torch SDPA, validated first. The verdict compares the measured speedup over
    standard attention (its quartile range) with the claimed range
    (:func:`fa_lab.numerics.verdict.judge_claim`), or reads ``inconclusive`` when the machine was
    busy or the range straddles the claim's edge.
    ``max_N`` caps N (quick runs); a capped row says so.
    """
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
            "claimed low": c["claimed_speedup_low"], "claimed high": c["claimed_speedup_high"],
            "speedup vs torch_sdpa": (ms["torch_sdpa"] / ms[kernel] if "torch_sdpa" in ms
                                      else float("nan")),
            **_verdict_columns(verdict.judge_claim(
                c["claim"], speedup, c["claimed_speedup_low"], c["claimed_speedup_high"],
                low=low, high=high, load=load)), **load.columns(),
            "note": note, "source": c["source"],
            **{f"machine_{k}": v for k, v in machine().items()}})
    return pd.DataFrame(rows)


def _quart(row, unit="s"):
    med = row[f"median_{unit}"]
    return row.get(f"q25_{unit}", med), med, row.get(f"q75_{unit}", med)


def speedup(df, fast: str, slow: str, unit="s") -> tuple[float, float, float]:
    """``(low, value, high)``: how many times faster ``fast`` ran than ``slow`` in a
    result table of :func:`run` (rows by ``name``), with the quartile range
    (:func:`fa_lab.numerics.verdict.ratio_range`)."""
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
    """The speed targets against this run's measurements, with verdicts
    (:func:`fa_lab.numerics.verdict.judge` on the quartile ranges; ``inconclusive`` under load).

    ``throughput``: :func:`run` rows (several N, causal and not) with ``torch_sdpa``;
    ``decode_frames``: :func:`decode_splits` tables; ``peak``: :func:`matmul_peak`.
    A target whose shape was not measured in this run (quick mode) is left out.
    """
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

