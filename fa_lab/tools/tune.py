"""The autotuner: pick block sizes for this machine from a short, validated sweep.

:func:`autotune` times the ``flash`` kernel (or another tiled kernel) over a grid of
``(block_q, block_kv)`` for a few workload *regimes*, each with one representative
shape, and stores the fastest choice per regime in the tuning file
(:mod:`fa_lab.settings.tuning_file`, which also reads it) together with the machine it was
measured on and the whole sweep. ``kernel="auto"`` then uses the stored blocks
(:func:`fa_lab.settings.tuning_file.tuned_blocks`) when the call gives none; an explicit kernel
name keeps its documented defaults, so a named kernel behaves the same on every
machine. ``fa_lab.api.plan`` tells which blocks a call will use and where they came from.

The reader's names (``tuned_blocks``, ``load``, ``validate``, ``tune_path``, ...) are
re-exported here for convenience.
"""

from __future__ import annotations

import pandas as pd

from fa_lab.tools.bench.sweeps import sweep_blocks
from fa_lab.settings.machine import machine
from fa_lab.registry import KERNELS
from fa_lab.numerics.testing import Case
from fa_lab.settings.tuning_file import (MAX_BLOCK, REGIMES, Regime, TuningFileWarning,  # noqa: F401
                                reset_cache, choices_table, fingerprint, load,
                                regime_for, tune_path, tuned_blocks, validate, write)

#: Quick grids (CI and ``--quick``): smaller shapes, two candidates per axis.
QUICK = {
    "decode": dict(Nk=1024, blocks_kv=(128, 512)),
    "short": dict(Nq=256, Nk=256, blocks_q=(64, 128), blocks_kv=(128, 256)),
    "long": dict(Nq=512, Nk=512, blocks_q=(128, 256), blocks_kv=(128, 256)),
}


def autotune(kernel="flash", regimes=None, *, quick=False, repeats=3, path=None,
             progress=None):
    """Sweep block sizes per regime, store the fastest choice, return the sweep.

    Every combination is validated against the float64 reference before timing
    (:func:`fa_lab.tools.bench.sweeps.sweep_blocks`). Returns a DataFrame (one row per regime and
    combination, ``chosen`` marks the winner) and writes the tuning file (:func:`tune_path`, or ``path``).
    """
    if kernel not in KERNELS or not KERNELS[kernel].tiled:
        raise ValueError(f"kernel must be a tiled kernel of fa_lab.KERNELS, got {kernel!r}")
    names = [r.name for r in REGIMES]
    regimes = list(regimes or names)
    unknown = [r for r in regimes if r not in names]
    if unknown:
        raise ValueError(f"regimes: unknown {unknown}; known: {names}")
    frames = []
    for reg in REGIMES:
        if reg.name not in regimes:
            continue
        p = {**reg.__dict__, **(QUICK[reg.name] if quick else {})}
        case = Case(B=p["B"], H=p["H"], Nq=p["Nq"], Nk=p["Nk"], d=p["d"])
        if progress:
            progress(f"tune {kernel} for {reg.name}: {case.id}, "
                     f"{len(p['blocks_q']) * len(p['blocks_kv'])} combinations")
        df = sweep_blocks(kernel, case, p["blocks_q"], p["blocks_kv"], causal=p["causal"],
                          repeats=repeats)
        df.insert(0, "regime", reg.name)
        df["Nq"], df["Nk"], df["causal"] = case.Nq, case.Nk, str(p["causal"])
        df["chosen"] = df["median_s"] == df["median_s"].min()
        frames.append(df)
    sweep = pd.concat(frames, ignore_index=True)
    stored = load(path) or {}
    if stored.get("fingerprint") != fingerprint():
        stored = {}
    choices = stored.get("choices", {})
    sweeps = stored.get("sweeps", {})
    for regime, g in sweep.groupby("regime"):
        sweeps.setdefault(kernel, {})[regime] = [
            {"block_q": int(r.block_q), "block_kv": int(r.block_kv),
             "median_s": float(r.median_s)} for r in g.itertuples()]
    for _, row in sweep[sweep["chosen"]].iterrows():
        choices.setdefault(kernel, {})[row["regime"]] = {
            "block_q": int(row["block_q"]), "block_kv": int(row["block_kv"]),
            "median_s": float(row["median_s"]), "shape": f"Nq={row['Nq']}, Nk={row['Nk']}",
            "quick": bool(quick)}
    write({"fingerprint": fingerprint(), "machine": machine(), "choices": choices,
           "sweeps": sweeps}, path)
    return sweep


__all__ = ["REGIMES", "QUICK", "Regime", "autotune", "tuned_blocks", "tune_path", "fingerprint",
           "choices_table", "regime_for", "load", "validate", "TuningFileWarning", "MAX_BLOCK"]
