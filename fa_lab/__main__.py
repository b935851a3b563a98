"""Command line: ``python -m fa_lab {bench, tune, memory, warmup, machine, report}``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _write(df, csv=None, png=None, plot=None) -> None:
    """Write a result table as CSV and its figure (with the machine line) as PNG."""
    if csv:
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(csv, index=False)
        print(f"wrote {csv}")
    if png:
        from fa_lab.bench import describe_machine
        from fa_lab.viz import footer

        Path(png).parent.mkdir(parents=True, exist_ok=True)
        fig = plot(df)
        footer(fig, describe_machine())
        fig.savefig(png, dpi=120, bbox_inches="tight")
        print(f"wrote {png}")


def _causal(value):
    return {"false": False, "true": True}.get(value.lower(), value) if value else False


def _bench(args) -> int:
    import numpy as np

    from fa_lab import bench
    from fa_lab.testing import Case

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
        plot = lambda d: bench.plot_ladder(d[d["Nq"] == d["Nq"].iloc[0]])  # noqa: E731
    elif args.sweep == "blocks":
        bq = [int(b.split("x")[0]) for b in args.blocks]
        bk = sorted({int(b.split("x")[1]) for b in args.blocks})
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
        plot = lambda d: bench.plot_decode([d])  # noqa: E731
    elif args.sweep == "breakdown":
        df = bench.breakdown(case, causal=causal, dtype=dtype, repeats=args.repeats,
                             block_q=args.block_q, block_kv=args.block_kv)
        cols = ["part", "ms", "share", "total_ms", "total_gflops"]
        plot = bench.plot_breakdown
    elif args.sweep == "peak":
        df = bench.matmul_peak(repeats=args.repeats)
        cols = ["name", "shape", "median_s", "q25_s", "q75_s", "gflops"]
    elif args.sweep == "bandwidth":
        df, cols, plot = _bandwidth(args, log)
    elif args.sweep == "targets":
        df = _targets(args, log)
        cols = ["target", "need", "measured", "verdict"]
    else:  # claims
        df = bench.check_speed_claims(kernel=kernel, repeats=args.repeats, progress=log)
        cols = ["claim", "config measured", "standard ms", f"{kernel} ms", "torch_sdpa ms",
                "speedup vs standard", "speedup vs torch_sdpa", "verdict"]
    print(bench.describe_machine())
    from fa_lab._blas import coretype_hint

    if coretype_hint():
        print(f"note: {coretype_hint()}")
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format="%.4g"))
    _write(df, args.csv, args.png if plot else None, plot)
    return 0


def _bandwidth(args, log):
    """Streaming bandwidth over working sets up to --max-mib, with one GB/s per level."""
    from fa_lab import hierarchy, viz

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
    """The performance issue's targets, measured side by side in this run and judged."""
    import pandas as pd

    from fa_lab import bench
    from fa_lab.testing import Case

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
    from fa_lab import tune

    df = tune.autotune(args.kernel, args.regimes, quick=args.quick, repeats=args.repeats,
                       progress=lambda m: print(f"[tune] {m}", file=sys.stderr, flush=True))
    print(df[["regime", "block_q", "block_kv", "median_s", "gflops", "chosen"]].to_string(
        index=False, float_format="%.4g"))
    print(f"stored in {tune.tune_path()}; kernel='auto' now uses:")
    print(tune.choices_table().to_string(index=False))
    _write(df, args.csv)
    return 0


def _memory(args) -> int:
    import numpy as np

    from fa_lab import bench, memory

    df = memory.sweep(args.kernels, args.N, B=args.B, H=args.H, d=args.d,
                      dtype=np.dtype(args.dtype), causal=args.causal,
                      progress=lambda m: print(f"[memory] {m}", file=sys.stderr, flush=True))
    print(bench.describe_machine())
    show = df[["kernel", "N", "measured_bytes", "model_bytes", "measured_over_model",
               "output_bytes", "measured_over_output"]]
    print(show.to_string(index=False, float_format="%.3f"))
    _write(df, args.csv, args.png, memory.plot_sweep)
    return 0


def _warmup(args) -> int:
    """Compile (or load from numba's cache) every kernel for every dtype and option path."""
    import numpy as np

    from fa_lab import BACKWARD_KERNELS, KERNELS, attention, attention_backward

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        q = rng.standard_normal((1, 2, 5, 3)).astype(dtype)
        kv = rng.standard_normal((1, 1, 4, 3)).astype(dtype)
        masks = [None, np.ones((5, 4), bool), np.ones((1, 2, 5, 4), bool)]
        for mask in masks:
            for name in KERNELS:
                attention(q, kv, kv, kernel=name, mask=mask, causal=True)
            out, lse = attention(q, kv, kv, mask=mask, return_lse=True)
            for name in BACKWARD_KERNELS:
                attention_backward(q, kv, kv, out, lse, out, mask=mask, kernel=name)
        # flash's split-KV (Flash-Decoding) driver: one query row against 1100 keys
        q1 = rng.standard_normal((1, 1, 1, 3)).astype(dtype)
        kv1 = rng.standard_normal((1, 1, 1100, 3)).astype(dtype)
        for mask in [None, np.ones((1, 1100), bool), np.ones((1, 1, 1, 1100), bool)]:
            attention(q1, kv1, kv1, kernel="flash", mask=mask, causal="bottom_right")
        # INT8 kernels (the int8 inputs and per-row scales have one type per dtype)
        from fa_lab import INT8_KERNELS, attention_int8

        for mask in masks:
            for name in INT8_KERNELS:
                attention_int8(q, kv, kv, kernel=name, mask=mask, causal=True)
        # top-K retrieval's merge (one type per dtype)
        from fa_lab import topk_attention

        topk_attention(q[0, 0], kv[0, 0], k=2)
    # the memory-hierarchy micro-kernels (lesson 09)
    from fa_lab import hierarchy

    hierarchy.bandwidth_sweep([4096], repeats=1, target_bytes=4096)
    hierarchy.fma_peak(repeats=1, steps=10)
    from fa_lab import INT8_KERNELS

    n = len(KERNELS) + len(BACKWARD_KERNELS) + len(INT8_KERNELS)
    print(f"[warmup] {n} kernels ready in {time.perf_counter() - t0:.1f} s")
    return 0


def _machine(args) -> int:
    from fa_lab.bench import machine

    for k, v in machine().items():
        print(f"{k:>14}: {v}")
    return 0


def _report(args) -> int:
    from fa_lab import report

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
                       "targets: the performance issue's targets, judged; bandwidth: "
                       "streaming GB/s per working set and per cache level.")
    b.add_argument("--sweep", default="kernels",
                   choices=["kernels", "blocks", "threads", "decode", "breakdown", "peak",
                            "claims", "targets", "bandwidth"])
    b.add_argument("--kernels", nargs="+", default=None,
                   help="registry names (default: every kernel but the reference; the "
                   "other sweeps use the first, default flash)")
    b.add_argument("--B", type=int, default=1)
    b.add_argument("--H", type=int, default=8)
    b.add_argument("--H-kv", type=int, default=None, help="kv heads (GQA; default: H)")
    b.add_argument("--N", type=int, nargs="+", default=[1024], help="query lengths")
    b.add_argument("--Nk", type=int, default=None, help="key length (default: N)")
    b.add_argument("--d", type=int, default=64)
    b.add_argument("--causal", nargs="?", const="true", default=None,
                   help="causal mask: --causal (top-left) or --causal bottom_right")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--block-q", type=int, default=None)
    b.add_argument("--block-kv", type=int, default=None)
    b.add_argument("--blocks", nargs="+", default=["128x256", "256x256", "256x512"],
                   metavar="BQxBK", help="tile sizes for --sweep blocks")
    b.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts for --sweep threads (default 1..all)")
    b.add_argument("--max-mib", type=int, default=256,
                   help="largest working set of --sweep bandwidth (MiB)")
    b.add_argument("--baseline", default="numpy_standard",
                   help="contender the speedup column is relative to (e.g. torch_sdpa)")
    b.add_argument("--no-baselines", action="store_true",
                   help="skip the NumPy and torch baselines")
    b.add_argument("--csv", default=None, help="write the table here (e.g. data/bench.csv)")
    b.add_argument("--png", default=None, help="write the chart here")
    b.set_defaults(func=_bench)

    t = sub.add_parser("tune", help="autotune block sizes; kernel='auto' then uses them")
    t.add_argument("--kernel", default="flash")
    t.add_argument("--regimes", nargs="+", default=None, help="decode short long (default all)")
    t.add_argument("--quick", action="store_true", help="small shapes, 2 candidates per axis")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--csv", default=None, help="also write the sweep here")
    t.set_defaults(func=_tune)

    mem = sub.add_parser("memory", help="measured peak memory vs the byte model, over N")
    mem.add_argument("--kernels", nargs="+", default=None, help="registry names (default: all)")
    mem.add_argument("--N", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    mem.add_argument("--B", type=int, default=1)
    mem.add_argument("--H", type=int, default=1)
    mem.add_argument("--d", type=int, default=64)
    mem.add_argument("--causal", action="store_true")
    mem.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    mem.add_argument("--csv", default=None)
    mem.add_argument("--png", default=None)
    mem.set_defaults(func=_memory)

    w = sub.add_parser("warmup", help="compile every kernel into numba's cache")
    w.set_defaults(func=_warmup)

    m = sub.add_parser("machine", help="describe this machine")
    m.set_defaults(func=_machine)

    r = sub.add_parser("report", help="run every notebook and write reports/index.html")
    r.add_argument("--quick", action="store_true", help="small sizes (as CI runs them)")
    r.add_argument("--out", default="reports", help="output folder")
    r.add_argument("--only", nargs="+", default=None, help="notebook names to run")
    r.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a papermill parameter for every notebook (repeatable)")
    r.add_argument("--results-dir", default=None,
                   help="where figures/ and data/ are written (default: the output "
                   "folder; `make curate` passes the repository root to refresh the "
                   "curated results the README shows)")
    r.set_defaults(func=_report)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
