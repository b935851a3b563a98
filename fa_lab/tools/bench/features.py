"""Benchmarks of flash-attn's features on the CPU (:func:`feature_studies`, or
``python -m fa_lab bench --sweep features``): validated first, then timed side by side
with :func:`fa_lab.tools.bench.harness.time_calls` (interleaved rounds, load recorded), judged
by :mod:`fa_lab.numerics.verdict` on quartile ranges.

Three studies, each with its target:

1. **sliding window** ``(256, 0)`` against full causal at ``N = 8192`` (``flash``): the
   pair count says ~16x less work; the tiles the kernel really visits (its loop bounds,
   :func:`fa_lab.kernels.common.window_keys`) give the model ratio beside the measured
   one. Budget: at least 5x.
2. **varlen against padding**: a batch of ragged sequences packed
   (:func:`fa_lab.attention_varlen`) against the same batch padded to the longest
   sequence with a key-padding mask (one :func:`fa_lab.attention` call). Budget: faster
   than padded (>= 1x); the work ratio (visible pairs) is printed beside it.
3. **paged decode against contiguous decode**: one new token per sequence against ragged
   caches through :func:`fa_lab.attention_with_kvcache`, pages shuffled in the pool, against
   the same caches contiguous. Budget: the paged cache costs at most 1.25x.
"""

from __future__ import annotations

import numpy as np

from fa_lab.numerics import reference, verdict
from fa_lab.api import attention
from fa_lab.tools.bench.harness import Contender, time_calls
from fa_lab.settings import config
from fa_lab.features.kvcache import attention_with_kvcache, paginate
from fa_lab.numerics.tiling import tile_classes, SKIPPED
from fa_lab.numerics.testing import Case, assert_close
from fa_lab.features.varlen import attention_varlen, pack

WINDOW = (256, 0)
WINDOW_NEED = 5.0
VARLEN_NEED = 1.0
PAGED_NEED = 1.25


def tiles_visited(N, window, causal, block_q, block_kv) -> int:
    """Key tiles a tiled kernel computes for one head: the tiles :mod:`fa_lab.numerics.tiling` does
    not skip (the Python mirror of the kernels' loop bounds, tested against them)."""
    w = None if tuple(window) == (-1, -1) else window
    return int((tile_classes(N, N, block_q, block_kv, causal, w) != SKIPPED).sum())


def visible_pairs(N, window=(-1, -1)) -> int:
    """(query, key) pairs a causal row set sees, with an optional left window."""
    i = np.arange(N)
    seen = i + 1 if window[0] < 0 else np.minimum(i + 1, window[0] + 1)
    return int(seen.sum())


def _row(study, name, times, extra=None):
    q25, med, q75 = verdict.quartiles(times[name])
    return {"study": study, "name": name, "median_ms": med * 1e3, "q25_ms": q25 * 1e3,
            "q75_ms": q75 * 1e3, **(extra or {}), **times.load.columns()}


def _judge(study, what, times, slow, fast, need, at_least=True, rows=None):
    low, value, high = times.ratio(slow, fast)
    if not at_least:  # a cost ratio: fast's time over slow's
        low, value, high = 1 / high, 1 / value, 1 / low
    v = verdict.judge(what, value, need, at_least=at_least, low=low, high=high,
                      load=times.load)
    for r in rows:
        r.update({"ratio": value, "ratio_low": low, "ratio_high": high, "verdict": v.text})
    return v


def window_study(N=8192, H=8, d=64, repeats=5, window=WINDOW, seed=0):
    """Sliding window against full causal, both ``flash`` with its default tiles."""
    q, k, v = Case(B=1, H=H, Nq=N, d=d).inputs(np.float32, seed=seed)
    full = Contender("flash, causal", lambda q, k, v: attention(q, k, v, causal=True,
                                                               kernel="flash"), "kernel")
    win = Contender(f"flash, causal + window {window}", lambda q, k, v: attention(
        q, k, v, causal=True, window=window, kernel="flash"), "kernel")
    for c, w in ((full, None), (win, window)):  # validate the first and last 64 rows
        out = c.fn(q, k, v)
        for rows, align in ((slice(0, 64), True), (slice(N - 64, N), "bottom_right")):
            exp, _ = reference.attention(q[..., rows, :], k, v, causal=align, window=w)
            base, _ = reference.attention(q[..., rows, :], k, v, causal=align, window=w,
                                          dtype=np.float32)
            assert_close(out[..., rows, :], exp, baseline=base, what=c.name,
                         magnitude=np.abs(v).max())
    times = time_calls([full, win], (q, k, v), repeats=repeats)
    bq, bk = (min(b, N) for b in config.FLASH_BLOCKS)
    model = {"pairs_ratio": visible_pairs(N) / visible_pairs(N, window),
             "tiles_ratio": tiles_visited(N, (-1, -1), True, bq, bk)
             / tiles_visited(N, window, True, bq, bk)}
    rows = [_row("window", c.name, times, {"N": N, "H": H, "d": d, **model})
            for c in (full, win)]
    _judge("window", f"sliding window {window} vs full causal, N={N} (speed ratio)", times,
           full.name, win.name, WINDOW_NEED, rows=rows)
    return rows


def varlen_study(lengths=None, H=8, d=64, repeats=5, seed=0):
    """Packed varlen against the padded batch (key-padding mask) and a per-sequence loop."""
    rng = np.random.default_rng(seed)
    lengths = list(lengths) if lengths is not None else [int(x) for x in
                                                         rng.integers(128, 2049, size=8)]
    seqs = [Case(B=1, H=H, Nq=n, d=d).inputs(np.float32, seed=seed + i)
            for i, n in enumerate(lengths)]
    per_seq = [tuple(x[0].transpose(1, 0, 2) for x in s) for s in seqs]  # (N, H, d)
    (q, cu), (k, _), (v, _) = (pack([s[i] for s in per_seq]) for i in range(3))
    N, B = max(lengths), len(lengths)
    pad = np.zeros((3, B, H, N, d), np.float32)
    for b, s in enumerate(seqs):
        for i in range(3):
            pad[i, b, :, :lengths[b]] = s[i][0]
    mask = (np.arange(N)[None, :] < np.array(lengths)[:, None])[:, None, None, :]
    packed = Contender("varlen (packed)", lambda q, k, v: attention_varlen(
        q, k, v, cu, cu, causal=True), "kernel")
    padded = Contender("padded batch + key mask", lambda q, k, v: attention(
        pad[0], pad[1], pad[2], causal=True, mask=mask, kernel="flash"), "kernel")
    loop = Contender("one call per sequence", lambda q, k, v: [attention(
        *s, causal=True, kernel="flash") for s in seqs], "kernel")
    got, ref_pad = packed.fn(q, k, v), padded.fn(q, k, v)
    for b, n in enumerate(lengths):  # packed rows == the padded rows (both validated
        rows = slice(cu[b], cu[b + 1])  # against the reference by the tests)
        np.testing.assert_allclose(got[rows].transpose(1, 0, 2), ref_pad[b, :, :n],
                                   rtol=1e-4, atol=1e-5)
    times = time_calls([packed, padded, loop], (q, k, v), repeats=repeats)
    work = B * visible_pairs(N) / sum(visible_pairs(n) for n in lengths)
    extra = {"B": B, "lengths": " ".join(map(str, lengths)), "H": H, "d": d,
             "pairs_ratio": work}
    rows = [_row("varlen", c.name, times, extra) for c in (packed, padded, loop)]
    _judge("varlen", f"packed varlen vs padded batch, lengths {min(lengths)}..{N} (speed "
           "ratio)", times, padded.name, packed.name, VARLEN_NEED, rows=rows[:2])
    rows[2]["ratio"] = times.ratio(loop.name, packed.name)[1]
    return rows


def paged_study(B=8, H=8, H_kv=8, d=64, lengths=None, page=256, repeats=30, seed=0):
    """Decode (one query per sequence) against ragged caches: paged against contiguous."""
    rng = np.random.default_rng(seed)
    lens = np.array(lengths if lengths is not None else rng.integers(1024, 8193, size=B),
                    np.int32)
    B, S = len(lens), int(-(-lens.max() // page) * page)
    kc = rng.standard_normal((B, H_kv, S, d)).astype(np.float32)
    vc = rng.standard_normal((B, H_kv, S, d)).astype(np.float32)
    q = rng.standard_normal((B, H, 1, d)).astype(np.float32)
    kp, vp, table = paginate(kc, vc, page, rng=rng)
    contiguous = Contender("contiguous cache", lambda q, k, v: attention_with_kvcache(
        q, kc, vc, cache_seqlens=lens), "kernel")
    paged = Contender(f"paged cache (pages of {page}, shuffled)",
                      lambda q, k, v: attention_with_kvcache(q, kp, vp, cache_seqlens=lens,
                                                             block_table=table), "kernel")
    a, b = contiguous.fn(q, None, None), paged.fn(q, None, None)
    exp, _ = reference.attention(q[0], kc[0, :, :lens[0]], vc[0, :, :lens[0]])
    base, _ = reference.attention(q[0], kc[0, :, :lens[0]], vc[0, :, :lens[0]],
                                  dtype=np.float32)
    assert_close(a[0], exp, baseline=base, magnitude=np.abs(vc).max())
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    times = time_calls([contiguous, paged], (q, None, None), repeats=repeats, warmup=2,
                       cooldown=0)
    extra = {"B": B, "H": H, "H_kv": H_kv, "d": d, "lengths": " ".join(map(str, lens)),
             "page": page}
    rows = [_row("paged", c.name, times, extra) for c in (contiguous, paged)]
    _judge("paged", f"paged vs contiguous decode, pages of {page} (cost ratio)", times,
           contiguous.name, paged.name, PAGED_NEED, at_least=False, rows=rows)
    return rows


def feature_studies(quick=False, repeats=5, progress=None):
    """All three studies as one table (``quick``: small shapes, for tests and lessons)."""
    import pandas as pd

    say = progress or (lambda m: None)
    say("sliding window vs causal")
    rows = window_study(N=2048 if quick else 8192, H=1 if quick else 8, repeats=repeats)
    say("varlen vs padded")
    rows += varlen_study([40, 300, 90, 512] if quick else None, H=2 if quick else 8,
                         repeats=repeats)
    say("paged vs contiguous decode")
    rows += paged_study(B=2 if quick else 8, lengths=[700, 1500] if quick else None,
                        page=128 if quick else 256, repeats=max(repeats, 10 if quick else 30))
    return pd.DataFrame(rows)


#: What ``bench --sweep features`` prints (the CSV has every column, lengths included).
COLUMNS = ["study", "name", "B", "H", "N", "page", "median_ms", "q25_ms", "q75_ms", "ratio",
           "ratio_low", "ratio_high", "pairs_ratio", "tiles_ratio", "verdict", "others_pct",
           "steal_pct"]
