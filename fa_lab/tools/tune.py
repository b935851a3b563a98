"""The autotuner: pick block sizes for this machine from a short, validated sweep.

:func:`autotune` times the ``flash`` kernel (or another tiled kernel) over a grid of
``(block_q, block_kv)`` for a few workload *regimes*, each with one representative
shape, and stores the fastest choice per regime in the tuning file
(:mod:`fa_lab.settings.tuning_file`, which also reads it) together with the machine it was
measured on and the whole sweep. ``kernel="auto"`` then uses the stored blocks
(:func:`fa_lab.settings.tuning_file.tuned_blocks`) when the call gives none; an explicit kernel
name keeps its documented defaults, so a named kernel behaves the same on every
machine. ``fa_lab.api.plan`` tells which blocks a call will use and where they came from.

:func:`tune_paths` measures the *paths* a call may take (which decode kernel and how
many key splits; which INT8 kernel and ``P V`` precision ``pv_dtype="bfloat16"``
allows) and stores every candidate's times in the same file; ``kernel="auto"`` then
runs the fastest, and the plans (:func:`fa_lab.api.plan`,
:func:`fa_lab.features.kvcache.plan_kvcache`, :func:`fa_lab.features.int8.plan_int8`)
say which and why.

The reader's names (``tuned_blocks``, ``load``, ``validate``, ``tune_path``, ...) are
re-exported here for convenience.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fa_lab.api import attention, prepare
from fa_lab.features.int8 import attention_int8
from fa_lab.features.kvcache import attention_with_kvcache
from fa_lab.numerics import reference
from fa_lab.registry import BF16_KERNELS, INT8_KERNELS, KVCACHE_KERNELS
from fa_lab.tools.bench.harness import Contender, time_calls
from fa_lab.tools.bench.harness import validate as check_contender
from fa_lab.tools.bench.sweeps import sweep_blocks
from fa_lab.settings import config
from fa_lab.settings.machine import machine
from fa_lab.registry import KERNELS
from fa_lab.numerics.testing import Case, assert_close
from fa_lab.settings.tuning_file import (MAX_BLOCK, PATHS, REGIMES, Regime, TuningFileWarning,  # noqa: F401
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
    stored = _stored(path)
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
    _store({**stored, "choices": choices, "sweeps": sweeps}, path)
    return sweep


def _stored(path) -> dict:
    """The tuning file's content if it was written on this machine (fingerprint), else {}."""
    stored = load(path) or {}
    return stored if stored.get("fingerprint") == fingerprint() else {}


def _store(data: dict, path) -> None:
    """Write ``data`` (choices, sweeps, paths) with this machine's fingerprint."""
    write({"choices": {}, "sweeps": {}, "paths": {}, **data, "fingerprint": fingerprint(),
           "machine": machine()}, path)


#: Key splits tried for each decode kernel.
DECODE_SPLITS = (1, 2, 4, 8)
#: Quick shapes (CI and ``--quick``): the same head counts, shorter sequences.
QUICK_PATHS = {"decode_mha": dict(Nk=1024), "decode_gqa": dict(Nk=1024),
               "int8_pv": dict(Nq=256, Nk=256), "decode_bf16": dict(Nk=1024),
               "flash_pv": dict(Nq=256, Nk=256)}


def _decode_candidates(case):
    """``(options, fn(q, k, v))`` for every decode path: ``attention`` (flash) and
    ``attention_with_kvcache`` (each float-cache kernel) at each number of splits."""
    out = []
    for s in DECODE_SPLITS:
        out.append((dict(api="attention", kernel="flash", splits=s),
                    lambda q, k, v, s=s: prepare(q, k, v, causal="bottom_right").run(
                        "flash", splits=s)[0]))
    for name, kern in KVCACHE_KERNELS.items():
        if name == "reference" or "float" not in kern.kv_formats or kern.available and kern.available():
            continue
        for s in DECODE_SPLITS:
            out.append((dict(api="kvcache", kernel=name, splits=s),
                        lambda q, k, v, name=name, s=s: attention_with_kvcache(
                            q, k, v, cache_seqlens=case["Nk"], kernel=name, splits=s)))
    return out


def _int8_candidates(case):
    """``(options, fn)`` for each way ``pv_dtype="bfloat16"`` may run on this CPU: every
    INT8 kernel with a bf16 ``P V`` that runs here, and ``sage`` with fp32 ``P V``."""
    out = []
    for name, kern in INT8_KERNELS.items():
        if "pv_dtype" not in kern.tags or (kern.available and kern.available()):
            continue
        for pv in ("bfloat16",) if "bf16_pv" in kern.tags else ("bfloat16", "float32"):
            out.append((dict(kernel=name, pv_dtype=pv),
                        lambda q, k, v, name=name, pv=pv: attention_int8(
                            q, k, v, kernel=name, pv_dtype=pv)))
    return out


def _bf16_candidates(case):
    """``(options, fn)`` for a bfloat16 decode step: each bf16 kernel that runs here
    (AMX tiles), and ``flash`` on the inputs widened to float32 (the result rounded
    back); empty without a bf16 kernel. The calls take ``ml_dtypes.bfloat16`` arrays."""
    names = [n for n, k in BF16_KERNELS.items() if not (k.available and k.available())]
    if not names:
        return []
    out = [(dict(kernel=n), lambda q, k, v, n=n: attention(q, k, v, causal="bottom_right",
                                                            kernel=n)) for n in names]
    out.append((dict(kernel="float32"), lambda q, k, v: attention(
        q, k, v, causal="bottom_right", kernel="flash")))
    return out


def _pv_candidates(case):
    """``(options, fn)`` for each ``P V`` path of ``flash`` (``config.FLASH_PV_PATHS``), as
    ``kernel="auto"`` would run it: the tuned tiles, and one key range (a call that splits
    runs BLAS whatever ``pv`` says, which would time BLAS twice)."""
    def run(q, k, v, pv):
        call = prepare(q, k, v)
        bq, bk, _ = call.blocks("auto", KERNELS["flash"])
        return call.run("flash", block_q=bq, block_kv=bk, splits=1, pv=pv)[0]
    return [(dict(kernel="flash", pv=p), lambda q, k, v, p=p: run(q, k, v, p))
            for p in config.FLASH_PV_PATHS]


def _inputs(name, case):
    """The entry's inputs (float32; bfloat16 for ``decode_bf16``, None without
    ``ml_dtypes``, the ``models`` extra) and the check each candidate passes first."""
    q, k, v = Case(**case).inputs(np.float32)
    if name == "decode_bf16":
        try:
            import ml_dtypes
        except ImportError:
            return None, None
        b = tuple(x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
        exact = reference.attention(*(x.astype(np.float64) for x in b), causal="bottom_right")[0]
        base = reference.attention_half(*b, dtype=ml_dtypes.bfloat16, causal="bottom_right")[0]
        return b, lambda c: assert_close(c.fn(*b), exact, baseline=base, what=c.name)
    if name.startswith("decode") or name == "flash_pv":
        return (q, k, v), lambda c: check_contender(c, q, k, v, name != "flash_pv" and "bottom_right")

    def cosine(c):  # INT8 scores: judged by cosine, as lesson 10 does
        out, ref = c.fn(q, k, v).astype(np.float64).ravel(), reference.attention(q, k, v)[0].ravel()
        if not out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref)) >= 0.999:
            raise AssertionError(f"{c.name}: cosine below 0.999 against float64")
    return (q, k, v), cosine


def _label(opts):
    if "api" in opts:
        s = opts["splits"]
        return f"{opts['api']} {opts['kernel']}, {s} split{'s' if s > 1 else ''}"
    if "pv" in opts:
        return f"flash, P V by {opts['pv']}"
    if "pv_dtype" not in opts:
        return f"bf16 inputs on {'the float32 flash' if opts['kernel'] == 'float32' else opts['kernel']}"
    return f"{opts['kernel']}, {'bf16' if opts['pv_dtype'] == 'bfloat16' else 'fp32'} P V"


def tune_paths(names=None, *, quick=False, repeats=20, path=None, progress=None):
    """Time every candidate path of each measured entry (:data:`PATHS`; all by default)
    on its representative shape, validated first, interleaved in rounds (back to back,
    as a decoding loop calls), and store them all in the tuning file. Returns one row
    per candidate (``chosen`` marks the fastest of each entry and API)."""
    names = list(names or PATHS)
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise ValueError(f"names: unknown {unknown}; known: {list(PATHS)}")
    rows, entries = [], {}
    for name in names:
        case = {**PATHS[name][1], **(QUICK_PATHS[name] if quick else {})}
        decode = name.startswith("decode")
        cands = {"int8_pv": _int8_candidates, "decode_bf16": _bf16_candidates,
                 "flash_pv": _pv_candidates}.get(name, _decode_candidates)(case)
        args, check = _inputs(name, case)
        if not cands or args is None:
            continue
        if progress:
            progress(f"measure {name}: {len(cands)} candidates on {Case(**case).id}")
        contenders = [Contender(_label(o), fn, "kernel") for o, fn in cands]
        for c in contenders:
            check(c)
        times = time_calls(contenders, args, repeats=repeats if decode else max(3, repeats // 4),
                           warmup=2, cooldown=0 if decode else None)
        shape = Case(**case).id
        cand = [{"label": c.name, **o, **times.summary(c.name)} for c, (o, _) in zip(contenders, cands)]
        keep = ("label", "api", "kernel", "splits", "pv_dtype", "pv", "median_s", "q25_s",
                "q75_s")
        entries[name] = {"what": PATHS[name][0], "shape": shape, "quick": bool(quick),
                         "candidates": [{k_: c[k_] for k_ in keep if k_ in c} for c in cand]}
        df = pd.DataFrame([{"path": name, "shape": shape, **c} for c in cand])
        group = df["api"] if "api" in df else pd.Series("", index=df.index)
        df["chosen"] = df["median_s"] == df.groupby(group)["median_s"].transform("min")
        rows.append(df)
    stored = _stored(path)
    stored.setdefault("paths", {}).update(entries)
    _store(stored, path)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


__all__ = ["PATHS", "QUICK_PATHS", "DECODE_SPLITS", "tune_paths", "REGIMES", "QUICK", "Regime", "autotune", "tuned_blocks", "tune_path", "fingerprint",
           "choices_table", "regime_for", "load", "validate", "TuningFileWarning", "MAX_BLOCK"]
