"""The speed targets on every CPU: fa_lab against PyTorch's CPU SDPA (float32), each side
timed in its own process (:func:`fa_lab.tools.bench.isolated.time_isolated`), judged by
:mod:`fa_lab.numerics.verdict` on the quartile range of the ratio.

``python -m fa_lab bench --sweep cpu`` prints the table. B = 1, d = 64 throughout.
"""

from __future__ import annotations

import numpy as np

from fa_lab.api import plan
from fa_lab.features.int8 import plan_int8
from fa_lab.features.kvcache import plan_kvcache
from fa_lab.numerics import verdict
from fa_lab.numerics.testing import Case
from fa_lab.settings.machine import describe_machine
from fa_lab.tools.bench.isolated import TIMING, time_isolated

FACTORY = "fa_lab.tools.bench.isolated:attention_call"

#: ``(case, shape keywords, fa_lab's contender keywords, budget: fa_lab >= budget x torch)``;
#: the decode rows run fa_lab's decode API (``attention_with_kvcache``, ``kernel="auto"``:
#: the kernel and splits measured fastest here once ``python -m fa_lab tune`` ran), and
#: ``attention`` (``kernel="auto"``: ``flash`` with the measured key splits) beside it; the
#: low-precision rows the fastest INT8 path this CPU has (``attention_int8``'s
#: ``kernel="auto"`` with a bf16 ``P V``: the measured choice, else AMX tiles where the
#: CPU has them, else ``sage``).
TARGETS = [
    ("H=8 N=512", dict(H=8, Nq=512), dict(kernel="flash"), 1.0),
    ("H=8 N=2048", dict(H=8, Nq=2048), dict(kernel="flash"), 1.0),
    ("H=8 N=2048 causal", dict(H=8, Nq=2048, causal=True), dict(kernel="flash"), 1.0),
    ("H=1 N=8192", dict(H=1, Nq=8192), dict(kernel="flash"), 1.0),
    ("decode Nk=4096 H=8", dict(H=8, Nq=1, Nk=4096), dict(kernel="kvcache"), 1.0),
    ("decode Nk=4096 H=32, 8 kv heads", dict(H=32, H_kv=8, Nq=1, Nk=4096),
     dict(kernel="kvcache"), 1.0),
    ("decode Nk=4096 H=8, attention()", dict(H=8, Nq=1, Nk=4096), dict(kernel="auto"), 1.0),
    ("decode Nk=4096 H=32, 8 kv heads, attention()", dict(H=32, H_kv=8, Nq=1, Nk=4096),
     dict(kernel="auto"), 1.0),
    ("low precision H=8 N=2048", dict(H=8, Nq=2048),
     dict(kernel="int8", pv_dtype="bfloat16"), 2.0),
    ("low precision H=8 N=2048 causal", dict(H=8, Nq=2048, causal=True),
     dict(kernel="int8", pv_dtype="bfloat16"), 2.0),
]


def cpu_targets(*, cases=None, rounds=5, calls=3, gap_s=0.3, progress=None):
    """One row per target (all of :data:`TARGETS`, or those whose case is in ``cases``):
    both medians (ms), the ratio torch / fa_lab with its quartile range, the budget, the
    verdict, how it was timed and the load. Returns ``(DataFrame, [Verdict])``."""
    import pandas as pd

    rows, verdicts = [], []
    for case, shape, mine, budget in TARGETS:
        if cases is not None and case not in cases:
            continue
        if progress:
            progress(f"{case}: fa_lab {mine['kernel']} and torch SDPA, each in its own process")
        times = time_isolated({"fa_lab": (FACTORY, {**shape, **mine}),
                               "torch_sdpa": (FACTORY, {**shape, "kernel": "torch_sdpa"})},
                              rounds=rounds, calls=calls, gap_s=gap_s)
        low, mid, high = times.ratio("torch_sdpa", "fa_lab")
        name = mine["kernel"]
        if name == "int8":  # the kernel auto picks here, by name
            p = plan_int8(*Case(B=1, H=1, Nq=8, d=8).inputs(np.float32),
                          pv_dtype=mine["pv_dtype"])
            name = f"int8 {p['kernel']} ({p['pv_dtype']} P V)"
        elif name == "kvcache":
            q, k, v = Case(B=1, **shape).inputs(np.float32)
            p = plan_kvcache(q, k, v)
            s = p["splits"]
            name = f"kvcache {p['kernel']}" + (f", {s} split{'s' if s > 1 else ''}" if s else "")
        elif name == "auto":
            q, k, v = Case(B=1, **shape).inputs(np.float32)
            p = plan(q, k, v)
            name = f"attention {p['kernel']}, {p['splits']} split{'s' if p['splits'] > 1 else ''}"
        v = verdict.judge(f"{case}: fa_lab {name} vs torch SDPA fp32", mid, budget, low=low,
                          high=high, load=times.load)
        verdicts.append(v)
        rows.append({"case": case, "fa_lab": name,
                     "fa_lab_ms": times.ms("fa_lab")["median_ms"],
                     "torch_ms": times.ms("torch_sdpa")["median_ms"],
                     "ratio": mid, "ratio_low": low, "ratio_high": high, "budget": budget,
                     "verdict": v.status, "timing": TIMING, **times.load.columns(),
                     "machine": describe_machine()})
    return pd.DataFrame(rows), verdicts
