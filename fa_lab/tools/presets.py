"""Named workload presets, chosen from this machine's autotuner measurements.

=============  ===============================================================
preset         what it optimizes, and where its numbers come from
=============  ===============================================================
``latency``    one or a few new tokens against a KV cache: the autotuner's
               fastest blocks for the "decode" regime; split-KV as planned
``throughput`` long prefill: the fastest blocks of the "long" regime
``memory``     the smallest scratch: of the "long" regime's measured block
               sizes, the one whose byte model (:func:`fa_lab.tools.memory.estimate`)
               is smallest; its time cost against the fastest is shown
=============  ===============================================================

Nothing is invented: with no tuning file for this machine (``python -m fa_lab tune``),
:func:`table` says so (``source = "default, not tuned"``) and falls back to the
kernel's documented default tiles.
"""

from __future__ import annotations

import numbers

import pandas as pd

from fa_lab.tools import tune
from fa_lab.settings import config
from fa_lab.settings.config import num_threads
from fa_lab.tools.memory import estimate

PRESETS = ("latency", "throughput", "memory")


def _sweep_rows(path=None):
    stored = tune.load(path) or {}
    if stored.get("fingerprint") != tune.fingerprint():
        return None, {}
    return stored, stored.get("choices", {}).get("flash", {})


def table(path=None, *, B=1, H=8, N=2048, d=64):
    """The presets as a DataFrame: kernel, blocks, threads, source, the measured median
    of that choice in the tuning sweep, and the modelled peak extra bytes
    (:func:`fa_lab.tools.memory.estimate`, output included) at ``B, H, N, d``."""
    for name, value in (("B", B), ("H", H), ("N", N), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a positive int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")
    stored, choices = _sweep_rows(path)
    rows = []
    for name, regime in (("latency", "decode"), ("throughput", "long"), ("memory", "long")):
        c = choices.get(regime)
        row = {"preset": name, "kernel": "flash", "threads": num_threads()}
        sweeps = (stored or {}).get("sweeps", {}).get("flash", {})
        if name == "memory" and regime in sweeps:
            sweep = pd.DataFrame(sweeps[regime])
            sweep["scratch_bytes"] = [estimate("flash", B, H, N, N, d, block_q=int(r.block_q),
                                               block_kv=int(r.block_kv)).total
                                      for r in sweep.itertuples()]
            best = sweep.sort_values(["scratch_bytes", "median_s"]).iloc[0]
            fastest = sweep["median_s"].min()
            row.update(block_q=int(best.block_q), block_kv=int(best.block_kv),
                       median_s=float(best.median_s),
                       vs_fastest=float(best.median_s / fastest),
                       source=f"tuned ({regime} sweep: smallest scratch)")
        elif c and name != "memory":
            row.update(block_q=c["block_q"], block_kv=c["block_kv"],
                       median_s=float(c.get("median_s", float("nan"))),
                       vs_fastest=1.0, source=f"tuned ({regime}: fastest, {c.get('shape', '?')}"
                                               f"{', quick sweep' if c.get('quick') else ''})")
        else:
            bq = 1 if name == "latency" else config.FLASH_BLOCKS[0]
            row.update(block_q=bq, block_kv=config.FLASH_BLOCKS[1], median_s=float("nan"),
                       vs_fastest=float("nan"), source="default, not tuned" if not c else
                       "default (no sweep stored: run python -m fa_lab tune)")
        row["peak_bytes_model"] = estimate("flash", B, H, N if name != "latency" else 1, N,
                                             d, block_q=row["block_q"],
                                             block_kv=row["block_kv"]).total
        rows.append(row)
    return pd.DataFrame(rows)


def get(name, path=None) -> dict:
    """Keyword arguments for :func:`fa_lab.attention` for preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {PRESETS}, got {name!r}")
    row = table(path).set_index("preset").loc[name]
    return {"kernel": row["kernel"], "block_q": int(row["block_q"]),
            "block_kv": int(row["block_kv"])}
