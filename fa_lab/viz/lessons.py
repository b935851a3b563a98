"""Figures of the lessons' concepts: attention matrices, running state, tile schedules,
masks, heat maps, bars, memory, the memory hierarchy. Each takes data computed elsewhere
and returns a Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from fa_lab.numerics.masks import causal_mask
from fa_lab.numerics.tiling import DIAGONAL, FULL, SKIPPED, tile_classes


def attention_matrix(P, ax=None, title="P = softmax(S)"):
    """Heat map of one head's probabilities (rows: queries, columns: keys)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    im = ax.imshow(P, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title, fontsize=10)
    plt.colorbar(im, ax=ax, fraction=0.046)
    return ax.figure


def running_state(scores, m_hist, l_hist, block=1):
    """Lesson 01: the running max ``m`` and sum ``l`` as keys stream in."""
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    j = np.arange(1, len(m_hist) + 1) * block
    a0.plot(np.arange(1, len(scores) + 1), scores, ".", color="lightgray", label="score s_j")
    a0.step(j, m_hist, where="post", color="tab:red", label="running max m")
    a0.set_ylabel("score")
    a0.legend(loc="lower right", fontsize=8)
    a1.step(j, l_hist, where="post", color="tab:blue")
    a1.set_ylabel("running sum l = Σ exp(s - m)")
    a1.set_xlabel("keys seen")
    jumps = np.flatnonzero(np.diff(m_hist) > 0) + 1
    for x in j[jumps]:
        a1.axvline(x, color="tab:red", alpha=0.25, lw=0.8)
    a1.set_title("l drops (is rescaled by exp(m_old - m_new)) whenever m grows", fontsize=9)
    fig.tight_layout()
    return fig


_TILE_CMAP = ListedColormap(["#eeeeee", "#f4a261", "#2a9d8f"])


def tile_schedule(Nq, Nk, block_q, block_kv, causal=False, ax=None, order=True, window=None):
    """The grid of (query block, key block) tiles: full, diagonal (masked) or skipped
    (``window``: flash-attn's sliding window, see :func:`fa_lab.numerics.tiling.tile_classes`)."""
    classes = tile_classes(Nq, Nk, block_q, block_kv, causal, window)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5 * classes.shape[0] / max(classes.shape[1], 1) + 0.6))
    ax.imshow(classes, cmap=_TILE_CMAP, vmin=0, vmax=2, aspect="equal")
    Tr, Tc = classes.shape
    if order:
        for a in range(Tr):  # visit order within each query block (one thread's task)
            step = 0
            for c in range(Tc):
                if classes[a, c] != SKIPPED:
                    ax.text(c, a, str(step), ha="center", va="center", fontsize=7)
                    step += 1
    ax.set_xticks(np.arange(Tc))
    ax.set_yticks(np.arange(Tr))
    ax.set_xticklabels([f"K{c}" for c in range(Tc)], fontsize=7)
    ax.set_yticklabels([f"Q{a}" for a in range(Tr)], fontsize=7)
    ax.set_xlabel("key block j")
    ax.set_ylabel("query block i")
    ax.set_xticks(np.arange(-0.5, Tc), minor=True)
    ax.set_yticks(np.arange(-0.5, Tr), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    n = {name: int((classes == v).sum()) for name, v in
         (("full", FULL), ("diagonal", DIAGONAL), ("skipped", SKIPPED))}
    ax.set_title(f"Nq={Nq}, Nk={Nk}, Br={block_q}, Bc={block_kv}, causal={causal}"
                 + (f", window={tuple(window)}" if window is not None else "") + "\n"
                 f"full {n['full']}, diagonal {n['diagonal']}, skipped {n['skipped']}",
                 fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=_TILE_CMAP(2), label="full (no mask)"),
                       Patch(color=_TILE_CMAP(1), label="diagonal (masked)"),
                       Patch(color=_TILE_CMAP(0), label="skipped")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    return ax.figure


def causal_masks(Nq, Nk):
    """Top-left vs bottom-right causal alignment, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, align in zip(axes, ("top_left", "bottom_right")):
        ax.imshow(causal_mask(Nq, Nk, align), cmap="Greens", vmin=-0.3, vmax=1.2,
                  interpolation="nearest")
        ax.set_title(f'causal="{align}"  (Nq={Nq}, Nk={Nk})\ndark: query i may attend to key j',
                     fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(Nk))
        ax.set_yticks(range(Nq))
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def heatmap(table, title="", fmt="{:.3g}", cmap="viridis_r", xlabel="", ylabel=""):
    """Annotated heat map of a pandas DataFrame (index = rows, columns = columns)."""
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 2, 0.6 * table.shape[0] + 1.6))
    im = ax.imshow(table.values, cmap=cmap, aspect="auto")
    labels = [str(c) for c in table.columns]
    long = max((len(x) for x in labels), default=0) > 10  # long labels: slant them
    ax.set_xticks(range(table.shape[1]), labels, rotation=25 if long else 0,
                  ha="right" if long else "center")
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    for (r, c), val in np.ndenumerate(table.values):
        if np.isfinite(val):
            red, green, blue, _ = im.cmap(im.norm(val))  # dark text on light cells
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.55
            ax.text(c, r, fmt.format(val), ha="center", va="center", fontsize=8,
                    color="black" if light else "white")
    ax.set_xlabel(xlabel or str(table.columns.name or ""))
    ax.set_ylabel(ylabel or str(table.index.name or ""))
    ax.set_title(title, fontsize=10)
    plt.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def bars(labels, values, errors=None, ylabel="", title="", log=False, annotate="{:.3g}",
         colors=None):
    """Bar chart with optional error bars and value labels."""
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 3.8))
    ax.bar(labels, values, yerr=errors, capsize=3, color=colors or "tab:blue")
    if max((len(str(x)) for x in labels), default=0) > 12:  # long labels: slant them
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    if log:
        ax.set_yscale("log")
    for x, val in enumerate(values):
        ax.annotate(annotate.format(val), (x, val), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.2)
    fig.tight_layout()
    return fig


def tile_schedules(Nq, Nk, block_q, block_kv, threads=2):
    """Lesson 02: the tile grid without and with a causal mask, side by side. Numbers are
    the order in which one query block's task visits its key blocks; the row labels say
    which thread runs the task (numba splits the task range into equal contiguous chunks)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    Tr = -(-Nq // block_q)
    for ax, causal in zip(axes, (False, True)):
        tile_schedule(Nq, Nk, block_q, block_kv, causal=causal, ax=ax)
        chunk = -(-Tr // threads)
        ax.set_yticks(np.arange(Tr), [f"Q{a} (thread {a // chunk})" for a in range(Tr)],
                      fontsize=7)
        ax.set_xlabel("key block j (visited left to right)")
        if causal:
            ax.get_legend().remove()
    fig.tight_layout()
    return fig


def speedup_bars(labels, measured, low, high, ideals: dict, ylabel="", title=""):
    """Measured ratios with their quartile range as error bars, beside ideal values
    (``ideals``: label -> a value per bar, or one number drawn as a line)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = np.arange(len(labels))
    bars = [(k, v) for k, v in ideals.items() if np.ndim(v)]
    lines = [(k, v) for k, v in ideals.items() if not np.ndim(v)]
    width = 0.8 / (1 + len(bars))
    err = np.vstack([np.asarray(measured) - np.asarray(low), np.asarray(high) - np.asarray(measured)])
    ax.bar(x - 0.4 + width / 2, measured, width, yerr=err, capsize=3, color="tab:blue",
           label="measured (bars: quartile range)")
    greys = ["lightgray", "darkgray", "gray"]
    for i, (label, values) in enumerate(bars, 1):
        ax.bar(x - 0.4 + width / 2 + i * width, values, width, color=greys[i % 3], label=label)
    for label, value in lines:
        ax.axhline(value, color="k", ls=":", lw=1, label=label)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    top = max(np.max(high), *[np.max(v) for _, v in ideals.items()])
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    return fig


def allocations(tops: dict, xlabel="MiB alive at the peak"):
    """Lesson 05: the allocations alive at the peak, one panel per kernel (from
    :func:`fa_lab.tools.memory.top_allocations`: ``bytes`` and ``code`` columns)."""
    fig, axes = plt.subplots(len(tops), 1, figsize=(9, 3 * len(tops)), squeeze=False)
    for ax, (name, t) in zip(axes[:, 0], tops.items()):
        labels = [c if len(c) <= 70 else c[:67] + "..." for c in t["code"]]
        ax.barh(labels[::-1], (t["bytes"] / 2 ** 20)[::-1])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("allocated at")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def peak_memory_vs_n(df, x="N", y="peak_bytes", by="kernel", reference_col=None,
                     reference_label="", title=""):
    """Peak bytes against N, one line per ``by`` group, log-log, optional dotted line."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, g in df.groupby(by):
        ax.plot(g[x], g[y] / 2 ** 20, "o-", label=str(name))
    if reference_col:
        ref = df.drop_duplicates(x)
        ax.plot(ref[x], ref[reference_col] / 2 ** 20, "k:", label=reference_label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("peak extra MiB (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def keep_mask(kept, p):
    """Lesson 07: a dropout keep mask (black = dropped)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.imshow(kept, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(f"keep mask, first {kept.shape[0]} x {kept.shape[1]}, p = {p}\n"
                 f"(black = dropped: {1 - kept.mean():.1%} here)", fontsize=9)
    fig.tight_layout()
    return fig


# --- lesson 09: the memory hierarchy -------------------------------------------------

_LEVEL_COLORS = {"L1": "tab:green", "L2": "tab:blue", "L3": "tab:purple", "DRAM": "tab:red"}


def bandwidth_curve(sweep, caches: dict, title="Streaming bandwidth against working set"):
    """GB/s against working-set bytes (log-log), one line per (stream, threads), with the
    quartile band and the cache sizes ``{"L1": bytes, ...}`` as vertical lines."""
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for (kind, t), g in sweep.groupby(["stream", "threads"]):
        g = g.sort_values("ws_bytes")
        line, = ax.plot(g["ws_bytes"], g["gbps"], "o-" if kind == "read" else "s--", ms=3,
                        label=f"{kind}, {t} thread{'s' if t > 1 else ''}")
        ax.fill_between(g["ws_bytes"], g["gbps_low"], g["gbps_high"], alpha=0.15,
                        color=line.get_color())
    for name, size in caches.items():
        ax.axvline(size, color=_LEVEL_COLORS.get(name, "gray"), lw=1, ls=":")
        ax.annotate(f"{name} {size / 2 ** 10:.0f} KiB" if size < 2 ** 20 else
                    f"{name} {size / 2 ** 20:.0f} MiB", (size, 1.0),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                    fontsize=7, color=_LEVEL_COLORS.get(name, "gray"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("working set (bytes, log; cache sizes of one core dotted)")
    ax.set_ylabel("GB/s (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def roofline(points, bandwidths: dict, peaks: dict, title="Roofline"):
    """A hierarchical roofline: intensity (FLOP/byte, log) on x, GFLOP/s (log) on y.

    ``points``: rows with ``name``, ``level``, ``intensity``, ``gflops`` (a kernel has one
    point per level, joined by a line at its measured speed); ``bandwidths``:
    ``{level: GB/s}`` drawn as diagonal ceilings; ``peaks``: ``{label: GFLOP/s}``
    drawn as horizontal ceilings.
    """
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    x = np.geomspace(min(0.05, points["intensity"].min() / 2),
                     max(1e3, points["intensity"].max() * 2), 200)
    top = max(peaks.values())
    for level, gbps in bandwidths.items():
        ax.plot(x, np.minimum(gbps * x, top), color=_LEVEL_COLORS.get(level, "gray"), lw=1,
                label=f"{level} bandwidth {gbps:.0f} GB/s")
    for i, (label, g) in enumerate(peaks.items()):
        ax.axhline(g, color="black", lw=1, ls=["-", "--", ":"][i % 3])
        ax.annotate(f"{label} {g:.0f} GFLOP/s", (x[0], g), va="bottom", fontsize=7)
    markers = {"L2": "o", "L3": "s", "DRAM": "^"}
    for name, g in points.groupby("name", sort=False):
        g = g.sort_values("intensity")
        ax.plot(g["intensity"], g["gflops"], "-", color="gray", lw=0.6)
        for _, r in g.iterrows():
            ax.plot(r["intensity"], r["gflops"], markers.get(r["level"], "x"),
                    color=_LEVEL_COLORS.get(r["level"], "gray"), ms=5)
        ax.annotate(name, (g["intensity"].iloc[-1], g["gflops"].iloc[-1]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved from the level below; model)\n"
                  "markers: traffic served by o L2, s L3, ^ DRAM")
    ax.set_ylabel("GFLOP/s (measured)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def traffic_bars(table, level: str, title=""):
    """Stacked bars of modelled bytes per item (Q, K, V, S/P, O, row state) at one level,
    one bar per kernel (a :func:`fa_lab.tools.traffic.table`)."""
    t = table[table["level"] == level]
    items = [c for c in t.columns if c.endswith(" bytes") and c != "total_bytes"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    bottom = np.zeros(len(t))
    for item in items:
        vals = t[item].to_numpy() / 2 ** 20
        ax.bar(t["name"], vals, bottom=bottom, label=item.replace(" bytes", ""))
        bottom += vals
    ax.set_xticks(range(len(t)), t["name"], rotation=20, ha="right")
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.3g} MiB", (i, total), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(f"MiB moved into {level} (model)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    ax.margins(y=0.2)
    fig.tight_layout()
    return fig


def decode_floor(df, title="Decode step against its bandwidth floor"):
    """Measured decode time and its floor ``bytes(K, V) / bandwidth`` against the cache
    length (a :func:`fa_lab.tools.hierarchy.decode_vs_floor` table), and the ratio."""
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.8))
    a0.plot(df["tokens"], df["median_s"] * 1e3, "o-", label="measured (median)")
    a0.fill_between(df["tokens"], df["q25_s"] * 1e3, df["q75_s"] * 1e3, alpha=0.2)
    a0.plot(df["tokens"], df["floor_s"] * 1e3, "k--", label="floor: bytes(K, V) / bandwidth")
    for _, r in df.iterrows():
        a0.annotate(r["level"], (r["tokens"], r["floor_s"] * 1e3), fontsize=7,
                    xytext=(0, -10), textcoords="offset points", ha="center")
    a0.set_xscale("log", base=2)
    a0.set_yscale("log")
    a0.set_xlabel("cached tokens")
    a0.set_ylabel("ms per decode step (log)")
    a0.legend(fontsize=8)
    err = np.vstack([df["x_floor"] - df["x_floor_low"], df["x_floor_high"] - df["x_floor"]])
    a1.bar([str(t) for t in df["tokens"]], df["x_floor"], yerr=err, capsize=3)
    a1.axhline(1.0, color="black", lw=1)
    a1.set_xlabel("cached tokens")
    a1.set_ylabel("measured / floor (1 = at the floor)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
