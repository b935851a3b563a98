"""Explanatory pictures of decoding: RoPE's rotation, split-KV, the KV cache."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fa_lab.features.decoding import rope


def plot_rope(d=16, base=10000.0, seed=0):
    """Left: one channel pair of a vector rotated by RoPE at positions 0..7 (the angle
    grows with the position). Right: ``rope(q, m) . rope(k, n)`` against ``m - n`` for
    three absolute offsets ``n``: the curves coincide (relative positions only)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, d)), rng.standard_normal((1, d))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.zeros((8, d))
    x[:, 0], x[:, d // 2] = 1.0, 0.0
    r = rope(x, np.arange(8), base=base)
    for p in range(8):
        a.annotate("", (r[p, 0], r[p, d // 2]), (0, 0),
                   arrowprops=dict(arrowstyle="->", color=plt.cm.viridis(p / 7)))
        a.text(1.08 * r[p, 0], 1.08 * r[p, d // 2], f"pos {p}", fontsize=7, ha="center")
    a.set_xlim(-1.3, 1.3)
    a.set_ylim(-1.3, 1.3)
    a.set_aspect("equal")
    a.set_title(f"channel pair (0, {d // 2}) of x = e0: turned by 1 radian per position", fontsize=9)
    deltas = np.arange(-64, 65)
    for n, style in ((0, "-"), (500, "--"), (5000, ":")):
        s = [float(rope(q, [n + dm], base=base)[0] @ rope(k, [n], base=base)[0]) for dm in deltas]
        b.plot(deltas, s, style, label=f"key at n = {n}")
    b.set_xlabel("m - n (query position - key position)")
    b.set_ylabel("rope(q, m) . rope(k, n)")
    b.set_title("the score depends on m - n only", fontsize=9)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_split_kv(Nk=4096, splits=4, block_kv=256):
    """The Flash-Decoding picture: one query row, the keys cut into ``splits`` ranges
    (whole key blocks), each range a parallel task giving ``(O_s, lse_s)``, then the
    exact LSE merge."""
    Tc = -(-Nk // block_kv)
    per = -(-Tc // splits)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    colors = plt.cm.tab10.colors
    for s in range(splits):
        j0, j1 = min(s * per * block_kv, Nk), min((s + 1) * per * block_kv, Nk)
        ax.add_patch(plt.Rectangle((j0, 1.0), j1 - j0, 0.6, color=colors[s % 10], alpha=0.6))
        ax.text((j0 + j1) / 2, 1.3, f"split {s}: keys {j0}..{j1 - 1}\n-> O_{s}, lse_{s}",
                ha="center", va="center", fontsize=8)
        ax.annotate("", (Nk / 2, 0.45), ((j0 + j1) / 2, 1.0),
                    arrowprops=dict(arrowstyle="->", color=colors[s % 10]))
    for j in range(0, Nk + 1, block_kv):
        ax.plot([j, j], [1.0, 1.6], color="white", lw=0.5)
    ax.text(Nk / 2, 0.25, "merge: lse = log sum_s exp(lse_s);  O = sum_s exp(lse_s - lse) O_s",
            ha="center", fontsize=9, bbox=dict(boxstyle="round", fc="lightyellow"))
    ax.set_xlim(-Nk * 0.02, Nk * 1.02)
    ax.set_ylim(0, 1.8)
    ax.set_yticks([])
    ax.set_xlabel(f"key index (Nk = {Nk}, key blocks of {block_kv})")
    ax.set_title(f"Split-KV (Flash-Decoding): one query row, {splits} splits run in parallel",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_kv_cache(prompt=6, generated=3, max_len=12):
    """The KV cache drawn: ``max_len`` slots per layer and kv head; the prompt's keys and
    values written by one prefill pass, then one slot per generated token; the newest
    query reads every filled slot (bottom-right causal), the empty ones never."""
    fig, ax = plt.subplots(figsize=(10, 2.8))
    for row, label in ((1.2, "K"), (0.0, "V")):
        for j in range(max_len):
            if j < prompt:
                color, text = "tab:blue", "prefill"
            elif j < prompt + generated:
                color, text = "tab:orange", f"step {j - prompt + 1}"
            else:
                color, text = "whitesmoke", "empty"
            ax.add_patch(plt.Rectangle((j, row), 0.92, 0.9, color=color,
                                       alpha=0.75 if color != "whitesmoke" else 1.0))
            ax.text(j + 0.46, row + 0.45, text, ha="center", va="center", fontsize=6.5,
                    color="white" if color != "whitesmoke" else "gray")
        ax.text(-0.4, row + 0.45, label, ha="right", va="center", fontsize=10)
    L = prompt + generated
    ax.plot([0, L - 0.08], [2.25, 2.25], color="black", lw=1)  # a bracket over 0..L-1
    ax.plot([0, 0], [2.15, 2.25], color="black", lw=1)
    ax.plot([L - 0.08, L - 0.08], [2.15, 2.25], color="black", lw=1)
    ax.text(L / 2, 2.4, f"the newest query (token {L - 1}) attends to slots 0..{L - 1}",
            ha="center", fontsize=8)
    ax.text(max_len - 0.1, 2.6, f"length {L} / max_len {max_len}", ha="right", fontsize=8)
    ax.set_xlim(-1.2, max_len + 0.2)
    ax.set_ylim(-0.2, 3.0)
    ax.axis("off")
    ax.set_title("A KV cache (one layer, one kv head): prefill writes the prompt, each "
                 "decode step appends one token", fontsize=10)
    fig.tight_layout()
    return fig



def kv_formats(bytes_df, accuracy_df):
    """Left: bytes per token and kv head per format. Right: ``1 - cosine`` against
    float64 per format and dataset (log scale: lower is better)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.barh(bytes_df["format"], bytes_df["bytes_per_token_head"], color="#4c72b0")
    for y, (n, r) in enumerate(zip(bytes_df["bytes_per_token_head"], bytes_df["vs_float32"])):
        a.annotate(f"{n:.0f} B ({r:.1f}x smaller)" if r > 1 else f"{n:.0f} B", (n, y),
                   xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("bytes per token and kv head (K + V + scales)")
    a.set_xlim(0, bytes_df["bytes_per_token_head"].max() * 1.6)
    pivot = accuracy_df.pivot(index="format", columns="data", values="cosine")
    pivot = pivot.reindex([f for f in bytes_df["format"] if f in pivot.index])
    pivot = pivot.drop(index="float32", errors="ignore")
    x = np.arange(len(pivot.index))
    w = 0.8 / max(len(pivot.columns), 1)
    for i, col in enumerate(pivot.columns):
        b.bar(x + i * w, np.maximum(1 - pivot[col], 1e-7), w, label=col)
    for level, text in ((1e-3, "cosine 0.999"), (1e-2, "cosine 0.99")):
        b.axhline(level, ls="--", color="gray", lw=0.8)
        b.annotate(text, (x[-1] + 0.8, level), fontsize=7, va="bottom", ha="right")
    b.set_xticks(x + w * (len(pivot.columns) - 1) / 2, pivot.index, fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("1 - cosine to float64 (lower is better)")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def kv_time_vs_context(df):
    """Decode time per format against the context length, each with its floor (dashed:
    bytes read / the read bandwidth measured at that cache size)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (fmt, g) in enumerate(df.groupby("format", sort=False)):
        color = f"C{i}"
        ax.errorbar(g["Nk"], g["median_ms"], yerr=[g["median_ms"] - g["q25_ms"],
                                                   g["q75_ms"] - g["median_ms"]],
                    fmt="o-", color=color, capsize=3, label=f"{fmt} (measured)")
        ax.plot(g["Nk"], g["floor_ms"], "--", color=color, label=f"{fmt} floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens in the cache)")
    ax.set_ylabel("ms per decode step")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
