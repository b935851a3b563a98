"""The matrix engine, measured: AMX tile peaks next to the zmm ones (lesson 10), where an
AMX attention call's time goes, and the AMX kernels against PyTorch's SDPA in bf16 and
fp32 with their targets judged (``python -m fa_lab bench --sweep amx --N 2048 --H 8``).

PyTorch is timed in its own process (:func:`torch_times`): its OpenMP workers keep
spinning after each call and would take the cores from whatever runs next in the same
process. Its process runs before and after fa_lab's timing window and the two sets of
samples are pooled (drift between the windows shows up as spread). Every fa_lab timing
goes through :func:`fa_lab.time_calls`, every verdict through
:func:`fa_lab.numerics.verdict.judge` (quartile ranges; ``inconclusive`` under load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from fa_lab.settings import cpu_features
from fa_lab.tools.lowprec import study as int8_study
from fa_lab.numerics import reference, verdict
from fa_lab.numerics.checks import check_choice
from fa_lab.tools.lowprec import speed as lowprec
from fa_lab.tools.bench.harness import Contender, flops, time_calls
from fa_lab.api import attention, prepare
from fa_lab.settings.config import num_threads
from fa_lab.features.int8 import attention_int8, quantize_inputs
from fa_lab.kernels.probes import peaks as peak_loops
from fa_lab.kernels.probes.assembly import assembly
from fa_lab.registry import BF16_KERNELS, INT8_KERNELS

#: The targets: bf16 ``attention`` vs torch SDPA bf16, its error vs torch bf16's (at
#: most this many times), INT8 vs torch bf16 and vs torch fp32; cosine as lesson 10.
TARGET_BF16_VS_TORCH_BF16, TARGET_BF16_ERROR = 1.0, 2.0
TARGET_INT8_VS_TORCH_BF16, TARGET_INT8_VS_TORCH_FP32 = 1.5, 4.0

#: The two AMX paths of :func:`breakdown` and :func:`ablation`.
PATHS = ("int8", "bf16")

#: The parts of :func:`breakdown`, in the kernel's order.
PARTS = ["prepare inputs", "pack Q, K, V", "loops, epilogue", "Q K^T (tiles)",
         "softmax (fp32 zmm)", "P V (tiles)"]


def unavailable() -> str | None:
    """Why this machine cannot run the AMX measurements (None if it can)."""
    return cpu_features.amx_unavailable()


def peaks(*, repeats=5, steps=2_000_000, threads=None):
    """G op/s of the register-resident tile loop (:func:`fa_lab.kernels.probes.peaks.amx_peak_call`,
    2 x 2 accumulator tiles) for INT8 (``tdpbssd``) and BF16 (``tdpbf16ps``) on 1 thread and
    on ``threads`` (default: numba's), in the columns of :func:`fa_lab.tools.lowprec.speed.peaks`."""
    import pandas as pd

    why = unavailable()  # also asks Linux for the tile state (else SIGILL)
    if why:
        raise NotImplementedError(why)
    threads = sorted({1, threads or num_threads()})
    cs, meta = [], {}
    for prec, instr in (("int8", "tdpbssd"), ("bf16", "tdpbf16ps")):
        for t in threads:
            name = f"amx {prec} t{t}"
            fn, ops = peak_loops.amx_peak_call(prec, t, steps)
            cs.append(Contender(name, fn, "kernel"))
            meta[name] = (f"amx {prec}", instr, t, ops)
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    rows = [{"precision": p, "instruction": i, "threads": t, **times.summary(n, ops)}
            for n, (p, i, t, ops) in meta.items()]
    return pd.DataFrame(rows).rename(columns={"gflops": "gops"})


def instructions():
    """The tile instructions in the assembly of fresh compilations of the tile product
    (:data:`fa_lab.kernels.probes.peaks.amx_tile_product`) and of the attention driver
    (:func:`fa_lab.kernels.lowprec.amx.amx_forward`, compiled for its first signature: call a
    kernel once first). Rows: ``function, instruction, count``."""
    import re

    import pandas as pd

    why = unavailable()
    if why:
        raise NotImplementedError(why)
    rows = []
    for fn in (peak_loops.amx_tile_product, INT8_KERNELS["amx"].driver):
        asm = assembly(fn) if fn.signatures else ""  # not compiled yet: nothing to read
        for ins in ("ldtilecfg", "tileloadd", "tdpbssd", "tdpbusd", "tdpbf16ps",
                    "tilestored", "tilerelease"):
            rows.append({"function": fn.__name__, "instruction": ins,
                         "count": len(re.findall(rf"\b{ins}\b", asm))})
    return pd.DataFrame(rows)


def _inputs(B, H, N, d, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))


def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def _validated(path, N, H, B, d, causal, seed):
    """One AMX path's call on :func:`_inputs`, packed once and checked against float64
    (cosine >= 0.999, else nothing is timed): ``(staged, prep)``, ``staged(stage)`` the
    registry's runner stopped at a :class:`~fa_lab.kernels.common.Stage` (as an int) and
    ``prep()`` the preparation it skips (INT8: quantizing Q and K; bf16: widening)."""
    check_choice("path", path, PATHS)
    q, k, v = _inputs(B, H, N, d, seed)
    call = prepare(q, k, v, causal=causal)
    kernel = INT8_KERNELS["amx"] if path == "int8" else BF16_KERNELS["amx"]
    bq, bk = kernel.default_blocks
    if path == "int8":
        def prep():
            return quantize_inputs(call.q4, call.k4, "per_block", bq, bk, True)
        arrays, extra = (*prep()[:4], call.v4), {"pv_dtype": "bfloat16"}
    else:
        wide = [x.astype(_bf16()) for x in (q, k, v)]

        def prep():
            return [x.astype(np.float32) for x in wide]
        arrays, extra = tuple(prep()), {}

    def staged(stage):
        return kernel.run(arrays, call.bias, call.scale, call.alignment, bq, bk, stage=stage,
                          **extra)
    cos = int8_study.metrics(staged(3)[0], reference.attention(q, k, v, causal=causal)[0])
    if not cos["cosine"] >= 0.999:
        raise AssertionError(f"amx {path}: cosine {cos['cosine']:.6f} < 0.999, not timed")
    return staged, prep


def breakdown(N=2048, H=8, B=1, d=64, *, causal=False, path="int8", repeats=7, seed=1):
    """Where an AMX call's time goes (all threads): preparing the inputs (INT8: quantizing
    Q and K; bf16: widening the bf16 arrays), packing, then the driver stopped after each
    stage through the registry's runner (``stage``): loops, score tiles, softmax, ``P
    V`` tiles. Stage times are differences of interleaved medians. Rows: ``part, ms,
    share, gops`` (the products: half of the call's operations each)."""
    import pandas as pd

    staged, prep = _validated(path, N, H, B, d, causal, seed)
    cs = [Contender("prepare", prep, "kernel")]
    cs += [Contender(f"stage{s}", lambda _s=s: staged(_s), "kernel") for s in range(-1, 4)]
    times = time_calls(cs, (), repeats=repeats, warmup=1, cooldown=0)
    med = {c.name: float(np.median(times[c.name])) for c in cs}
    st = [med[f"stage{s}"] for s in range(-1, 4)]
    parts = [med["prepare"], st[0]] + [st[i + 1] - st[i] for i in range(4)]
    total = med["prepare"] + st[-1]
    half = flops(B, H, N, N, d, causal) / 2
    rows = []
    for name, t in zip(PARTS, parts):
        row = {"path": path, "causal": bool(causal), "part": name, "ms": t * 1e3,
               "share": t / total, "total_ms": total * 1e3}
        if "tiles" in name:
            row["gops"] = half / t / 1e9 if t > 0 else float("nan")
        rows.append({**row, **times.load.columns()})
    return pd.DataFrame(rows)


_TORCH_CODE = r"""
import json, sys
import numpy as np, torch
from fa_lab.numerics import reference
from fa_lab.tools.bench.harness import Contender, time_calls
B, H, N, d, causal, repeats, seed = json.loads(sys.argv[1])
rng = np.random.default_rng(seed)
q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
F = torch.nn.functional
def sdpa(dtype):
    t = [torch.from_numpy(x).to(dtype) for x in (q, k, v)]
    def run():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*t, is_causal=causal)
    return run
cs = [Contender("torch bf16", sdpa(torch.bfloat16), "baseline"),
      Contender("torch fp32", sdpa(torch.float32), "baseline")]
wide = [torch.from_numpy(x).to(torch.bfloat16).double().numpy() for x in (q, k, v)]
exact = reference.attention(*wide, causal=causal)[0]
err = float(np.abs(cs[0].fn().double().numpy() - exact).max())
times = time_calls(cs, (), repeats=repeats, warmup=1)
print(json.dumps({"samples": dict(times), "bf16_error": err,
                  "load": times.load.columns() if times.load is not None else {},
                  "threads": torch.get_num_threads(), "version": torch.__version__}))
"""


#: The ablations of :func:`ablation`: (name, stage), the stage as the kernel's plain int
#: (:class:`~fa_lab.kernels.common.Stage`: FULL, NO_EXP, NO_MAX, NO_SOFTMAX).
ABLATIONS = [("whole kernel", 3), ("without the exp pass", 4), ("without the max pass", 5),
             ("without the softmax", 6)]


def ablation(N=2048, H=8, B=1, d=64, *, causal=False, path="int8", repeats=7, seed=1):
    """Is the softmax's arithmetic the wall? The whole kernel (packed once, inputs
    prepared) timed interleaved with itself minus the exp pass, minus the max pass, and
    minus both (outputs then invalid: timing only). A stage difference (:func:`breakdown`)
    charges the softmax with everything that happens while it runs, such as waiting
    for the tile-stored scores; removing one pass at a time shows what the arithmetic
    itself costs. Rows: ``path, causal, variant, ms`` (median), ``q25_ms, q75_ms``,
    ``saved`` (the fraction of the whole kernel's median the variant saves) and the
    load. Validated first (cosine >= 0.999), as :func:`breakdown`."""
    import pandas as pd

    staged, _ = _validated(path, N, H, B, d, causal, seed)
    cs = [Contender(name, lambda st=st: staged(st), "kernel") for name, st in ABLATIONS]
    times = time_calls(cs, (), repeats=repeats, warmup=1, cooldown=0)
    med = {c.name: float(np.median(times[c.name])) for c in cs}
    whole = med["whole kernel"]
    return pd.DataFrame([{"path": path, "causal": bool(causal), "variant": name,
                          "ms": med[name] * 1e3,
                          "q25_ms": float(np.percentile(times[name], 25)) * 1e3,
                          "q75_ms": float(np.percentile(times[name], 75)) * 1e3,
                          "saved": 1 - med[name] / whole, **times.load.columns()}
                         for name, _ in ABLATIONS])


def torch_times(B, H, N, d, causal, repeats=7, seed=1) -> dict | None:
    """Torch SDPA (bf16 and fp32) timed in a fresh process (its default threads; inputs
    from the same seed as :func:`speed`'s): ``{"samples": {name: [s]}, "bf16_error":
    max |torch bf16 - float64 reference on the bf16-rounded inputs|, "load", "threads",
    "version"}``, or None without torch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    r = subprocess.run([sys.executable, "-c", _TORCH_CODE,
                        json.dumps([B, H, N, d, bool(causal), repeats, seed])],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        if "No module named 'torch'" in r.stderr:
            return None
        raise RuntimeError(f"torch timing process failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def speed(N=2048, H=8, B=1, d=64, *, causal=False, repeats=7, seed=1):
    """The AMX kernels (INT8 with quantization; bf16 ``attention`` on bfloat16 arrays)
    and ``sage`` (bf16 ``P V``) timed interleaved in this process, torch SDPA (bf16, fp32)
    in its own process before and after (:func:`torch_times`). Validated first (cosine >=
    0.999 for INT8; the bf16 error is reported). Returns ``(rows, verdicts)``."""
    import pandas as pd

    bf16 = _bf16()
    q, k, v = _inputs(B, H, N, d, seed)
    qb, kb, vb = (x.astype(bf16) for x in (q, k, v))
    cs = [Contender("amx int8", lambda: attention_int8(q, k, v, causal=causal, kernel="amx",
                                                       pv_dtype="bfloat16"), "kernel"),
          Contender("amx bf16", lambda: attention(qb, kb, vb, causal=causal, kernel="amx"),
                    "kernel"),
          Contender("sage bf16 P V", lambda: attention_int8(q, k, v, causal=causal,
                                                            kernel="sage",
                                                            pv_dtype="bfloat16"), "kernel")]
    ref = reference.attention(q, k, v, causal=causal)[0]
    for c in (cs[0], cs[2]):
        cos = int8_study.metrics(c.fn(), ref)["cosine"]
        if not cos >= 0.999:
            raise AssertionError(f"{c.name}: cosine {cos:.6f} < 0.999, not timed")
    exact_b = reference.attention(*(x.astype(np.float64) for x in (qb, kb, vb)),
                                  causal=causal)[0]
    amx_err = float(np.abs(cs[1].fn().astype(np.float64) - exact_b).max())
    before = torch_times(B, H, N, d, causal, repeats, seed)
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    after = torch_times(B, H, N, d, causal, repeats, seed) if before else None
    work = flops(B, H, N, N, d, causal)
    rows = [{"name": c.name, "process": "this", "causal": bool(causal),
             **times.summary(c.name, work)} for c in cs]
    samples = {}
    if before:
        for name in before["samples"]:
            samples[name] = before["samples"][name] + after["samples"][name]
            q25, med, q75 = verdict.quartiles(samples[name])
            rows.append({"name": name, "process": f"own (torch {before['version']}, "
                         f"{before['threads']} threads)", "causal": bool(causal),
                         "median_s": med, "q25_s": q25, "q75_s": q75,
                         "repeats": len(samples[name]), "gflops": work / med / 1e9,
                         **{f"torch_{k_}": v_ for k_, v_ in after["load"].items()}})
    df = pd.DataFrame(rows)
    df["error_vs_float64"] = [float("nan"), amx_err, float("nan")] + (
        [max(before["bf16_error"], after["bf16_error"]), float("nan")] if before else [])
    tag = "causal" if causal else "not causal"
    verdicts = []
    if before:
        for mine, theirs, need in (("amx bf16", "torch bf16", TARGET_BF16_VS_TORCH_BF16),
                                   ("amx int8", "torch bf16", TARGET_INT8_VS_TORCH_BF16),
                                   ("amx int8", "torch fp32", TARGET_INT8_VS_TORCH_FP32)):
            lo, val, hi = verdict.ratio_range(samples[theirs], times[mine])
            verdicts.append(verdict.judge(f"{mine} vs SDPA {theirs} ({tag}, B={B} H={H} "
                                          f"N={N} d={d})", val, need, low=lo, high=hi,
                                          load=times.load))
        verdicts.append(verdict.judge(
            f"amx bf16 max error vs float64, in units of torch bf16's ({tag})",
            amx_err / before["bf16_error"], TARGET_BF16_ERROR, at_least=False))
    return df, verdicts


def sweep(N=2048, H=8, B=1, d=64, *, repeats=7, progress=print):
    """Everything in one run: peaks (zmm, from :func:`fa_lab.tools.lowprec.speed.peaks`, and
    AMX), speed against torch (causal and not), the breakdown of both paths, accuracy
    (Gaussian, ``k + 3 z_c``, all-MiniLM-L6-v2). Returns ``{"peaks", "speed",
    "breakdown", "accuracy", "minilm", "targets"}`` (DataFrames); raises
    ``NotImplementedError`` (with the reason) without AMX."""
    import pandas as pd

    why = unavailable()
    if why:
        raise NotImplementedError(why)
    progress("peaks: zmm loops and AMX tiles")
    pk = pd.concat([lowprec.peaks(repeats=repeats), peaks(repeats=repeats)],
                   ignore_index=True)
    speeds, verdicts = [], []
    for causal in (False, True):
        progress(f"speed against torch, causal={causal}")
        df, vs = speed(N, H, B, d, causal=causal, repeats=repeats)
        speeds.append(df)
        verdicts += vs
    progress("where the time goes")
    parts = pd.concat([breakdown(N, H, B, d, causal=c, path=p, repeats=repeats)
                       for p in ("int8", "bf16") for c in (False, True)], ignore_index=True)
    progress("accuracy")
    accs = [lowprec.accuracy(N, H, d, causal=c, kernel="amx", pv_dtypes=("bfloat16",))
            for c in (False, True)]
    verdicts += [v for _, vs in accs for v in vs]
    progress("accuracy on all-MiniLM-L6-v2")
    try:
        real, vs = lowprec.minilm_long(kernel="amx", pv_dtypes=("bfloat16",))
        verdicts += vs
    except ImportError as e:  # the weights are an optional package
        real = pd.DataFrame([{"text": f"skipped: {e}"}])
    return {"peaks": pk, "speed": pd.concat(speeds, ignore_index=True), "breakdown": parts,
            "accuracy": pd.concat([a for a, _ in accs], ignore_index=True), "minilm": real,
            "targets": pd.DataFrame([v.row() for v in verdicts])}


_SHOW = {"peaks": ["precision", "instruction", "threads", "gops", "median_s", "others_pct"],
         "speed": ["name", "process", "causal", "median_s", "q25_s", "q75_s", "gflops",
                   "error_vs_float64", "others_pct", "torch_others_pct"],
         "breakdown": ["path", "causal", "part", "ms", "share", "gops", "others_pct"],
         "accuracy": ["data", "causal", "pv_dtype", "cosine", "rel_l1", "max_error"],
         "minilm": ["text", "tokens", "layer", "cosine", "rel_l1", "max_error"]}


def format_sweep(r) -> str:
    """The tables of :func:`sweep` as text, each with its load."""
    import pandas as pd

    lines = []
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        for key, cols in _SHOW.items():
            load = lowprec.load_note(r[key]) if key in ("peaks", "breakdown") else (
                "see others_pct" if key == "speed" else "not timed")
            lines += [f"\n== {key} (load: {load})",
                      r[key][[c for c in cols if c in r[key]]].to_string(
                          index=False, float_format="{:.4g}".format)]
    return "\n".join(lines)


def targets(r):
    """Every judged target of :func:`sweep`: ``what``, ``status``, ``detail``."""
    return r["targets"]
