"""Lesson 15's measurements: ``flex_attention`` against ``flash`` (the same work written
by hand), packed documents against the fraction of tiles they compute, PyTorch's
FlexAttention (compiled where it can be) on the same functions, and the compile time of a
new function. Every ratio is timed side by side in one process (interleaved rounds)."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import pandas as pd

from fa_lab.api import attention
from fa_lab.features.flex import flex_attention
from fa_lab.numerics.flex import FULL, create_block_mask
from fa_lab.numerics import verdict
from fa_lab.tools.bench.harness import Contender, time_calls


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def document_ids(N, documents=8, seed=0) -> np.ndarray:
    """``N`` token positions cut into ``documents`` packed documents of random lengths."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, N), documents - 1, replace=False))
    return np.repeat(np.arange(documents), np.diff(np.concatenate([[0], cuts, [N]])))


def document_mask(doc_ids):
    """A ``mask_mod``: causal within each packed document (closes over ``doc_ids``)."""
    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx] and q_idx >= kv_idx
    return same_document


def inputs(N, H=8, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, H, N, d), dtype=np.float32) for _ in range(3))


def _row(t, name, base, case, **extra):
    q25, med, q75 = verdict.quartiles(t[name])
    low, mid, high = t.ratio(base, name) if base else (np.nan,) * 3
    return {"case": case, "contender": name, "median_ms": 1e3 * med, "q25_ms": 1e3 * q25,
            "q75_ms": 1e3 * q75, "speed_vs_baseline": mid, "low": low, "high": high,
            **extra, **t.load.columns()}


def flex_vs_flash(N=4096, H=8, d=64, block=128, repeats=5) -> pd.DataFrame:
    """Two pairs: no modification (``flex_attention`` vs ``attention``) and causal through
    a block mask vs ``attention(causal=True)``; each validated against the other first."""
    q, k, v = inputs(N, H, d)
    bm = create_block_mask(causal, None, None, N, N, BLOCK_SIZE=block)
    rows = []
    for case, flash_fn, flex_fn in (
            ("no modification", lambda: attention(q, k, v),
             lambda: flex_attention(q, k, v)),
            ("causal", lambda: attention(q, k, v, causal=True),
             lambda: flex_attention(q, k, v, block_mask=bm))):
        diff = float(np.abs(flash_fn() - flex_fn()).max())
        cs = [Contender("flash", flash_fn, "kernel"), Contender("flex", flex_fn, "kernel")]
        t = time_calls(cs, (), repeats=repeats)
        rows += [_row(t, "flash", None, case, max_abs_diff=diff),
                 _row(t, "flex", "flash", case, max_abs_diff=diff)]
    return pd.DataFrame(rows)


def packed_documents(N=4096, H=8, d=64, documents=8, block=128, repeats=5) -> pd.DataFrame:
    """Packed documents through a block mask against two dense flex calls: without a mask
    (the kernel's own tiles) and with every tile full at the mask's tile size. The time
    ratio over (fraction of tiles computed) x (dense time), for both."""
    q, k, v = inputs(N, H, d)
    bm = create_block_mask(document_mask(document_ids(N, documents)), None, None, N, N,
                           BLOCK_SIZE=block)
    full = dataclasses.replace(bm, kinds=np.full_like(bm.kinds, FULL))
    cs = [Contender("dense", lambda: flex_attention(q, k, v), "kernel"),
          Contender("dense, mask tiles", lambda: flex_attention(q, k, v, block_mask=full),
                    "kernel"),
          Contender("documents", lambda: flex_attention(q, k, v, block_mask=bm), "kernel")]
    t = time_calls(cs, (), repeats=repeats)
    frac = bm.computed()
    row = {"documents": documents, "block": block, "tiles_computed": frac, **bm.counts()}
    for name in ("dense", "dense, mask tiles", "documents"):
        row[f"{name} ms"] = 1e3 * verdict.quartiles(t[name])[1]
    for name, key in (("dense", "vs_dense"), ("dense, mask tiles", "vs_dense_mask_tiles")):
        low, mid, high = verdict.ratio_range(t["documents"], [x * frac for x in t[name]])
        row.update({key: mid, f"{key}_low": low, f"{key}_high": high})
    return pd.DataFrame([{**row, **t.load.columns()}])


def masks_for(N, window=None, prefix=None, documents=8):
    """The lesson's mask functions for length ``N`` (name -> mask_mod): causal, a
    window of ``N / 8`` keys, a prefix of ``N / 4`` tokens, packed documents."""
    window = N // 8 if window is None else window
    prefix = N // 4 if prefix is None else prefix
    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx and q_idx - kv_idx < window

    def prefix_lm(b, h, q_idx, kv_idx):
        return kv_idx < prefix or q_idx >= kv_idx

    return {"causal": causal, f"window {window}": sliding_window,
            f"prefix-LM {prefix}": prefix_lm,
            f"{documents} documents": document_mask(document_ids(N, documents))}


def time_vs_fraction(N=4096, H=8, d=64, block=128, repeats=3) -> pd.DataFrame:
    """Each mask of :func:`masks_for` (and none) through a block mask: the fraction of
    tiles computed and the time, interleaved in one run."""
    q, k, v = inputs(N, H, d)
    masks = {name: create_block_mask(fn, None, None, N, N, BLOCK_SIZE=block)
             for name, fn in masks_for(N).items()}
    cs = [Contender("dense", lambda: flex_attention(q, k, v), "kernel")]
    cs += [Contender(name, lambda bm=bm: flex_attention(q, k, v, block_mask=bm), "kernel")
           for name, bm in masks.items()]
    t = time_calls(cs, (), repeats=repeats)
    rows = []
    for c in cs:
        q25, med, q75 = verdict.quartiles(t[c.name])
        frac = 1.0 if c.name == "dense" else masks[c.name].computed()
        rows.append({"mask": c.name, "tiles_computed": frac, "median_ms": 1e3 * med,
                     "q25_ms": 1e3 * q25, "q75_ms": 1e3 * q75, **t.load.columns()})
    return pd.DataFrame(rows)


def compile_seconds(N=256, H=2, d=32) -> float:
    """Seconds to the first result of a ``score_mod`` never seen before (numba compiles
    it and a kernel specialised for it)."""
    q, k, v = inputs(N, H, d)
    scale = float(np.random.default_rng().random())

    def fresh(score, b, h, q_idx, kv_idx):  # a new function object: compiled anew
        return score * scale

    t0 = time.perf_counter()
    flex_attention(q, k, v, score_mod=fresh)
    return time.perf_counter() - t0


def against_torch(N=4096, H=8, d=64, repeats=3, compiled=True) -> pd.DataFrame | None:
    """fa_lab's flex against PyTorch's FlexAttention (compiled with ``torch.compile``
    where ``compiled``, else eager) on ALiBi-style arithmetic and a causal block mask;
    None without torch. The compiled function's first call (compilation) is untimed."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask as t_mask
        from torch.nn.attention.flex_attention import flex_attention as t_flex
    except ImportError:
        return None

    def alibi(score, b, h, q_idx, kv_idx):  # arithmetic only: tensors and scalars alike
        return score - (h + 1) * 0.0625 * abs(q_idx - kv_idx)

    q, k, v = inputs(N, H, d)
    qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
    bm = create_block_mask(causal, None, None, N, N, BLOCK_SIZE=128)
    tbm = t_mask(causal, None, None, N, N, device="cpu")
    fn = torch.compile(t_flex) if compiled else t_flex
    mine = flex_attention(q, k, v, score_mod=alibi, block_mask=bm)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # eager mode warns that it materializes the scores
        warnings.simplefilter("ignore", UserWarning)
        theirs = fn(qt, kt, vt, score_mod=alibi, block_mask=tbm).numpy()
    first = time.perf_counter() - t0
    cs = [Contender("torch flex" + (" (compiled)" if compiled else " (eager)"),
                    lambda: fn(qt, kt, vt, score_mod=alibi, block_mask=tbm), "baseline"),
          Contender("fa_lab flex", lambda: flex_attention(q, k, v, score_mod=alibi,
                                                          block_mask=bm), "kernel")]
    t = time_calls(cs, (), repeats=repeats)
    rows = [_row(t, cs[0].name, None, "alibi + causal", first_call_s=first,
                 max_abs_diff=float(np.abs(mine - theirs).max())),
            _row(t, cs[1].name, cs[0].name, "alibi + causal", first_call_s=np.nan,
                 max_abs_diff=float(np.abs(mine - theirs).max()))]
    return pd.DataFrame(rows)


__all__ = ["flex_vs_flash", "packed_documents", "masks_for", "time_vs_fraction", "compile_seconds", "against_torch",
           "document_ids", "document_mask", "causal"]
