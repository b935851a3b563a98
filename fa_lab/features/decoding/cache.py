"""A preallocated KV cache and attention of new tokens against it.

* :class:`KVCache` holds ``(B, H_kv, max_len, d)`` key and value buffers; ``append``
  writes new tokens after the filled part and raises ``ValueError`` past ``max_len``.
* :func:`decode` attends ``Tq`` new queries to everything in the cache with the
  **bottom-right** causal alignment: query ``i`` of ``Tq`` sees keys ``j <= L - Tq + i``
  (``L`` = cache length, the new tokens already appended), as flash-attn >= 2.1 and a
  token-by-token decoder do. It is a thin layer over the one KV-cache API,
  :func:`fa_lab.attention_with_kvcache` (the cache's buffers read in place, no copy of the
  filled part, split-KV where it pays), with the autotuner's "decode" blocks when there
  are some.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.features.kvcache import attention_with_kvcache
from fa_lab.numerics.kvquant import FORMATS, check_group, dequantize_kv, quantize_rows
from fa_lab.numerics.merge import check_sinks
from fa_lab.numerics.checks import check_block, check_bool, check_scale, refuse_masked
from fa_lab.settings import config
from fa_lab.settings.tuning_file import tuned_blocks


class KVCache:
    """Preallocated keys and values for incremental decoding.

    Parameters
    ----------
    B, H_kv, max_len, d : positive ints (``max_len`` may be 0 only for an empty cache)
    dtype : float32 (default) or float64: the queries', outputs' and (by default) the
        cache's dtype
    kv_dtype : None (store ``dtype``), ``"float32"``, ``"float64"``, ``"int8"`` or
        ``"int4"`` (keyword only). A quantized cache (float32 ``dtype`` only) holds
        :func:`fa_lab.quantize_kv`'s values and scales: each appended token is quantized
        per token (and per ``group`` channels) when it is written; :func:`decode` reads it
        in place (kernel ``"quantized"``).
    group : channels per scale of a quantized cache (a divisor of ``d``; even for int4),
        or None (one scale per token)
    smooth_k : a quantized cache stores keys minus their per-channel mean (``k_mean``,
        taken from the first append, the prompt, and kept until :meth:`reset`): see
        :func:`fa_lab.quantize_kv`'s ``smooth_k``; exact for attention, and it keeps a
        few large key channels from setting every token's scale

    ``append`` accepts ``k_new``/``v_new`` of the cache's dtype, or of a dtype that casts
    to it without loss (``np.can_cast(..., "safe")``: float16 or float32 into a float64
    cache, float16 into a float32 one); anything else (float64 into a float32 cache:
    1e300 would become inf) raises ``TypeError``.
    """

    def __init__(self, B, H_kv, max_len, d, dtype=np.float32, *, kv_dtype=None, group=None,
                 smooth_k=False):
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
        kv_dtype = dtype.name if kv_dtype is None else kv_dtype
        if kv_dtype not in ("float32", "float64", "int8", "int4"):
            raise ValueError(f"kv_dtype must be None, 'float32', 'float64', 'int8' or "
                             f"'int4', got {kv_dtype!r}")
        if kv_dtype.startswith("float") and kv_dtype != dtype.name:
            raise ValueError(f"kv_dtype={kv_dtype!r} does not match dtype={dtype.name}")
        if kv_dtype.startswith("int") and dtype != np.float32:
            raise ValueError(f"a quantized cache (kv_dtype={kv_dtype!r}) takes float32 "
                             f"queries: dtype must be float32, got {dtype.name}")
        if not isinstance(smooth_k, (bool, np.bool_)):
            raise TypeError(f"smooth_k must be a bool, got {smooth_k!r}")
        if (group is not None or smooth_k) and not kv_dtype.startswith("int"):
            raise ValueError("group and smooth_k apply only to kv_dtype='int8' or 'int4'")
        self.smooth_k, self.k_mean = bool(smooth_k), None
        self.dtype, self.kv_dtype = dtype, kv_dtype
        if kv_dtype.startswith("int"):
            bits, store, _ = FORMATS[kv_dtype]
            g = check_group(group, d, bits)
            row = d // 2 if bits == 4 else d
            self.k, self.v = (np.zeros((B, H_kv, max_len, row), store) for _ in range(2))
            self.k_scale, self.v_scale = (np.ones((B, H_kv, max_len, d // g), np.float32)
                                          for _ in range(2))
            self.group = g
        else:
            self.k = np.zeros((B, H_kv, max_len, d), dtype)
            self.v = np.zeros((B, H_kv, max_len, d), dtype)
            self.k_scale = self.v_scale = self.group = None
        self._d = d
        self.length = 0

    @property
    def shape(self):
        """``(B, H_kv, max_len, d)`` (``d`` in channels, whatever the storage)."""
        return self.k.shape[:3] + (self._d,)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def _filled(self, x, scale, mean=None):
        if scale is None:
            view = x[:, :, :self.length]
        else:  # a float32 copy: the cache holds integers
            view = dequantize_kv(x[:, :, :self.length], scale[:, :, :self.length])
            if mean is not None:
                view += mean[:, :, None]
        view.flags.writeable = False
        return view

    @property
    def keys(self) -> np.ndarray:
        """The filled keys ``(B, H_kv, length, d)``: a read-only view, or for a quantized
        cache a read-only dequantized float32 copy."""
        return self._filled(self.k, self.k_scale, self.k_mean)

    @property
    def values(self) -> np.ndarray:
        """The filled values ``(B, H_kv, length, d)`` (as :attr:`keys`)."""
        return self._filled(self.v, self.v_scale)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (values, and scales for a quantized cache)."""
        scales = 0 if self.k_scale is None else self.k_scale.nbytes + self.v_scale.nbytes
        return self.k.nbytes + self.v.nbytes + scales

    def append(self, k_new: ArrayLike, v_new: ArrayLike) -> int:
        """Write ``T`` new tokens ``(B, H_kv, T, d)`` after the filled part (quantized on
        the way into an int8 / int4 cache); returns the new length. Raises ``ValueError``
        (nothing written) if ``length + T > max_len``."""
        B, H_kv, _, d = self.shape
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            refuse_masked(name, x)
            x = np.asarray(x)
            if x.dtype.kind != "f":
                raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
            if not np.can_cast(x.dtype, self.dtype, "safe"):
                other = ("" if self.k_scale is not None
                         else f" (or use a {x.dtype} cache)")
                raise TypeError(f"{name} has dtype {x.dtype}, which does not fit the cache's "
                                f"{self.dtype} without loss: cast it first{other}")
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
        at = slice(self.length, self.length + T)
        if self.k_scale is None:
            self.k[:, :, at], self.v[:, :, at] = k_new, v_new
        else:
            bits = FORMATS[self.kv_dtype][0]
            vq, vs = quantize_rows(v_new, bits, self.group, "v_new")  # checks finiteness
            mean = self.k_mean
            if self.smooth_k and mean is None and T:  # the prompt's mean, kept once written
                with np.errstate(invalid="ignore", over="ignore"):  # non-finite: refused below
                    mean = k_new.mean(axis=2, dtype=np.float64).astype(np.float32)
            shifted = k_new if mean is None else k_new - mean[:, :, None]
            kq, ks = quantize_rows(shifted, bits, self.group, "k_new")
            self.k_mean = mean
            self.k[:, :, at], self.k_scale[:, :, at] = kq, ks
            self.v[:, :, at], self.v_scale[:, :, at] = vq, vs
        self.length += T
        return self.length

    def reset(self) -> None:
        """Forget every token (the buffers are kept; a smoothed cache takes a new key mean
        from the next append)."""
        self.length = 0
        self.k_mean = None

    def __repr__(self) -> str:
        B, H_kv, max_len, d = self.shape
        group = ("" if self.group is None else f", group={self.group}") + (
            ", smooth_k=True" if self.smooth_k else "")
        return (f"KVCache(B={B}, H_kv={H_kv}, length={self.length}/{max_len}, d={d}, "
                f"kv_dtype={self.kv_dtype}{group})")


def decode(q: ArrayLike, cache: KVCache, *, scale: float | None = None,
           return_lse: bool = False, block_kv: int | None = None,
           splits: int | None = None,
           sinks: ArrayLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention of new queries ``q`` ``(B, H, Tq, d)`` against the whole cache.

    Bottom-right causal (see the module docstring): append the new tokens' k and v to
    the cache first. ``H`` must be a multiple of the cache's ``H_kv`` (GQA). Runs the
    ``flash`` kernel on a float cache's buffers without copying them (the ``quantized``
    kernel on an int8 / int4 cache, reading it in place); ``block_kv`` and ``splits``
    override the tuned/default key tile and the split-KV plan: ``block_kv`` a positive int
    (clamped to the cache length), ``splits`` a positive int (for a float cache clamped to
    the number of key blocks: more splits than blocks would only add empty ones).
    ``sinks``: attention sinks, as :func:`fa_lab.attention` takes them.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a fa_lab.KVCache, got {type(cache).__name__}")
    refuse_masked("q", q)
    block_kv = check_block("block_kv", block_kv)
    splits = check_block("splits", splits)
    return_lse = check_bool("return_lse", return_lse)
    q = np.asarray(q)
    B, H_kv, _, d = cache.shape
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
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
        check_sinks(sinks, (B,), H, q.dtype)
        out, lse = np.zeros(q.shape, q.dtype), np.zeros(q.shape[:-1], q.dtype)
        return (out, lse) if return_lse else out
    if cache.k_scale is not None:  # int8 / int4: the quantized kernel, its own tiles
        return attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=L, causal=True,
                                      scale=scale, return_lse=return_lse, kernel="quantized",
                                      block_kv=block_kv and min(block_kv, L), splits=splits,
                                      sinks=sinks, k_scale=cache.k_scale,
                                      v_scale=cache.v_scale, k_mean=cache.k_mean)
    tuned = tuned_blocks("flash", Tq)
    bq = min(tuned[0] if tuned else config.FLASH_BLOCKS[0], Tq)
    bk = min(block_kv or (tuned[1] if tuned else config.FLASH_BLOCKS[1]), L)
    if splits is not None:
        splits = min(splits, -(-L // bk))
    return attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=L, causal=True,
                                  scale=scale, return_lse=return_lse, kernel="flash",
                                  block_q=bq, block_kv=bk, splits=splits, sinks=sinks)

