"""Attention against a KV cache with ragged lengths, contiguous or paged:
:func:`attention_with_kvcache` (flash-attn's ``flash_attn_with_kvcache``).

Two cache layouts, one kernel (:data:`fa_lab.registry.KVCACHE_KERNELS`):

* contiguous: ``k_cache``/``v_cache`` ``(B, H_kv, S_max, d)``, sequence ``b`` in row ``b``;
* paged (a serving engine's cache, vLLM's "PagedAttention"): a pool of pages
  ``(num_blocks, H_kv, block_size, d)`` shared by all sequences, and ``block_table``
  ``(B, max_blocks)``: sequence ``b``'s logical key ``j`` lives in page
  ``block_table[b, j // block_size]``, row ``j % block_size``. Pages need not be in
  order or adjacent; the kernel reads them in place through the table.

``cache_seqlens[b]`` keys of sequence ``b`` are valid. New keys/values ``k``, ``v`` are
written at positions ``cache_seqlens[b] ...`` (in place) before the attention; the
function does not update ``cache_seqlens`` (the caller owns it, as in flash-attn).
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.api import choose_kernel, effective_blocks
from fa_lab.numerics.checks import (as_float_array, check_block, check_bool, check_scale,
                                    int_array, refuse_masked)
from fa_lab.numerics.kvquant import FORMATS, channels, format_of, quantize_rows
from fa_lab.numerics.merge import apply_sinks, check_sinks
from fa_lab.registry import KVCACHE_KERNELS, Request
from fa_lab.settings.tuning_file import alike, decode_path, measured_choice, measured_reason
from fa_lab.numerics.scoremod import check_mods


def _seqlens(cache_seqlens, B) -> np.ndarray:
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        lens = np.full(B, int(cache_seqlens), np.int64)
    else:
        lens = int_array("cache_seqlens", cache_seqlens, "(B,)")
        if lens.shape != (B,):
            raise ValueError(f"cache_seqlens must be an int or have shape ({B},), got "
                             f"{lens.shape}")
    if np.any(lens < 0):
        raise ValueError(f"cache_seqlens must be >= 0, got {lens.min()}")
    return lens


def _check_caches(q, k_cache, v_cache, k_scale, v_scale, writing):
    """The caches (and the scales of an int8 / int4 cache), checked; returns ``(kc, vc,
    ks, vs, kv_format, d_v)``."""
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale),
                    ("v_scale", v_scale)):
        if writing and x is not None and not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array to be written in place, got "
                            f"{type(x).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must have shape (B, H, Nq, d), got {q.shape}")
    quantized = k_scale is not None or v_scale is not None or (
        isinstance(k_cache, np.ndarray) and k_cache.dtype in (np.int8, np.uint8))
    if quantized:
        kc, vc, ks, vs, fmt = _check_quantized(q, k_cache, v_cache, k_scale, v_scale)
    else:
        kc, vc = as_float_array("k_cache", k_cache), as_float_array("v_cache", v_cache)
        ks = vs = None
        fmt = "float"
        if kc.dtype != q.dtype or vc.dtype != q.dtype:
            raise TypeError(f"the caches must have q's dtype {q.dtype}, got {kc.dtype}")
    if kc.ndim != 4 or vc.ndim != 4 or vc.shape[:3] != kc.shape[:3] or vc.shape[3] == 0:
        raise ValueError(f"k_cache and v_cache must be 4-D with one shape except v's head "
                         f"dimension d_v >= 1, got {kc.shape} and {vc.shape}")
    H, d, H_kv = q.shape[1], q.shape[3], kc.shape[1]
    d_k, d_v = channels(kc), channels(vc)  # int4: two channels a byte
    if d_k != d or d == 0:
        raise ValueError(f"k_cache must hold the head dimension d={d} >= 1 of q, got "
                         f"{kc.shape} ({kc.dtype})")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the heads of q (H={H}) must be a multiple of the caches' heads "
                         f"(H_kv={H_kv})")
    if writing and not all(x.flags.writeable for x in (kc, vc, ks, vs) if x is not None):
        raise ValueError("k_cache and v_cache (and their scales) must be writable to "
                         "append k and v")
    return kc, vc, ks, vs, fmt, d_v


def _check_quantized(q, k_cache, v_cache, k_scale, v_scale):
    kc, vc = np.asarray(k_cache), np.asarray(v_cache)
    fmt = format_of(kc, k_scale)
    if format_of(vc, v_scale) != fmt:
        raise TypeError(f"k_cache and v_cache must have one format, got {kc.dtype} and "
                        f"{vc.dtype}")
    if q.dtype != np.float32:
        raise TypeError(f"an {fmt} cache takes float32 queries, got q of dtype {q.dtype}")
    scales = []
    for name, x, sc in (("k_scale", kc, k_scale), ("v_scale", vc, v_scale)):
        sc = np.asarray(sc)
        if sc.dtype != np.float32:
            raise TypeError(f"{name} must be float32 (as fa_lab.quantize_kv returns), got "
                            f"{sc.dtype}")
        G = sc.shape[-1] if sc.ndim == 4 else 0
        if sc.shape[:-1] != x.shape[:-1] or G == 0 or channels(x) % G or (
                fmt == "int4" and (channels(x) // G) % 2):
            even = " (an even number of channels each, for int4)" if fmt == "int4" else ""
            raise ValueError(f"{name} must have shape {x.shape[:-1]} + (groups,), the "
                             f"groups dividing d={channels(x)}{even}, got {sc.shape}")
        scales.append(sc)
    return kc, vc, scales[0], scales[1], fmt


def _check_mean(k_mean, ks, B, H_kv, d):
    if k_mean is None:
        return None
    if ks is None:
        raise ValueError("k_mean applies only to a quantized (int8 / int4) cache")
    refuse_masked("k_mean", k_mean)
    m = np.asarray(k_mean)
    if m.dtype != np.float32 or m.shape != (B, H_kv, d):
        raise ValueError(f"k_mean must be float32 of shape ({B}, {H_kv}, {d}), got "
                         f"{m.dtype} {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("k_mean must be finite")
    return m


def _table(block_table, B, num_blocks, k_cache) -> np.ndarray:
    """The block table, or ``[[0], [1], ...]`` for a contiguous cache (one page per row)."""
    if block_table is None:
        if num_blocks != B:
            raise ValueError(f"a contiguous k_cache must have B={B} rows, got {num_blocks} "
                             f"(pass block_table for a paged cache)")
        return np.arange(B, dtype=np.int64)[:, None]
    table = int_array("block_table", block_table, "(B, max_blocks)")
    if table.ndim != 2 or table.shape[0] != B:
        raise ValueError(f"block_table must have shape ({B}, max_blocks), got {table.shape}")
    return table


def _check_new(k, v, B, H_kv, d, d_v, dtype):
    """The new tokens (float, q's dtype; quantized on write into an int8 / int4 cache)."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if k is None:
        return None, None, 0
    k, v = as_float_array("k", k), as_float_array("v", v)
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"k and v must have q's dtype {dtype}, got {k.dtype}, {v.dtype}")
    if (k.ndim != 4 or k.shape[:2] != (B, H_kv) or k.shape[3] != d or v.ndim != 4
            or v.shape[:3] != k.shape[:3] or v.shape[3] != d_v):
        raise ValueError(f"k and v must have shapes ({B}, {H_kv}, Nnew, {d}) and ({B}, "
                         f"{H_kv}, Nnew, {d_v}), got {k.shape} and {v.shape}")
    return k, v, k.shape[2]


def attention_with_kvcache(q: ArrayLike, k_cache: np.ndarray, v_cache: np.ndarray, *,
                           cache_seqlens: int | ArrayLike, k: ArrayLike | None = None,
                           v: ArrayLike | None = None, block_table: ArrayLike | None = None,
                           causal: bool = True, scale: float | None = None,
                           window: tuple[int, int] | None = None, softcap: float = 0.0,
                           alibi_slopes: ArrayLike | None = None, return_lse: bool = False,
                           kernel: str = "auto", block_q: int | None = None,
                           block_kv: int | None = None, splits: int | None = None,
                           sinks: ArrayLike | None = None, k_scale: ArrayLike | None = None,
                           v_scale: ArrayLike | None = None, k_mean: ArrayLike | None = None
                           ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attend ``q`` to each sequence's cached keys (after appending ``k``, ``v``).

    Parameters
    ----------
    q : (B, H, Nq, d) float32 or float64
    k_cache, v_cache : contiguous ``(B, H_kv, S_max, d)``, or paged ``(num_blocks, H_kv,
        block_size, d)`` with ``block_table``; q's dtype (``v_cache`` may have its own head
        dimension ``d_v``). Written in place when ``k`` is
        given (so they must be writable NumPy arrays). Or a quantized cache (int8, or
        packed int4 as uint8 with ``d // 2`` bytes a row: :func:`fa_lab.quantize_kv`'s
        layout) with its scales ``k_scale``, ``v_scale`` (float32, ``k_cache.shape[:3] +
        (groups,)``, finite and positive as quantize_kv returns them: not checked at each
        step, which would read them all): read in place (a C-contiguous cache; any other
        is copied for the call, as for float caches) and dequantized in the kernel's
        inner loop, never into a float copy; new ``k``, ``v`` are quantized on write (same bits, same
        groups) and their scales written too. Quantized caches take float32 ``q`` and
        no window, softcap or ALiBi (kernel ``"quantized"``).
    cache_seqlens : int or integer array (B,): valid tokens per sequence before the append
    k, v : (B, H_kv, Nnew, d), optional: written at ``cache_seqlens[b] ...`` first
        (through the block table when paged). A write past a sequence's capacity
        (``S_max``, or ``max_blocks * block_size``) raises ValueError and writes nothing.
    block_table : integer (B, max_blocks), optional: page indices (the paged layout)
    causal : bool
        Sequence ``b`` then has ``L_b = cache_seqlens[b] + Nnew`` keys; with ``causal``,
        query ``i`` sees keys ``j <= L_b - Nq + i`` (bottom-right). Queries stand at
        ``L_b - Nq + i`` for the window and ALiBi too.
    scale, window, softcap, alibi_slopes : as in :func:`fa_lab.attention`
    kernel : "auto" or a name in :data:`fa_lab.registry.KVCACHE_KERNELS` ("auto" reads an
        int8 / int4 cache with ``"quantized"``, and refuses what that kernel cannot do
        rather than fall back to the float64 reference; a float cache, when decoding,
        with the kernel and splits measured fastest on this machine if
        ``python -m fa_lab tune`` ran here: :func:`plan_kvcache` tells)
    block_q, block_kv : positive ints, optional: the tiles (a key tile never crosses a page)
    splits : positive int, optional: Flash-Decoding key splits per (sequence, head, query
        block), merged exactly; by default planned for the threads (``plan()``)
    k_scale, v_scale : float32 arrays, the scales of an int8 / int4 cache (see above)
    k_mean : float32 ``(B, H_kv, d)``, optional, with a quantized cache: the per-channel
        key offsets its keys were stored without (``k - k_mean`` quantized, as
        :func:`fa_lab.quantize_kv` does with ``smooth_k=True``; new ``k`` are written the
        same way). Scores then lose ``q . k_mean``, the same for every key of a query, so
        the output is unchanged; the LSE (and sinks, merged through it) gets it back.

    Returns
    -------
    out : (B, H, Nq, d_v) (``d_v``: v_cache's head dimension, which may differ from d);
    lse : (B, H, Nq) with ``return_lse``. A sequence with no key
    gives zeros and ``lse = -inf``.
    """
    q = as_float_array("q", q)
    writing = k is not None or v is not None
    kc, vc, ks, vs, fmt, d_v = _check_caches(q, k_cache, v_cache, k_scale, v_scale, writing)
    B, H, Nq, d = q.shape
    num_blocks, H_kv, page = kc.shape[:3]
    lens = _seqlens(cache_seqlens, B)
    table = _table(block_table, B, num_blocks, kc)
    k_new, v_new, n_new = _check_new(k, v, B, H_kv, d, d_v, q.dtype)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, d)
    return_lse = check_bool("return_lse", return_lse)
    mods = check_mods(window, softcap, alibi_slopes, (B,), H, q.dtype)
    sinks = check_sinks(sinks, (B,), H, q.dtype)
    k_mean = _check_mean(k_mean, ks, B, H_kv, d)
    lengths = lens + n_new
    capacity = table.shape[1] * page
    if np.any(lengths > capacity):
        b = int(np.argmax(lengths > capacity))
        raise ValueError(f"sequence {b} would hold {lengths[b]} tokens (cache_seqlens "
                         f"{lens[b]} + {n_new} new), past its capacity of {capacity}; "
                         f"nothing was written")
    for b in range(B):  # every page a sequence uses must exist (checked before writing)
        used = table[b, :-(-int(lengths[b]) // page)]
        if used.size and (used.min() < 0 or used.max() >= num_blocks):
            raise ValueError(f"block_table[{b}] points outside the {num_blocks} pages: "
                             f"{used.tolist()}; nothing was written")
    req = Request(dtype=q.dtype, causal=causal, gqa=H != H_kv,
                  blocks=block_q is not None or block_kv is not None, window=mods.window,
                  softcap=mods.softcap > 0, alibi=mods.slopes is not None, dv=d_v != d,
                  kv_format=fmt)
    splits = check_block("splits", splits)
    block_q, block_kv = check_block("block_q", block_q), check_block("block_kv", block_kv)
    chosen, splits, _ = choose_decode(kernel, req, B, H, H_kv, Nq, splits)
    if n_new and ks is not None:
        bits = FORMATS[fmt][0]
        shifted = k_new if k_mean is None else k_new - k_mean[:, :, None, :]
        kq, kqs = quantize_rows(shifted, bits, d // ks.shape[3], "k")
        vq, vqs = quantize_rows(v_new, bits, d_v // vs.shape[3], "v")
        _write(kc, vc, table, lens, kq, vq)
        _write(k_scale, v_scale, table, lens, kqs, vqs)
    elif n_new:
        _write(kc, vc, table, lens, k_new, v_new)
    bq, bk = effective_blocks(Nq, max(page, 1), block_q, block_kv, chosen.default_blocks)
    if Nq == 0 or B == 0:
        out, lse = np.zeros(q.shape[:3] + (d_v,), q.dtype), np.zeros(q.shape[:3], q.dtype)
    else:
        kr, vr = np.ascontiguousarray(kc), np.ascontiguousarray(vc)  # no copy when contiguous
        scales = {} if ks is None else {"k_scale": np.ascontiguousarray(ks),
                                        "v_scale": np.ascontiguousarray(vs)}
        out, lse = chosen.run(np.ascontiguousarray(q), kr, vr, table, lengths, scale, causal,
                              bq, bk, mods, splits=splits, **scales)
        if k_mean is not None:  # scores lost q . k_mean (scaled): the LSE gets it back
            km = np.repeat(k_mean, H // H_kv, axis=1).astype(np.float64)
            lse = (lse + scale * np.einsum("bhnd,bhd->bhn", q, km)).astype(lse.dtype)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks[:, :, None])
    return (out, lse) if return_lse else out


def choose_decode(kernel, req, B, H, H_kv, Nq, splits=None) -> tuple:
    """``(kernel, splits, why)`` for a cache call. ``"auto"`` reads an int8 / int4
    cache with ``"quantized"`` (never the float64 reference by fallback); on a float
    cache, for a decode step (``Nq = 1``), it runs the kernel measured fastest on this
    machine among those that serve the call (:func:`fa_lab.tools.tune.tune_paths` run
    here), with its splits where ``B * H`` is like the measured shape's; else the fastest
    kernel that serves it."""
    why = "given" if kernel != "auto" else "the fastest kernel that serves the call"
    if req.kv_format != "float" and kernel == "auto":
        kernel, why = "quantized", "the kernel that reads int8 / int4 caches"
    elif kernel == "auto" and Nq == 1:  # a decode step, as measured
        path = decode_path(H, H_kv)
        serves = lambda c: c["kernel"] in KVCACHE_KERNELS and not (  # noqa: E731
            KVCACHE_KERNELS[c["kernel"]].unsupported(req))
        best = measured_choice(path, serves, api="kvcache")
        if best:
            kernel, why = best["kernel"], measured_reason(path, best, serves, api="kvcache")
            if splits is None and alike(path, B, H, Nq):
                splits = best["splits"]
    chosen, _ = choose_kernel(kernel, req, KVCACHE_KERNELS)
    return chosen, splits, why


def plan_kvcache(q: ArrayLike, k_cache: np.ndarray, v_cache: np.ndarray, *,
                 kernel: str = "auto", causal: bool = True, splits: int | None = None,
                 window: tuple[int, int] | None = None, softcap: float = 0.0,
                 alibi_slopes: ArrayLike | None = None, k_scale: ArrayLike | None = None,
                 v_scale: ArrayLike | None = None) -> dict:
    """What :func:`attention_with_kvcache` would run for a ``q`` against these caches
    (nothing is written or computed): ``kernel``, ``splits`` (None: the kernel plans
    them from the lengths) and ``why`` (for a measured choice, the medians that made
    it: :mod:`fa_lab.settings.tuning_file`)."""
    q = as_float_array("q", q)
    kc, vc, ks, vs, fmt, d_v = _check_caches(q, k_cache, v_cache, k_scale, v_scale, False)
    B, H, Nq, d = q.shape
    mods = check_mods(window, softcap, alibi_slopes, (B,), H, q.dtype)
    req = Request(dtype=q.dtype, causal=check_bool("causal", causal), gqa=H != kc.shape[1],
                  window=mods.window, softcap=mods.softcap > 0, alibi=mods.slopes is not None,
                  dv=d_v != d, kv_format=fmt)
    chosen, splits, why = choose_decode(kernel, req, B, H, kc.shape[1], Nq,
                                        check_block("splits", splits))
    return {"kernel": chosen.name, "splits": splits, "why": why}


def _write(k_cache, v_cache, table, lens, k_new, v_new) -> None:
    """Write token ``t`` of sequence ``b`` at logical position ``lens[b] + t``."""
    page = k_cache.shape[2]
    pos = lens[:, None] + np.arange(k_new.shape[2])[None, :]  # (B, Nnew)
    pages = np.take_along_axis(table, pos // page, axis=1)
    for b in range(table.shape[0]):
        k_cache[pages[b], :, pos[b] % page] = k_new[b].transpose(1, 0, 2)
        v_cache[pages[b], :, pos[b] % page] = v_new[b].transpose(1, 0, 2)


def paginate(k_cache, v_cache, block_size, num_blocks=None, rng=None):
    """A paged copy of a contiguous cache pair ``(B, H_kv, S_max, d)``: pages of
    ``block_size`` rows in a pool of ``num_blocks`` (default: just enough), handed to the
    sequences in a shuffled order when ``rng`` is given (as an allocator leaves them).

    Returns ``(k_pages, v_pages, block_table)``; the table has ``ceil(S_max /
    block_size)`` int32 columns (every sequence keeps its full capacity).
    """
    B, H_kv, S_max, _ = k_cache.shape
    per = -(-S_max // block_size)
    num_blocks = B * per if num_blocks is None else num_blocks
    if num_blocks < B * per:
        raise ValueError(f"num_blocks={num_blocks} is fewer than the {B * per} pages needed")
    order = np.arange(num_blocks) if rng is None else rng.permutation(num_blocks)
    table = order[:B * per].reshape(B, per).astype(np.int32)
    out = []
    for cache in (k_cache, v_cache):  # v's head dimension may differ (d_v)
        d = cache.shape[3]
        pages = np.zeros((num_blocks, H_kv, block_size, d), cache.dtype)
        padded = np.zeros((B, H_kv, per * block_size, d), cache.dtype)
        padded[:, :, :S_max] = cache
        for b in range(B):
            for j in range(per):
                pages[table[b, j]] = padded[b, :, j * block_size:(j + 1) * block_size]
        out.append(pages)
    return out[0], out[1], table
