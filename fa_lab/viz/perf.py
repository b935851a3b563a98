"""Figures of measurements: the kernel ladder, throughput against N, flash's time
breakdown, published claims, decode splits, decode latency and generation, retrieval, INT8 error, peak
memory. Each takes a table from :mod:`fa_lab.tools.bench` (or a feature) and returns a Figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fa_lab.settings.machine import describe_machine
from fa_lab.numerics.quant import smooth_k
from fa_lab.viz.core import footer


def plot_ladder(df, path=None, title="Kernel ladder"):
    """Bar chart of median time per contender (log scale) with the quartile spread."""
    fig, ax = plt.subplots(figsize=(max(8.0, 1.35 * len(df)), 4.2))
    colors = ["tab:blue" if k == "kernel" else "tab:gray" for k in df["kind"]]
    med = df["median_s"] * 1e3
    err = np.vstack([med - df["q25_s"] * 1e3, df["q75_s"] * 1e3 - med])
    ax.bar(df["name"], med, yerr=err, color=colors, capsize=3)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    for x, (m, top, g) in enumerate(zip(med, df["q75_s"] * 1e3, df["gflops"])):
        ax.annotate(f"{m:.3g} ms\n{g:.3g} GFLOP/s", (x, max(m, top)), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 3), textcoords="offset points")
    r = df.iloc[0]
    ax.set_title(f"{title}: B={r['B']}, H={r['H']}, Nq={r['Nq']}, Nk={r['Nk']}, d={r['d']}, "
                 f"{r['dtype']}{', causal' if r['causal'] else ''}", fontsize=10)
    ax.margins(y=0.25)
    fig.tight_layout()
    if path:
        footer(fig, describe_machine())
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_throughput(df, peak_gflops: float, title="Throughput against N"):
    """GFLOP/s against N per contender (from :func:`fa_lab.tools.bench.run` over several N), with the
    measured matrix-product peak as a horizontal ceiling and 60% of it dashed. (Not a
    roofline: that needs arithmetic intensity on the x axis.)"""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"flash": ("tab:blue", "o", "-"), "torch_sdpa": ("tab:red", "s", "-"),
              "numpy_standard": ("tab:gray", "^", "-"), "tiled_simd": ("tab:green", "d", "-")}
    for (name, causal), g in df.groupby(["name", "causal"], sort=False):
        color, marker, _ = styles.get(name, ("tab:purple", "x", "-"))
        g = g.sort_values("Nq")
        label = f"{name}{' (causal)' if causal else ''}"
        # quartiles of time -> GFLOP/s range (the faster quartile gives the higher rate)
        low = g["gflops"] * g["median_s"] / g["q75_s"]
        high = g["gflops"] * g["median_s"] / g["q25_s"]
        ax.errorbar(g["Nq"], g["gflops"], yerr=[g["gflops"] - low, high - g["gflops"]],
                    marker=marker, color=color, capsize=3, linestyle="--" if causal else "-",
                    label=label)
    ax.axhline(peak_gflops, color="black", lw=1)
    ax.annotate(f"measured fp32 matmul peak {peak_gflops:.0f} GFLOP/s", (0.01, peak_gflops),
                xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
    ax.axhline(0.6 * peak_gflops, color="black", lw=0.8, ls=":")
    ax.annotate("60% of peak", (0.99, 0.6 * peak_gflops), xycoords=("axes fraction", "data"),
                va="bottom", ha="right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (= Nq = Nk)")
    ax.set_ylabel("GFLOP/s (4 B H N^2 d, halved when causal; bars: quartiles)")
    r = df.iloc[0]
    ax.set_title(f"{title}: B={r['B']}, H={r['H']}, d={r['d']}, {r['dtype']}", fontsize=10)
    ax.set_ylim(0, peak_gflops * 1.15)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_breakdown(df, title="Where flash's time goes"):
    """One horizontal stacked bar from :func:`fa_lab.tools.bench.breakdown` (ms per part, share labelled)."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = 0.0
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for (_, r), color in zip(df.iterrows(), colors):
        width = max(r["ms"], 0.0)
        ax.barh([0], [width], left=left, color=color, label=f"{r['part']}: {r['ms']:.1f} ms "
                f"({100 * r['share']:.0f}%)")
        left += width
    r = df.iloc[0]
    ax.set_yticks([])
    ax.set_xlabel("ms (differences of medians of the staged kernel)")
    ax.set_title(f"{title}: B={r['B']}, H={r['H']}, N={r['Nq']}, d={r['d']}, "
                 f"tiles {r['block_q']}x{r['block_kv']}, total {r['total_ms']:.1f} ms",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2)
    fig.tight_layout()
    return fig


def plot_sage_breakdown(df, title="Where sage's time goes"):
    """Stacked horizontal bars from :func:`fa_lab.tools.lowprec.speed.breakdown` (one bar per
    ``causal`` value): ms per part, each product labelled with its fraction of its peak.
    No machine footer (``Lesson.save_fig`` adds one)."""
    groups = list(df.groupby("causal", sort=True))
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.9 * len(groups)))
    colors = ["tab:gray", "tab:brown", "lightgray", "tab:blue", "tab:orange", "tab:green"]
    for y, (causal, g) in enumerate(groups):
        left = 0.0
        for (_, r), color in zip(g.iterrows(), colors):
            width = max(r["ms"], 0.0)
            ax.barh([y], [width], left=left, color=color, label=r["part"] if y == 0 else None)
            frac = r.get("fraction_of_peak", np.nan)
            if width > 0.08 * g["total_ms"].iloc[0]:
                text = f"{r['ms']:.1f}" + ("" if not np.isfinite(frac) else f"\n{frac:.0%} pk")
                ax.text(left + width / 2, y, text, ha="center", va="center", fontsize=8)
            left += width
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([("causal" if c else "not causal") + f"\n{g['total_ms'].iloc[0]:.1f} ms"
                        for c, g in groups])
    ax.set_xlabel("ms per call (stages: differences of medians; pk = of that precision's peak)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    fig.tight_layout()
    return fig  # the machine footer: lesson.save_fig adds it


def plot_decode(frames, title="Decode: one new token against the KV cache"):
    """Grouped bars of median ms per contender for several decode shapes
    (a list of :func:`fa_lab.tools.bench.decode_splits` tables)."""
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.8), squeeze=False)
    for ax, df in zip(axes[0], frames):
        colors = ["tab:red" if n == "torch_sdpa" else "tab:blue" for n in df["name"]]
        med = df["median_ms"]
        err = np.vstack([med - df["q25_ms"], df["q75_ms"] - med])
        ax.bar(range(len(df)), med, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(df)), [n.replace("flash, ", "") for n in df["name"]],
                      rotation=30, ha="right", fontsize=8)
        for x, m in enumerate(med):
            ax.annotate(f"{m:.3f}", (x, m), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        r = df.iloc[0]
        ax.set_title(f"H={r['H']}, H_kv={r['H_kv']}, Nk={r['Nk']} (auto: {r['auto_splits']} "
                     f"split{'s' if r['auto_splits'] > 1 else ''})", fontsize=9)
        ax.set_ylabel("median ms per call")
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_claims(df, slack):
    """Each published claim (a :func:`fa_lab.tools.bench.check_speed_claims` table): the
    claimed speedup range (dark band), widened by ``slack`` either way (light band), and
    the measured median with its quartile range, on a log axis."""
    import textwrap

    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 0.75 * len(df) + 1.8))
    for y in range(len(df)):
        lo, hi = df["claimed low"].iloc[y], df["claimed high"].iloc[y]
        ax.barh(y, hi * slack - lo / slack, left=lo / slack, height=0.6, color="tab:green",
                alpha=0.18, label="claimed, widened" if y == 0 else None)
        ax.barh(y, max(hi - lo, lo * 0.01), left=lo, height=0.6, color="tab:green", alpha=0.45,
                label="claimed" if y == 0 else None)
        med, q25, q75 = (df[c].iloc[y] for c in ("speedup vs standard", "speedup low",
                                                   "speedup high"))
        ax.errorbar(med, y, xerr=[[med - q25], [q75 - med]], fmt="o", color="black", capsize=4,
                    label="measured (quartile range)" if y == 0 else None)
    ax.set_xscale("log")
    times = FuncFormatter(lambda x, _: f"{x:g}x")
    ax.xaxis.set_major_formatter(times)
    ax.xaxis.set_minor_formatter(times)
    ax.tick_params(axis="x", which="both", labelsize=8)
    ax.set_yticks(range(len(df)), [textwrap.fill(str(c), 30) for c in df["claim"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over NumPy standard attention (log)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    ax.set_title("Published speed claims against this run", fontsize=10)
    fig.tight_layout()
    return fig


def plot_generation(df):
    """ms per generated token against prompt length, cached vs recomputed."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key, fmt, label in (("recompute", "o-", "recompute everything"),
                            ("cached", "s-", "KV cache + decode")):
        med = df[f"{key}_ms_per_token"]
        ax.errorbar(df["prompt_len"], med, yerr=[med - df[f"{key}_q25_ms"],
                    df[f"{key}_q75_ms"] - med], fmt=fmt, capsize=3, label=label)
    for _, r in df.iterrows():
        ax.annotate(f"{r['speedup']:.1f}x", (r["prompt_len"], r["recompute_ms_per_token"]),
                    fontsize=8, xytext=(0, 5), textcoords="offset points", ha="center")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("ms per generated token (bars: quartiles)")
    ax.set_title("Greedy decoding with TinyLM: cache vs recomputation", fontsize=10)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_decode_latency(df):
    """Median ms of one decode step against the context length, per contender."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, g in df.groupby("name", sort=False):
        ax.errorbar(g["context"], g["median_ms"],
                    yerr=[g["median_ms"] - g["q25_ms"], g["q75_ms"] - g["median_ms"]],
                    marker="o", capsize=3, label=name)
    r = df.iloc[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the KV cache")
    ax.set_ylabel("median ms per decode step")
    ax.set_title(f"One new token, H={r['H']}, H_kv={r['H_kv']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_retrieval(df):
    """Time and peak extra memory against corpus size, fa_lab vs NumPy."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, g in df.groupby("name", sort=False):
        a.errorbar(g["N"], g["median_ms"], yerr=[g["median_ms"] - g["q25_ms"],
                   g["q75_ms"] - g["median_ms"]], fmt="o-", capsize=3, label=name)
        b.plot(g["N"], g["peak_bytes"] / 2 ** 20, "o-", label=name)
    r = df.iloc[0]
    for ax, label in ((a, "median ms per call (bars: quartiles)"),
                      (b, "peak extra memory (MiB, memray)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("corpus size N (keys)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Top-{r['k']} retrieval, {r['queries']} quer{'y' if r['queries'] == 1 else 'ies'}, "
                 f"d={r['d']}, float32", fontsize=10)
    fig.tight_layout()
    return fig


def plot_k_histograms(k, channels=4, title="K channels before and after smoothing"):
    """Histograms of a few K channels (the ones with the largest mean offset), raw and
    after :func:`fa_lab.numerics.quant.smooth_k`, with the per-tensor INT8 step marked."""
    k = np.asarray(k, np.float32).reshape(-1, k.shape[-1])
    ks, _ = smooth_k(k)
    pick = np.argsort(-np.abs(k.mean(axis=0)))[:channels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, data, label in ((axes[0], k, "raw K"), (axes[1], ks, "K - mean(K) (smoothed)")):
        lo, hi = data[:, pick].min(), data[:, pick].max()
        bins = np.linspace(lo, hi, 40)
        for c in pick:
            ax.hist(data[:, c], bins=bins, alpha=0.55, label=f"channel {c}")
        step = np.abs(data).max() / 127
        ax.set_title(f"{label}: per-tensor INT8 step = {step:.3f}", fontsize=9)
        ax.set_xlabel("value")
    axes[0].set_ylabel("tokens")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_error_vs_length(df, metric="rel_l1"):
    """``metric`` against N per variant (log-log)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, g in df.groupby("variant", sort=False):
        ax.plot(g["N"], g[metric], marker="o", ls="--" if "smooth" in name else "-",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (= Nq = Nk)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"INT8 error against N ({metric})", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_memory_sweep(df, title="Peak extra memory of one attention call"):
    """log-log: measured peak (markers) and model (lines) vs N, one colour per kernel."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, g) in enumerate(df.groupby("kernel", sort=False)):
        color = f"C{i}"
        ax.plot(g["N"], g["model_bytes"] / 2**20, "-", color=color, alpha=0.6)
        ax.plot(g["N"], g["measured_bytes"] / 2**20, "o", color=color, label=name)
    g = df.drop_duplicates("N")
    ax.plot(g["N"], g["output_bytes"] / 2**20, "k:", label="output O alone")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (= Nq = Nk)")
    ax.set_ylabel("peak extra MiB (log)")
    r = df.iloc[0]
    ax.set_title(f"{title}\nB={r['B']}, H={r['H']}, d={r['d']}, {r['dtype']}; "
                 "markers: measured (memray), lines: model", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig

