"""Pictures of merging states beyond one call: the ring's schedule, the causal work per
rank, measured ring steps, the shared-prefix speedup, and when a network hides a step."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fa_lab.distributed import causal_work


def ring_schedule(world=4, layout="zigzag", causal=True):
    """Who holds what: rank (rows) x ring step (columns), each cell the K/V block the rank
    computes with (it started on rank ``r - t``), shaded by the causal work it costs."""
    work = causal_work(world, layout) if causal else np.ones((world, world))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * world, 0.8 + 0.75 * world))
    ax.imshow(work, cmap="Blues", vmin=0, vmax=1.4, aspect="auto")
    for r in range(world):
        for t in range(world):
            src = (r - t) % world
            label = f"K/V {src}" + ("" if work[r, t] else "\n(skipped)")
            ax.text(t, r, label, ha="center", va="center", fontsize=8)
            if t < world - 1:
                ax.annotate("", (t + 0.62, (r + 1) % world), (t + 0.38, r),
                            arrowprops=dict(arrowstyle="->", color="gray", lw=0.6))
    ax.set_xticks(range(world), [f"step {t}" for t in range(world)])
    ax.set_yticks(range(world), [f"rank {r}" for r in range(world)])
    ax.set_title(f"ring schedule, world={world}, {layout}{', causal' if causal else ''}: "
                 "shade = work (1 = a full block)\narrows: the block a rank sends on "
                 "while it computes", fontsize=9)
    fig.tight_layout()
    return fig


def causal_work_bars(world, measured=None):
    """Left: the causal work per rank (model, in full blocks) for both layouts. Right,
    when ``measured`` (``{layout: per-rank compute ms}``) is given: the run's numbers."""
    panels = 2 if measured else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), squeeze=False)
    x = np.arange(world)
    for i, layout in enumerate(("contiguous", "zigzag")):
        axes[0, 0].bar(x + (i - 0.5) * 0.38, causal_work(world, layout).sum(axis=1), 0.38,
                       label=layout)
    axes[0, 0].set_xticks(x, [f"rank {r}" for r in x])
    axes[0, 0].set_ylabel("causal work (full N_local^2 blocks)")
    axes[0, 0].set_title(f"model: world={world}", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    if measured:
        for i, (layout, ms) in enumerate(measured.items()):
            axes[0, 1].bar(np.arange(len(ms)) + (i - 0.5) * 0.38, ms, 0.38, label=layout)
        axes[0, 1].set_xticks(x, [f"rank {r}" for r in x])
        axes[0, 1].set_ylabel("measured compute per call (CPU ms)")
        axes[0, 1].set_title("measured in this run", fontsize=9)
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def ring_steps(tables: dict):
    """Per ring step (slowest rank): compute and the exposed wait stacked, the transfer
    alone as a marker; one panel per run (``{title: step table}``)."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.6 * len(tables), 3.4), squeeze=False)
    for ax, (title, t) in zip(axes[0], tables.items()):
        ax.bar(t["step"], t["compute_ms"], label="compute")
        ax.bar(t["step"], t["exposed_wait_ms"], bottom=t["compute_ms"],
               label="exposed wait (transfer not hidden)")
        ax.plot(t["step"], t["transfer_alone_ms"], "kx", label="transfer alone")
        ax.set_xticks(t["step"], [f"step {s}" for s in t["step"]])
        ax.set_ylabel("ms")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def cascade_speedup(df):
    """Shared prefix: the measured speedup over recomputing (quartile range as error
    bars) and the ratio of K/V bytes each reads, against the number of sequences."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    err = [df["speedup"] - df["speedup_low"], df["speedup_high"] - df["speedup"]]
    ax.errorbar(df["B"], df["speedup"], yerr=err, fmt="o-", capsize=3,
                label="measured speedup (recompute time / cascade time)")
    ax.plot(df["B"], df["kv_MiB_recompute"] / df["kv_MiB_cascade"], "s--",
            label="K/V bytes read, recompute / cascade")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequences sharing the prefix (B)")
    ax.set_ylabel("ratio")
    ax.set_title(f"one shared prefix of {df['P'].iloc[0]} tokens, suffixes of "
                 f"{df['S'].iloc[0]}, Nq={df['Nq'].iloc[0]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def hide_thresholds(thresholds: dict, measured_n=None):
    """The shard length from which a ring step's compute outlasts its transfer, per
    network (``{name: N_local}``), with this run's shard length marked."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    names = list(thresholds)
    ax.barh(names, [thresholds[n] for n in names], color="tab:blue")
    ax.set_xscale("log")
    if measured_n:
        ax.axvline(measured_n, color="tab:red", ls="--", label=f"this run's N_local = {measured_n}")
        ax.legend(fontsize=8)
    ax.set_xlabel("N_local where compute time = transfer time (hidden above it)")
    ax.set_title("when does the ring hide its transfers? (this CPU's measured rate)",
                 fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["ring_schedule", "causal_work_bars", "ring_steps", "cascade_speedup",
           "hide_thresholds"]
