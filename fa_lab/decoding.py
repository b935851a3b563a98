"""Decoding: a preallocated KV cache, attention of new tokens against it, RoPE, and a
tiny decoder-only model that shows cached decoding equals recomputation.

Conventions
-----------
* :class:`KVCache` holds ``(B, H_kv, max_len, d)`` key and value buffers; ``append``
  writes new tokens after the filled part and raises ``ValueError`` past ``max_len``.
* :func:`decode` attends ``Tq`` new queries to everything in the cache with the
  **bottom-right** causal alignment: query ``i`` of ``Tq`` sees keys ``j <= L - Tq + i``
  (``L`` = cache length, the new tokens already appended), as flash-attn >= 2.1 and a
  token-by-token decoder do. It runs the ``flash`` kernel directly on the cache's
  buffers (no copy of the filled part), with split-KV (Flash-Decoding) where
  :func:`fa_lab.kernels.flash.plan_splits` says it pays, and the autotuner's "decode"
  blocks when there are some.
* :func:`rope` rotates pairs of channels by ``position * base^(-2i/d)``: the GPT-NeoX
  layout pairs channel ``i`` with ``i + d/2`` (``interleaved=False``), the GPT-J / original
  layout pairs ``2i`` with ``2i + 1`` (``interleaved=True``). Apply it to q and k before
  caching; then ``rope(q, m) . rope(k, n)`` depends on ``m - n`` only.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


class KVCache:
    """Preallocated keys and values for incremental decoding.

    Parameters
    ----------
    B, H_kv, max_len, d : positive ints (``max_len`` may be 0 only for an empty cache)
    dtype : float32 (default) or float64

    ``append`` accepts ``k_new``/``v_new`` of the cache's dtype, or of a dtype that casts
    to it without loss (``np.can_cast(..., "safe")``: float16 or float32 into a float64
    cache, float16 into a float32 one); anything else (float64 into a float32 cache:
    1e300 would become inf) raises ``TypeError``.
    """

    def __init__(self, B, H_kv, max_len, d, dtype=np.float32):
        for name, value, low in (("B", B, 1), ("H_kv", H_kv, 1), ("max_len", max_len, 0),
                                 ("d", d, 1)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.k = np.zeros((B, H_kv, max_len, d), dtype)
        self.v = np.zeros((B, H_kv, max_len, d), dtype)
        self.length = 0

    @property
    def shape(self):
        """``(B, H_kv, max_len, d)``."""
        return self.k.shape

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def keys(self) -> np.ndarray:
        """The filled keys, a read-only view ``(B, H_kv, length, d)``."""
        view = self.k[:, :, :self.length]
        view.flags.writeable = False
        return view

    @property
    def values(self) -> np.ndarray:
        """The filled values, a read-only view ``(B, H_kv, length, d)``."""
        view = self.v[:, :, :self.length]
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def append(self, k_new, v_new) -> int:
        """Write ``T`` new tokens ``(B, H_kv, T, d)`` after the filled part; returns the
        new length. Raises ``ValueError`` (nothing written) if ``length + T > max_len``."""
        from fa_lab.api import refuse_masked

        B, H_kv, _, d = self.k.shape
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            refuse_masked(name, x)
            x = np.asarray(x)
            if x.dtype.kind != "f":
                raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
            if not np.can_cast(x.dtype, self.k.dtype, "safe"):
                raise TypeError(f"{name} has dtype {x.dtype}, which does not fit the cache's "
                                f"{self.k.dtype} without loss: cast it first (or use a "
                                f"{x.dtype} cache)")
            if x.ndim != 4 or x.shape[:2] != (B, H_kv) or x.shape[3] != d:
                raise ValueError(f"{name} must have shape (B={B}, H_kv={H_kv}, T, d={d}), "
                                 f"got {x.shape}")
        k_new, v_new = np.asarray(k_new), np.asarray(v_new)
        if k_new.shape != v_new.shape:
            raise ValueError(f"v_new must have the shape of k_new {k_new.shape}, got "
                             f"{v_new.shape}")
        T = k_new.shape[2]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {T} new tokens > "
                             f"max_len={self.max_len}")
        self.k[:, :, self.length:self.length + T] = k_new
        self.v[:, :, self.length:self.length + T] = v_new
        self.length += T
        return self.length

    def reset(self) -> None:
        """Forget every token (the buffers are kept)."""
        self.length = 0

    def __repr__(self) -> str:
        B, H_kv, max_len, d = self.shape
        return (f"KVCache(B={B}, H_kv={H_kv}, length={self.length}/{max_len}, d={d}, "
                f"dtype={self.k.dtype.name})")


def decode(q, cache: KVCache, *, scale=None, return_lse=False, block_kv=None, splits=None):
    """Attention of new queries ``q`` ``(B, H, Tq, d)`` against the whole cache.

    Bottom-right causal (see the module docstring): append the new tokens' k and v to
    the cache first. ``H`` must be a multiple of the cache's ``H_kv`` (GQA). Runs the
    ``flash`` kernel on the cache buffers without copying them; ``block_kv`` and
    ``splits`` override the tuned/default key tile and the split-KV plan: ``block_kv`` a
    positive int (clamped to the cache length), ``splits`` a positive int, clamped to the
    number of key blocks (more splits than blocks would only add empty ones).
    """
    from fa_lab.api import _check_block, check_bool, check_scale, refuse_masked
    from fa_lab.kernels import flash
    from fa_lab.tune import tuned_blocks

    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a fa_lab.KVCache, got {type(cache).__name__}")
    refuse_masked("q", q)
    block_kv = _check_block("block_kv", block_kv)
    splits = _check_block("splits", splits)
    return_lse = check_bool("return_lse", return_lse)
    q = np.asarray(q)
    B, H_kv, _, d = cache.shape
    if q.dtype != cache.k.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.k.dtype}, got {q.dtype}")
    if q.ndim != 4 or q.shape[0] != B or q.shape[3] != d:
        raise ValueError(f"q must have shape (B={B}, H, Tq, d={d}), got {q.shape}")
    H, Tq = q.shape[1], q.shape[2]
    if H % H_kv:
        raise ValueError(f"the heads of q (H={H}) must be a multiple of the cache's kv "
                         f"heads (H_kv={H_kv})")
    L = cache.length
    if Tq > L:
        raise ValueError(f"q has {Tq} new tokens but the cache holds {L}: append the new "
                         f"tokens' k and v before decode()")
    scale = check_scale(scale, d)
    if Tq == 0:
        out, lse = np.zeros(q.shape, q.dtype), np.zeros(q.shape[:-1], q.dtype)
        return (out, lse) if return_lse else out
    tuned = tuned_blocks("flash", Tq)
    bq = min(tuned[0] if tuned else flash.DEFAULT_BLOCKS[0], Tq)
    bk = min(block_kv or (tuned[1] if tuned else flash.DEFAULT_BLOCKS[1]), L)
    if splits is not None:
        splits = min(splits, -(-L // bk))
    out, lse = flash.run(np.ascontiguousarray(q), cache.k, cache.v, None, scale,
                         "bottom_right", bq, bk, splits=splits, kv_len=L)
    return (out, lse) if return_lse else out


def rope(x, positions, base=10000.0, interleaved=False):
    """Rotary position embedding of ``x`` ``(..., T, d)`` at ``positions`` ``(T,)`` (or
    broadcastable to ``x.shape[:-1]``); ``d`` must be even. Computed in float64,
    returned in ``x``'s dtype. See the module docstring for the two layouts."""
    from fa_lab.api import refuse_masked

    refuse_masked("x", x)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., T, d), got {x.shape}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"the last dimension of x (d={d}) must be even for rope")
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iuf" or not np.isfinite(pos).all():
        raise TypeError(f"positions must be finite numbers, got dtype {pos.dtype}")
    try:
        pos = np.broadcast_to(pos, x.shape[:-1]).astype(np.float64)
    except ValueError:
        raise ValueError(f"positions of shape {np.shape(positions)} do not broadcast to "
                         f"x's (..., T) = {x.shape[:-1]}") from None
    if isinstance(base, (bool, np.bool_)) or not isinstance(base, numbers.Real):
        raise TypeError(f"base must be a positive finite number, got {base!r}")
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if not isinstance(interleaved, (bool, np.bool_)):
        raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    angle = pos[..., None] * inv  # (..., T, d/2)
    cos, sin = np.cos(angle), np.sin(angle)
    x64 = x.astype(np.float64)
    if interleaved:
        a, b = x64[..., 0::2], x64[..., 1::2]
    else:
        a, b = x64[..., :d // 2], x64[..., d // 2:]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x64)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :d // 2], out[..., d // 2:] = ra, rb
    return out.astype(x.dtype)


class TinyLM:
    """A small decoder-only transformer in NumPy with random weights (a fixed seed):
    token embedding, ``layers`` pre-LayerNorm blocks (GQA attention with RoPE, a GELU
    MLP), a final LayerNorm and an output projection of its own. Big enough to show that
    cached decoding gives exactly what recomputing full causal attention gives; not
    trained. (Tied output weights made greedy decoding repeat the prompt's last token
    forever: the residual stream still holds that token's embedding, which scores
    itself highest; "the same tokens" then proved little.)
    """

    def __init__(self, vocab=96, d_model=128, heads=4, kv_heads=2, layers=2, seed=0,
                 dtype=np.float32):
        if d_model % heads or heads % kv_heads:
            raise ValueError("d_model must be a multiple of heads, heads of kv_heads")
        rng = np.random.default_rng(seed)
        self.vocab, self.d_model, self.heads, self.kv_heads = vocab, d_model, heads, kv_heads
        self.head_dim = d_model // heads
        self.layers = layers
        self.dtype = np.dtype(dtype)
        s = 1 / math.sqrt(d_model)
        w = lambda *shape, scale=s: (rng.standard_normal(shape) * scale).astype(dtype)  # noqa: E731
        self.emb = w(vocab, d_model, scale=1.0)
        kv = kv_heads * self.head_dim
        self.blocks = [{"wq": w(d_model, d_model), "wk": w(d_model, kv), "wv": w(d_model, kv),
                        "wo": w(d_model, d_model), "w1": w(d_model, 4 * d_model),
                        "w2": w(4 * d_model, d_model, scale=1 / math.sqrt(4 * d_model))}
                       for _ in range(layers)]
        self.out = w(d_model, vocab)

    @staticmethod
    def _norm(x):
        mu = x.mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + 1e-5)

    def _split(self, x, heads):
        T = x.shape[0]
        return np.ascontiguousarray(x.reshape(T, heads, self.head_dim).transpose(1, 0, 2))[None]

    def forward(self, tokens, start, caches=None):
        """Logits ``(T, vocab)`` for ``tokens`` at positions ``start .. start + T - 1``.

        With ``caches`` (one :class:`KVCache` per layer) the new keys and values are
        appended and attention runs through :func:`decode`; without, ``tokens`` must be
        the whole sequence (``start = 0``) and attention is full causal
        :func:`fa_lab.attention`.
        """
        from fa_lab.api import attention

        x = self.emb[np.asarray(tokens)]
        T = x.shape[0]
        pos = np.arange(start, start + T)
        for i, blk in enumerate(self.blocks):
            h = self._norm(x)
            q = rope(self._split(h @ blk["wq"], self.heads), pos)
            k = rope(self._split(h @ blk["wk"], self.kv_heads), pos)
            v = self._split(h @ blk["wv"], self.kv_heads)
            if caches is None:
                a = attention(q, k, v, causal=True, kernel="flash")
            else:
                caches[i].append(k, v)
                a = decode(q, caches[i])
            x = x + a[0].transpose(1, 0, 2).reshape(T, self.d_model) @ blk["wo"]
            h = self._norm(x)
            u = h @ blk["w1"]
            x = x + (0.5 * u * (1 + np.tanh(0.7978845608 * (u + 0.044715 * u ** 3)))) @ blk["w2"]
        return self._norm(x) @ self.out

    def new_caches(self, max_len, B=1):
        return [KVCache(B, self.kv_heads, max_len, self.head_dim, self.dtype)
                for _ in range(self.layers)]

    def generate(self, prompt, steps, *, use_cache=True):
        """Greedy decoding: ``(tokens, logits per generated step)``.

        ``use_cache=True``: one prefill pass over the prompt, then one token per step
        through the caches. ``False``: every step recomputes the whole sequence with full
        causal attention (the reference the cache must reproduce).
        """
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt must hold at least one token")
        logits_out = []
        caches = self.new_caches(len(tokens) + steps) if use_cache else None
        if use_cache:
            logits = self.forward(tokens, 0, caches)[-1]
        for step in range(steps):
            if not use_cache:
                logits = self.forward(tokens, 0)[-1]
            logits_out.append(logits)
            nxt = int(np.argmax(logits))
            tokens.append(nxt)
            if use_cache and step < steps - 1:
                logits = self.forward([nxt], len(tokens) - 1, caches)[-1]
        return np.array(tokens), np.array(logits_out)


def time_generation(model: TinyLM, prompt_lengths, steps=16, repeats=3, seed=0):
    """Seconds per generated token, cached vs recomputed, for several prompt lengths
    (both validated to produce the same tokens first; timed by the benchmark harness,
    interleaved, with the machine's load). Returns a DataFrame."""
    import pandas as pd

    from fa_lab.bench import Contender, time_calls
    from fa_lab.verdict import quartiles

    rng = np.random.default_rng(seed)
    rows = []
    for n in prompt_lengths:
        prompt = rng.integers(0, model.vocab, n)
        a, la = model.generate(prompt, steps, use_cache=True)
        b, lb = model.generate(prompt, steps, use_cache=False)
        if not np.array_equal(a, b):
            raise AssertionError(f"cached and recomputed decoding differ at prompt length {n}")
        cs = [Contender(label, lambda c=cached: model.generate(prompt, steps, use_cache=c),
                        "kernel") for label, cached in (("cached", True), ("recompute", False))]
        t = time_calls(cs, (), repeats=repeats, warmup=0)  # the harness: cooldown, load
        (c25, c50, c75), (r25, r50, r75) = (quartiles(t[c.name]) for c in cs)
        rows.append({"prompt_len": n, "steps": steps,
                     "cached_ms_per_token": c50 / steps * 1e3,
                     "recompute_ms_per_token": r50 / steps * 1e3,
                     "speedup_low": r25 / c75, "speedup_high": r75 / c25,
                     "cached_q25_ms": c25 / steps * 1e3, "cached_q75_ms": c75 / steps * 1e3,
                     "recompute_q25_ms": r25 / steps * 1e3, "recompute_q75_ms": r75 / steps * 1e3,
                     "distinct_tokens": len(set(a[n:].tolist())),
                     "max_logit_diff": float(np.abs(la - lb).max()), **t.load.columns()})
    df = pd.DataFrame(rows)
    df["speedup"] = df["recompute_ms_per_token"] / df["cached_ms_per_token"]
    return df


def decode_latency(context_lengths, *, H=8, H_kv=8, d=64, repeats=30, seed=0):
    """Median latency of one :func:`decode` step (one new token) against caches of
    several lengths, with torch SDPA on the same keys beside it when installed (the
    benchmark harness, back-to-back calls, with the machine's load per row)."""
    import pandas as pd

    from fa_lab import reference
    from fa_lab.bench import Contender, _torch, time_calls
    from fa_lab.verdict import quartiles

    rng = np.random.default_rng(seed)
    torch = _torch()
    rows = []
    for L in context_lengths:
        cache = KVCache(1, H_kv, L, d)
        cache.append(rng.standard_normal((1, H_kv, L, d)).astype(np.float32),
                     rng.standard_normal((1, H_kv, L, d)).astype(np.float32))
        q = rng.standard_normal((1, H, 1, d)).astype(np.float32)
        expected, _ = reference.attention(q, cache.keys, cache.values, causal="bottom_right")
        np.testing.assert_allclose(decode(q, cache), expected, atol=1e-5, rtol=1e-4)
        fns = {"fa_lab.decode": lambda: decode(q, cache)}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(np.array(x)) for x in (q, cache.keys, cache.values))
            fns["torch_sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, enable_gqa=H != H_kv)
        cs = [Contender(n, f, "kernel") for n, f in fns.items()]
        # Back to back, as in a decoding loop (a pause would add the threads' wake-up).
        times = time_calls(cs, (), repeats=repeats, warmup=1, cooldown=0)
        for c in cs:
            q25, med, q75 = quartiles(times[c.name])
            rows.append({"context": L, "name": c.name, "median_ms": med * 1e3,
                         "q25_ms": q25 * 1e3, "q75_ms": q75 * 1e3, "H": H, "H_kv": H_kv,
                         **times.load.columns()})
    return pd.DataFrame(rows)



def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_rope(d=16, base=10000.0, seed=0):
    """Left: one channel pair of a vector rotated by RoPE at positions 0..7 (the angle
    grows with the position). Right: ``rope(q, m) . rope(k, n)`` against ``m - n`` for
    three absolute offsets ``n``: the curves coincide (relative positions only)."""
    plt = _plt()
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
    plt = _plt()
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


def plot_generation(df):
    """ms per generated token against prompt length, cached vs recomputed."""
    plt = _plt()
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
    plt = _plt()
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


def plot_kv_cache(prompt=6, generated=3, max_len=12):
    """The KV cache drawn: ``max_len`` slots per layer and kv head; the prompt's keys and
    values written by one prefill pass, then one slot per generated token; the newest
    query reads every filled slot (bottom-right causal), the empty ones never."""
    plt = _plt()
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
