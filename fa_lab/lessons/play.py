"""Things to play with: sliders over the lessons' cheap models (no timing), in JupyterLab.

:func:`explore` shows a view with sliders (``ipywidgets.interact``) where a learner can
move them; in the batch report and under nbval (``FA_LAB_STATIC=1``, which both set),
or without ipywidgets, it draws the view once with its defaults, so the report's page
shows a static figure in the same cell.

The views are models computed from the library, each under a few milliseconds:

* :func:`tiles` (lesson 03): which tiles a causal or sliding-window mask skips, and the
  work done against the ideal;
* :func:`quant_error` (lesson 04): INT8 quantization error of keys with a per-channel
  offset, per granularity, with and without smoothing, and the attention's cosine;
* :func:`memory` (lesson 05): the byte models of standard attention and the tiled
  kernels against N and d;
* :func:`occupancy` (lesson 12): a GPU thread block's shared memory and how many blocks
  an SM keeps resident;
* :func:`kv_cache` (lesson 14): a model's KV cache per format against context length.
"""

from __future__ import annotations

import os

import numpy as np

from fa_lab import viz
from fa_lab.numerics import quant, reference, tiling
from fa_lab.numerics.kvquant import bytes_per_token
from fa_lab.tools import gpu
from fa_lab.tools.memory import estimate, standard_bytes
from fa_lab.viz.core import plt


def static() -> bool:
    """Whether views are drawn once instead of with sliders: in the batch report and
    under nbval (``FA_LAB_STATIC=1``), or when ipywidgets is not installed."""
    if os.environ.get("FA_LAB_STATIC") == "1":
        return True
    try:
        import ipywidgets  # noqa: F401,PLC0415  (optional: the lab extra)
    except ImportError:
        return True
    return False


def explore(view, **controls) -> None:
    """``view`` with sliders for ``controls`` (ipywidgets' abbreviations: ``(lo, hi,
    step)``, a list of choices, a bool) in JupyterLab; drawn once with its defaults when
    :func:`static`."""
    unknown = set(controls) - set(view.__code__.co_varnames[:view.__code__.co_argcount])
    if unknown:
        raise TypeError(f"{view.__name__} has no argument {sorted(unknown)[0]!r}")
    if static():
        view()
        return
    import ipywidgets  # noqa: PLC0415

    ipywidgets.interact(view, **controls)


def tiles(N: int = 300, block: int = 64, causal: bool = True, window: int = 0) -> None:
    """The tile grid of an ``N x N`` attention with ``block x block`` tiles (``window``
    > 0: a sliding window of that many keys), and the share of work done."""
    win = (window - 1, 0) if window > 0 else None
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    viz.tile_schedule(N, N, block, block, causal, ax=ax, order=False, window=win)
    w = tiling.work_fraction(N, N, block, block, causal, win)
    ax.set_title(f"N={N}, tiles {block}x{block}: {w['tiles'] - w['skipped']} of {w['tiles']} "
                 f"computed", fontsize=9)
    plt.show()
    print(f"tiles computed {w['computed_fraction']:.0%} (masked on the edge: {w['diagonal']}); "
          f"the scores a row sees: {w['visible_fraction']:.0%} of N x N")


def quant_error(granularity: str = "per_block", block: int = 64, offset: float = 3.0,
                smooth: bool = True, N: int = 256, d: int = 64, seed: int = 0) -> None:
    """Keys with a per-channel offset (``k + offset z_c``) quantized to INT8: the error of
    each channel, and the cosine of attention with the dequantized keys (float64)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, N, d)) for _ in range(3))
    k = k + offset * rng.standard_normal(d)
    ks, mean = quant.smooth_k(k) if smooth else (k, np.zeros((1, 1, 1, d)))
    kq, s = quant.quantize(ks, granularity, block if granularity == "per_block" else None,
                           scale_dtype=np.float64)
    kd = quant.dequantize(kq, s, np.float64) + mean
    out = reference.attention(q, kd, v)[0].ravel()
    exact = reference.attention(q, k, v)[0].ravel()
    cos = float(out @ exact / np.linalg.norm(out) / np.linalg.norm(exact))
    err = np.abs(kd - k)[0, 0].mean(axis=0)
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.bar(np.arange(d), err)
    ax.set_xlabel("channel")
    ax.set_ylabel("mean |k - dequantized k|")
    ax.set_title(f"{granularity}{f', {block} rows' if granularity == 'per_block' else ''}, "
                 f"offset {offset}, {'smoothed' if smooth else 'not smoothed'}", fontsize=9)
    plt.show()
    print(f"attention output cosine against float64: {cos:.6f} (1 - cos = {1 - cos:.1e})")


def memory(N: int = 4096, d: int = 64, H: int = 8) -> None:
    """The byte models (:func:`fa_lab.tools.memory.estimate`) of standard attention and
    of the tiled kernels at one size, in MiB."""
    names = ["standard (NumPy)", "tiled", "tiled_simd", "flash"]
    mib = [standard_bytes(1, H, N, N, d) / 2**20]
    mib += [estimate(kern, 1, H, N, N, d).total / 2**20 for kern in names[1:]]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.barh(names, mib)
    ax.set_xscale("log")
    ax.set_xlabel("predicted peak extra memory (MiB, log scale)")
    ax.set_title(f"B=1, H={H}, N={N}, d={d}, float32", fontsize=9)
    plt.show()
    print(f"standard / flash: {mib[0] / mib[-1]:,.0f}x; doubling N multiplies the first by "
          f"about {standard_bytes(1, H, 2 * N, 2 * N, d) / standard_bytes(1, H, N, N, d):.2f}")


def occupancy(block_q: int = 64, block_kv: int = 64, d: int = 64, threads: int = 128,
              sm_shared_kib: int = 228) -> None:
    """A thread block's shared memory (Q, K, V tiles) and the blocks an SM keeps
    resident under its three limits (:mod:`fa_lab.tools.gpu`)."""
    smem = gpu.shared_memory_budget(block_q, block_kv, d)["total"]
    occ = gpu.occupancy(threads, smem, sm_shared_kib=sm_shared_kib)
    limits = {"shared memory": (sm_shared_kib * 1024) // max(smem, 1),
              "threads": 2048 // threads, "block cap": 32}
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.barh(list(limits), list(limits.values()), color=["C0", "C1", "C2"])
    ax.set_xlabel("blocks per SM allowed")
    ax.set_title(f"Br={block_q}, Bc={block_kv}, d={d}: {smem / 1024:.0f} KiB of shared memory "
                 f"per block", fontsize=9)
    plt.show()
    print(f"{occ['blocks_per_sm']} blocks resident ({occ['warps_per_sm']} of {occ['max_warps']} "
          f"warps), limited by {occ['limited_by']}")


def kv_cache(tokens: int = 32768, layers: int = 32, kv_heads: int = 8, d: int = 128,
             group: int = 32) -> None:
    """One sequence's KV cache in GiB per format (values and float32 scales), at
    ``tokens`` of context (:func:`fa_lab.numerics.kvquant.bytes_per_token`)."""
    formats = {"float32": {}, "int8": {"kv_dtype": "int8"},
               f"int4, groups of {group}": {"kv_dtype": "int4", "group": group}}
    gib = {n: layers * kv_heads * tokens * bytes_per_token(d, **f) / 2**30
           for n, f in formats.items()}
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.barh(list(gib), list(gib.values()))
    ax.set_xlabel("GiB per sequence")
    ax.set_title(f"{layers} layers, {kv_heads} kv heads, d={d}, {tokens:,} tokens", fontsize=9)
    plt.show()
    print(", ".join(f"{n}: {g:.2f} GiB" for n, g in gib.items()))
