"""Figures of flash-attn's features (lessons 03 and 08): the window, ALiBi and softcap
drawn as masks and biases, and a paged KV cache's block table."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fa_lab.numerics.masks import alibi_bias, causal_mask, feature_offset, window_mask


def score_mods(Nq, Nk, window, slope, softcap, causal=True):
    """Three panels: the causal + window mask, one head's ALiBi bias, the softcap curve."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    align = "top_left" if causal is True else ("bottom_right" if causal else None)
    off = feature_offset(Nq, Nk, align)
    seen = window_mask(Nq, Nk, window, off)
    if align:
        seen &= causal_mask(Nq, Nk, align)
    axes[0].imshow(seen, cmap="Greens", vmin=-0.3, vmax=1.2, interpolation="nearest")
    axes[0].set_title(f"causal={causal}, window={tuple(window)}\ndark: query i sees key j",
                      fontsize=9)
    bias = alibi_bias(np.array([slope]), Nq, Nk, off)[0]
    im = axes[1].imshow(bias, cmap="Blues_r", interpolation="nearest")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[1].set_title(f"ALiBi bias -slope |i + offset - j|, slope={slope:g}", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    x = np.linspace(-4 * softcap, 4 * softcap, 400)
    axes[2].plot(x, x, "--", color="grey", label="no cap: s = x")
    axes[2].plot(x, softcap * np.tanh(x / softcap), label=f"softcap c={softcap:g}: c tanh(x/c)")
    axes[2].axhline(softcap, color="grey", lw=0.5)
    axes[2].axhline(-softcap, color="grey", lw=0.5)
    axes[2].set_xlabel("scaled score x = q.k / sqrt(d)")
    axes[2].set_ylabel("score s the softmax sees")
    axes[2].set_title("softcap: scores bounded by +-c", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def block_table(table, lengths, page, num_blocks=None):
    """A paged KV cache: each sequence's logical blocks (left, numbers = page index) and
    the page pool (right, numbers = ``sequence:logical block``); pages a sequence has
    allocated but not filled are pale, free pages white."""
    table = np.asarray(table)
    B, per = table.shape
    num_blocks = int(table.max()) + 1 if num_blocks is None else num_blocks
    colors = plt.get_cmap("tab10")
    fig, (ax_l, ax_p) = plt.subplots(1, 2, figsize=(12, 0.9 + 0.45 * max(B, 3)),
                                     gridspec_kw={"width_ratios": [per, min(num_blocks, 16)]})
    cols = min(num_blocks, 16)
    rows = -(-num_blocks // cols)
    pool = np.ones((rows, cols, 3))
    for b in range(B):
        filled = -(-int(lengths[b]) // page)
        for j in range(per):
            rgb = np.array(colors(b % 10)[:3])
            shade = rgb if j < filled else 0.35 * rgb + 0.65
            ax_l.add_patch(plt.Rectangle((j, b), 1, 1, color=shade, ec="white"))
            ax_l.text(j + 0.5, b + 0.5, str(table[b, j]), ha="center", va="center", fontsize=7)
            p = int(table[b, j])
            pool[p // cols, p % cols] = shade
            ax_p.text(p % cols, p // cols, f"{b}:{j}", ha="center", va="center", fontsize=6)
    ax_l.set_xlim(0, per)
    ax_l.set_ylim(B, 0)
    ax_l.set_xlabel(f"logical block (keys j .. j + {page})")
    ax_l.set_yticks(np.arange(B) + 0.5, [f"seq {b}: {lengths[b]} tokens" for b in range(B)],
                    fontsize=7)
    ax_l.set_xticks(np.arange(per) + 0.5, [str(j) for j in range(per)], fontsize=7)
    ax_l.set_title("block_table[b, j] = page holding keys j*page .. (j+1)*page - 1",
                   fontsize=9)
    ax_p.imshow(pool, interpolation="nearest")
    ax_p.set_xticks(range(cols))
    ax_p.set_yticks(range(rows), [str(r * cols) for r in range(rows)])
    ax_p.tick_params(labelsize=6)
    ax_p.set_title(f"the page pool ({num_blocks} pages of {page} rows)", fontsize=9)
    fig.tight_layout()
    return fig


def sink_mass(mass, arch="gpt-oss"):
    """The probability mass each head's attention sink takes, per layer (``mass``: layers
    x heads, from :func:`fa_lab.tools.zoo.sink_mass`)."""
    layers, heads = mass.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * heads, 3.2))
    width = 0.8 / layers
    for i in range(layers):
        ax.bar(np.arange(heads) + (i - (layers - 1) / 2) * width, mass[i], width,
               label=f"layer {i}")
    ax.set_xticks(range(heads), [f"head {h}" for h in range(heads)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean probability on the sink")
    ax.set_title(f"{arch}: the share of each row's softmax its sink takes (adds nothing to "
                 "the output)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def block_masks(masks: dict):
    """Block masks side by side (``{title: BlockMask}``): the element mask in grey, each
    tile outlined by kind (empty: nothing, partial: orange, full: blue)."""
    fig, axes = plt.subplots(1, len(masks), figsize=(3.3 * len(masks), 3.6), squeeze=False)
    for ax, (title, bm) in zip(axes[0], masks.items()):
        ax.imshow(bm.dense()[0, 0], cmap="Greys", vmin=0, vmax=2.2, interpolation="nearest")
        bq, bk = bm.BLOCK_SIZE
        for t in range(bm.shape[2]):
            for u in range(bm.shape[3]):
                kind = bm.kinds[0, 0, t, u]
                if kind:
                    color = "tab:blue" if kind == 2 else "tab:orange"
                    ax.add_patch(plt.Rectangle((u * bk - 0.5, t * bq - 0.5), bk, bq, fill=False,
                                               lw=0.8, ec=color))
        c = bm.counts()
        ax.set_title(f"{title}\n{c['full']} full, {c['partial']} partial, {c['empty']} empty",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def time_vs_tiles(df):
    """Measured time against the fraction of tiles computed, one point per mask, with
    the proportional line through the dense call."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar(df["tiles_computed"], df["median_ms"],
                yerr=[df["median_ms"] - df["q25_ms"], df["q75_ms"] - df["median_ms"]],
                fmt="o", capsize=3)
    for _, r in df.iterrows():
        ax.annotate(r["mask"], (r["tiles_computed"], r["median_ms"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    dense = df.loc[df["tiles_computed"].idxmax()]
    x = np.linspace(0, 1, 11)
    ax.plot(x, x * dense["median_ms"] / dense["tiles_computed"], "--", color="gray",
            label="proportional to the tiles computed")
    ax.set_xlabel("fraction of tiles computed")
    ax.set_ylabel("ms per call")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
