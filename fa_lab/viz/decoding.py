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

