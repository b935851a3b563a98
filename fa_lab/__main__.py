"""Command line: ``python -m fa_lab {bench, tune, memory, warmup, machine, report, ring}``.

Bad options are usage errors (argparse's message and exit code 2), found before any
work starts: sizes and counts must be positive ints, ``--blocks`` entries ``BQxBK``,
kernel and baseline names known, ``-p`` entries ``NAME=VALUE`` with a Python identifier
as the name, and ``--csv``/``--png``/``--out`` paths writable (a folder that exists or
can be created, not a file). A ``ValueError``/``TypeError`` that the library raises
for a combination of options is reported the same way.
"""

from __future__ import annotations

import argparse
import keyword
import os
import sys
from pathlib import Path

import numba
import numpy as np
import pandas as pd

from fa_lab import KERNELS, viz
from fa_lab.tools import bench, hierarchy, memory, report, ring, tune
from fa_lab.settings.blas import coretype_hint
from fa_lab.tools.bench import features as bench_features
from fa_lab.tools.bench.cpu_targets import cpu_targets
from fa_lab.tools.bench.isolated import TIMING
from fa_lab.tools.warmup import warmup
from fa_lab.tools.lowprec import amx as amx_bench
from fa_lab.tools.lowprec import speed as lowprec
from fa_lab.tools.bench.contenders import torch_module
from fa_lab.settings.machine import describe_machine, machine
from fa_lab.numerics.masks import causal_alignment
from fa_lab.numerics.testing import Case


def _positive_int(text) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def _blocks_spec(text) -> tuple[int, int]:
    """``"128x256"`` -> (128, 256)."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must look like BQxBK (e.g. 128x256), got {text!r}")
    return _positive_int(parts[0]), _positive_int(parts[1])


def _param(text) -> str:
    """``NAME=VALUE`` with a Python identifier as NAME (a notebook parameter)."""
    name, eq, _ = text.partition("=")
    name = name.strip()
    if not eq or not name.isidentifier() or keyword.iskeyword(name):
        raise argparse.ArgumentTypeError(f"must look like NAME=VALUE with NAME a Python "
                                         f"identifier, got {text!r}")
    return text


def _writable(path: Path, what: str) -> None:
    """``path`` (a file or folder to create) can be written: its first existing ancestor
    is a writable folder."""
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent != path and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r}: {str(parent)!r} is a file, "
                                         f"not a folder")
    if not os.access(parent if parent.is_dir() else parent.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r}: {str(parent)!r} is not "
                                         f"writable")


def _output_file(text) -> str:
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file path, got the folder {text!r}")
    _writable(path, "file")
    return text


def _output_dir(text) -> str:
    path = Path(text)
    if not text or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"must be a folder, got {text!r}")
    _writable(path, "folder")
    return text


def _write(df, csv=None, png=None, plot=None) -> None:
    """Write a result table as CSV and its figure (with the machine line) as PNG."""
    if csv:
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(csv, index=False)
        print(f"wrote {csv}")
    if png:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        fig = plot(df)
        viz.footer(fig, describe_machine())
        fig.savefig(png, dpi=120, bbox_inches="tight")
        print(f"wrote {png}")


def _causal(value):
    return {"false": False, "true": True}.get(value.lower(), value) if value else False


def _bench(args) -> int:

    log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    causal = _causal(args.causal)
    kernel = (args.kernels or ["flash"])[0]
    case = Case(B=args.B, H=args.H, H_kv=args.H_kv, Nq=args.N[0], Nk=args.Nk or args.N[0],
                d=args.d)
    dtype = np.dtype(args.dtype)
    plot = None
    if args.sweep == "kernels":
        shapes = [Case(B=args.B, H=args.H, H_kv=args.H_kv, Nq=n, Nk=args.Nk or n, d=args.d)
                  for n in args.N]
        df = bench.run(args.kernels, shapes, causal=causal, dtype=dtype,
                       repeats=args.repeats, block_q=args.block_q, block_kv=args.block_kv,
                       with_baselines=not args.no_baselines, baseline=args.baseline,
                       progress=log)
        cols = ["name", "Nq", "Nk", "causal", "median_s", "q25_s", "q75_s", "gflops",
                f"speedup_vs_{args.baseline}", "max_error"]
        plot = lambda d: viz.plot_ladder(d[d["Nq"] == d["Nq"].iloc[0]])  # noqa: E731
    elif args.sweep == "blocks":
        bq = [b[0] for b in args.blocks]
        bk = sorted({b[1] for b in args.blocks})
        df = bench.sweep_blocks(kernel, case, sorted(set(bq)), bk, causal=causal, dtype=dtype,
                                repeats=args.repeats)
        cols = list(df.columns)
    elif args.sweep == "threads":
        df = bench.thread_scaling(kernel, case, args.threads, causal=causal, dtype=dtype,
                                  repeats=args.repeats)
        cols = list(df.columns)
    elif args.sweep == "decode":
        df = bench.decode_splits(args.B, args.H, args.H_kv, args.Nk or 4096, args.d,
                                 dtype=dtype, repeats=max(args.repeats, 20))
        cols = ["name", "H", "H_kv", "Nk", "median_ms", "q25_ms", "q75_ms", "auto_splits"]
        plot = lambda d: viz.plot_decode([d])  # noqa: E731
    elif args.sweep == "breakdown":
        df = bench.breakdown(case, causal=causal, dtype=dtype, repeats=args.repeats,
                             block_q=args.block_q, block_kv=args.block_kv)
        cols = ["part", "ms", "share", "total_ms", "total_gflops"]
        plot = viz.plot_breakdown
    elif args.sweep == "peak":
        df = bench.matmul_peak(repeats=args.repeats)
        cols = ["name", "shape", "median_s", "q25_s", "q75_s", "gflops"]
    elif args.sweep == "bandwidth":
        df, cols, plot = _bandwidth(args, log)
    elif args.sweep == "targets":
        df = _targets(args, log)
        cols = ["target", "need", "measured", "verdict"]
    elif args.sweep == "features":
        df = bench_features.feature_studies(quick=args.quick, repeats=args.repeats,
                                            progress=log)
        cols = bench_features.COLUMNS
    elif args.sweep in ("int8", "amx"):
        df = _int8(args, log)
        cols = ["what", "detail"]
    elif args.sweep == "cpu":
        df, verdicts = cpu_targets(rounds=args.repeats, progress=log)
        cols = ["case", "fa_lab", "fa_lab_ms", "torch_ms", "ratio", "ratio_low", "ratio_high",
                "budget", "verdict", "others_pct"]
        print("\n".join(str(v) for v in verdicts) + f"\n(timing: {TIMING})")
    else:  # claims
        df = bench.check_speed_claims(kernel=kernel, repeats=args.repeats, progress=log)
        cols = ["claim", "config measured", "standard ms", f"{kernel} ms", "torch_sdpa ms",
                "speedup vs standard", "speedup vs torch_sdpa", "verdict"]
    print(describe_machine())
    if coretype_hint():
        print(f"note: {coretype_hint()}")
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format="%.4g"))
    _write(df, args.csv, args.png if plot else None, plot)
    return 0


def _int8(args, log):
    """The low-precision sweeps (:func:`fa_lab.tools.lowprec.speed.sweep`, or the AMX one,
    :func:`fa_lab.tools.lowprec.amx.sweep`): prints each table, returns the judged targets."""
    mod = lowprec if args.sweep == "int8" else amx_bench
    r = mod.sweep(args.N[0], args.H, args.B, args.d, repeats=args.repeats, progress=log)
    print(mod.format_sweep(r) + "\n\n== targets")
    return mod.targets(r)


def _bandwidth(args, log):
    """Streaming bandwidth over working sets up to --max-mib, with one GB/s per level."""
    levels = hierarchy.data_levels()
    df = hierarchy.bandwidth_sweep(hierarchy.working_sets(hi=args.max_mib * 2 ** 20),
                                   repeats=args.repeats, progress=log)
    print("caches (cpu0):", ", ".join(f"{k} {v // 1024} KiB" for k, v in levels.items()))
    print(hierarchy.level_bandwidths(df, levels)[["level", "threads", "gbps", "points"]]
          .rename(columns={"gbps": "read GB/s"}).to_string(index=False, float_format="%.1f"))
    df["GB/s"] = df["gbps"]
    return df, ["stream", "threads", "ws_bytes", "GB/s"], (
        lambda d: viz.bandwidth_curve(d, levels))


def _targets(args, log):
    """The speed targets, measured side by side in this run and judged."""


    log("fp32 matmul peak")
    peak = bench.matmul_peak(repeats=args.repeats)
    runs = []
    for causal in (False, True):
        log(f"throughput, causal={causal}")
        runs.append(bench.run(["flash"], [Case(B=1, H=8, Nq=n, d=64) for n in (512, 2048)],
                              causal=causal, repeats=args.repeats))
    log("throughput, H=1, N=8192")
    runs.append(bench.run(["flash"], [Case(B=1, H=1, Nq=8192, d=64)],
                          repeats=max(2, args.repeats // 2)))
    decode = []
    for h, hkv in ((1, 1), (8, 8), (32, 8)):
        log(f"decode H={h}, H_kv={hkv}")
        decode.append(bench.decode_splits(1, h, hkv, 4096, 64, repeats=max(20, args.repeats)))
    return bench.targets_table(pd.concat(runs, ignore_index=True), decode, peak)


def _tune(args) -> int:
    df = tune.autotune(args.kernel, args.regimes, quick=args.quick, repeats=args.repeats,
                       progress=lambda m: print(f"[tune] {m}", file=sys.stderr, flush=True))
    print(df[["regime", "block_q", "block_kv", "median_s", "gflops", "chosen"]].to_string(
        index=False, float_format="%.4g"))
    if not args.no_paths:
        paths = tune.tune_paths(quick=args.quick, progress=lambda m: print(
            f"[tune] {m}", file=sys.stderr, flush=True))
        print(paths[["path", "label", "median_s", "q25_s", "q75_s", "chosen"]].to_string(
            index=False, float_format="%.4g"))
    print(f"stored in {tune.tune_path()}; kernel='auto' now uses:")
    print(tune.choices_table().to_string(index=False))
    _write(df, args.csv)
    return 0


def _memory(args) -> int:

    df = memory.sweep(args.kernels, args.N, B=args.B, H=args.H, d=args.d,
                      dtype=np.dtype(args.dtype), causal=args.causal,
                      progress=lambda m: print(f"[memory] {m}", file=sys.stderr, flush=True))
    print(describe_machine())
    show = df[["kernel", "N", "measured_bytes", "model_bytes", "measured_over_model",
               "output_bytes", "measured_over_output"]]
    print(show.to_string(index=False, float_format="%.3f"))
    _write(df, args.csv, args.png, viz.plot_memory_sweep)
    return 0


def _warmup(args) -> int:
    print(f"[warmup] {warmup()}")
    return 0


def _machine(args) -> int:
    for k, v in machine().items():
        print(f"{k:>14}: {v}")
    return 0


def _report(args) -> int:
    return report.main(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa_lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="time kernels side by side (validated first)",
                       description="Benchmarks, every contender validated first. --sweep "
                       "kernels: registry kernels and baselines over --N; blocks: one "
                       "kernel over --blocks; threads: over --threads; decode: flash's "
                       "split-KV choices vs torch at Nq=1; breakdown: where flash's time "
                       "goes; peak: the fp32 matmul peak; claims: data/speed_claims.csv; "
                       "targets: the speed targets, judged; bandwidth: "
                       "streaming GB/s per working set and per cache level; features: "
                       "sliding window vs causal at N=8192, varlen vs padded, paged vs "
                       "contiguous decode (flash-attn's features), judged; int8: peaks "
                       "per precision, the INT8 score micro-kernel vs BLAS tiles, the "
                       "Sage-style kernel vs flash and torch SDPA (causal and not) and its "
                       "accuracy, the low-precision targets judged (use --N 2048 --H 8); "
                       "amx: the same for the AMX kernels vs torch SDPA bf16/fp32 (AMX "
                       "CPUs); cpu: fa_lab vs torch SDPA at the speed targets' shapes, "
                       "each side in its own process, judged.")
    b.add_argument("--sweep", default="kernels",
                   choices=["kernels", "blocks", "threads", "decode", "breakdown", "peak",
                            "claims", "targets", "bandwidth", "features", "int8", "amx",
                            "cpu"])
    b.add_argument("--kernels", nargs="+", default=None,
                   help="registry names (default: every kernel but the reference; the "
                   "other sweeps use the first, default flash)")
    b.add_argument("--B", type=_positive_int, default=1)
    b.add_argument("--H", type=_positive_int, default=8)
    b.add_argument("--H-kv", type=_positive_int, default=None, help="kv heads (GQA; default: H)")
    b.add_argument("--N", type=_positive_int, nargs="+", default=[1024], help="query lengths")
    b.add_argument("--Nk", type=_positive_int, default=None, help="key length (default: N)")
    b.add_argument("--d", type=_positive_int, default=64)
    b.add_argument("--causal", nargs="?", const="true", default=None,
                   help="causal mask: --causal (top-left) or --causal bottom_right")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.add_argument("--block-q", type=_positive_int, default=None)
    b.add_argument("--block-kv", type=_positive_int, default=None)
    b.add_argument("--blocks", nargs="+", type=_blocks_spec,
                   default=[(128, 256), (256, 256), (256, 512)],
                   metavar="BQxBK", help="tile sizes for --sweep blocks")
    b.add_argument("--threads", type=_positive_int, nargs="+", default=None,
                   help="thread counts for --sweep threads (default 1..all)")
    b.add_argument("--max-mib", type=int, default=256,
                   help="largest working set of --sweep bandwidth (MiB)")
    b.add_argument("--baseline", default="numpy_standard",
                   help="contender the speedup column is relative to (e.g. torch_sdpa)")
    b.add_argument("--quick", action="store_true",
                   help="small shapes (--sweep features), for a smoke run")
    b.add_argument("--no-baselines", action="store_true",
                   help="skip the NumPy and torch baselines")
    b.add_argument("--csv", type=_output_file, default=None,
                   help="write the table here (e.g. data/bench.csv)")
    b.add_argument("--png", type=_output_file, default=None, help="write the chart here")
    b.set_defaults(func=_bench)

    t = sub.add_parser("tune", help="autotune block sizes and measure the decode and INT8 "
                       "paths; kernel='auto' then uses them")
    t.add_argument("--kernel", default="flash")
    t.add_argument("--regimes", nargs="+", default=None, help="decode short long (default all)")
    t.add_argument("--quick", action="store_true", help="small shapes, 2 candidates per axis")
    t.add_argument("--repeats", type=_positive_int, default=3)
    t.add_argument("--csv", type=_output_file, default=None, help="also write the sweep here")
    t.add_argument("--no-paths", action="store_true",
                   help="skip measuring the decode and INT8 paths (tune.tune_paths)")
    t.set_defaults(func=_tune)

    mem = sub.add_parser("memory", help="measured peak memory vs the byte model, over N")
    mem.add_argument("--kernels", nargs="+", default=None, help="registry names (default: all)")
    mem.add_argument("--N", type=_positive_int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    mem.add_argument("--B", type=_positive_int, default=1)
    mem.add_argument("--H", type=_positive_int, default=1)
    mem.add_argument("--d", type=_positive_int, default=64)
    mem.add_argument("--causal", action="store_true")
    mem.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    mem.add_argument("--csv", type=_output_file, default=None)
    mem.add_argument("--png", type=_output_file, default=None)
    mem.set_defaults(func=_memory)

    w = sub.add_parser("warmup", help="compile every kernel into numba's cache")
    w.set_defaults(func=_warmup)

    m = sub.add_parser("machine", help="describe this machine")
    m.set_defaults(func=_machine)

    r = sub.add_parser("report", help="run every notebook and write reports/index.html")
    r.add_argument("--quick", action="store_true", help="small sizes (as CI runs them)")
    r.add_argument("--out", type=_output_dir, default="reports", help="output folder")
    r.add_argument("--only", nargs="+", default=None, help="notebook names to run")
    r.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   type=_param,
                   help="a papermill parameter for every notebook (repeatable)")
    r.add_argument("--results-dir", type=_output_dir, default=None,
                   help="where figures/ and data/ are written (default: the output "
                   "folder; `make curate` passes the repository root to refresh the "
                   "curated results of docs/RESULTS.md)")
    r.set_defaults(func=_report)

    g = ring.add_parser(sub, _positive_int, _output_file)

    args = p.parse_args(argv)
    parser = {"bench": b, "tune": t, "memory": mem, "warmup": w, "machine": m,
              "report": r, "ring": g}[args.cmd]
    problem = _check(args)
    if problem:
        parser.error(problem)  # exits with 2, before any work
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError) as e:  # a bad option combination
        parser.error(str(e))


def _check(args) -> str | None:
    """Cross-option checks argparse cannot express (before any work starts)."""
    for name in getattr(args, "kernels", None) or []:
        if name not in KERNELS:
            return f"--kernels: unknown kernel {name!r}; known: {sorted(KERNELS)}"
    if args.cmd == "bench":
        try:
            causal_alignment(_causal(args.causal))
        except ValueError:
            return (f"--causal must be true, false, top_left or bottom_right, got "
                    f"{args.causal!r}")
        if args.H_kv and args.H % args.H_kv:
            return f"--H {args.H} must be a multiple of --H-kv {args.H_kv}"
        if args.sweep == "kernels":
            names = set(args.kernels or [k for k in KERNELS if k != "reference"])
            if not args.no_baselines:
                names.add("numpy_standard")
                if torch_module() is not None:
                    names.add("torch_sdpa")
            if args.baseline not in names:
                return (f"--baseline must be one of the contenders {sorted(names)}, got "
                        f"{args.baseline!r}")
        if args.threads:
            most = numba.config.NUMBA_NUM_THREADS
            if max(args.threads) > most:
                return f"--threads: at most {most} (NUMBA_NUM_THREADS), got {max(args.threads)}"
    if args.cmd == "tune":
        tiled = sorted(k for k in KERNELS if KERNELS[k].tiled)
        if args.kernel not in tiled:
            return f"--kernel must be a tiled kernel {tiled}, got {args.kernel!r}"
        known = [r.name for r in tune.REGIMES]
        for r in args.regimes or []:
            if r not in known:
                return f"--regimes: unknown regime {r!r}; known: {known}"
    if args.cmd == "ring":
        return ring.check_options(args)
    if args.cmd == "report" and args.only:
        nb_dir = report.REPO / "notebooks"
        for n in args.only:
            if not (nb_dir / f"{n}.ipynb").exists():
                known = sorted(p.stem for p in nb_dir.glob("*.ipynb"))
                return f"--only: unknown notebook {n!r} (not in {nb_dir}); known: {known}"
    return None


if __name__ == "__main__":
    sys.exit(main())
