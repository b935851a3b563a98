"""Command line: ``python -m fa_lab {bench, warmup, machine, report}``."""

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


def _bench(args) -> int:
    from fa_lab import bench

    shapes = [(args.B, args.H, n, args.Nk or n, args.d) for n in args.N]
    df = bench.run(args.kernels, shapes, causal=args.causal, dtype=args.dtype,
                   repeats=args.repeats, block_q=args.block_q, block_kv=args.block_kv,
                   with_baselines=not args.no_baselines,
                   progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    print(bench.describe_machine())
    cols = ["name", "Nq", "Nk", "median_s", "q25_s", "q75_s", "gflops",
            "speedup_vs_numpy_standard", "max_error"]
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format="%.4g"))
    _write(df, args.csv, args.png, lambda d: bench.plot_ladder(d[d["Nq"] == d["Nq"].iloc[0]]))
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
    n = len(KERNELS) + len(BACKWARD_KERNELS)
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

    b = sub.add_parser("bench", help="time kernels side by side (validated first)")
    b.add_argument("--kernels", nargs="+", default=None,
                   help="registry names (default: every kernel but the reference)")
    b.add_argument("--B", type=int, default=1)
    b.add_argument("--H", type=int, default=8)
    b.add_argument("--N", type=int, nargs="+", default=[1024], help="query lengths")
    b.add_argument("--Nk", type=int, default=None, help="key length (default: N)")
    b.add_argument("--d", type=int, default=64)
    b.add_argument("--causal", action="store_true")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--block-q", type=int, default=None)
    b.add_argument("--block-kv", type=int, default=None)
    b.add_argument("--no-baselines", action="store_true",
                   help="skip the NumPy and torch baselines")
    b.add_argument("--csv", default=None, help="write the table here (e.g. data/bench.csv)")
    b.add_argument("--png", default=None, help="write the ladder chart here")
    b.set_defaults(func=_bench)

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
                   help="where figures/ and data/ are written (default: the repository)")
    r.set_defaults(func=_report)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
