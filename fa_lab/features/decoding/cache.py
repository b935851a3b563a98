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
from fa_lab.numerics.merge import check_sinks
from fa_lab.numerics.checks import check_block, check_bool, check_scale, refuse_masked
from fa_lab.settings import config
from fa_lab.settings.tuning_file import tuned_blocks


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

    def append(self, k_new: ArrayLike, v_new: ArrayLike) -> int:
        """Write ``T`` new tokens ``(B, H_kv, T, d)`` after the filled part; returns the
        new length. Raises ``ValueError`` (nothing written) if ``length + T > max_len``."""
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


def decode(q: ArrayLike, cache: KVCache, *, scale: float | None = None,
           return_lse: bool = False, block_kv: int | None = None,
           splits: int | None = None,
           sinks: ArrayLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention of new queries ``q`` ``(B, H, Tq, d)`` against the whole cache.

    Bottom-right causal (see the module docstring): append the new tokens' k and v to
    the cache first. ``H`` must be a multiple of the cache's ``H_kv`` (GQA). Runs the
    ``flash`` kernel on the cache buffers without copying them; ``block_kv`` and
    ``splits`` override the tuned/default key tile and the split-KV plan: ``block_kv`` a
    positive int (clamped to the cache length), ``splits`` a positive int, clamped to the
    number of key blocks (more splits than blocks would only add empty ones). ``sinks``:
    attention sinks, as :func:`fa_lab.attention` takes them.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a fa_lab.KVCache, got {type(cache).__name__}")
    refuse_masked("q", q)
    block_kv = check_block("block_kv", block_kv)
    splits = check_block("splits", splits)
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
        check_sinks(sinks, (B,), H, q.dtype)
        out, lse = np.zeros(q.shape, q.dtype), np.zeros(q.shape[:-1], q.dtype)
        return (out, lse) if return_lse else out
    tuned = tuned_blocks("flash", Tq)
    bq = min(tuned[0] if tuned else config.FLASH_BLOCKS[0], Tq)
    bk = min(block_kv or (tuned[1] if tuned else config.FLASH_BLOCKS[1]), L)
    if splits is not None:
        splits = min(splits, -(-L // bk))
    return attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=L, causal=True,
                                  scale=scale, return_lse=return_lse, kernel="flash",
                                  block_q=bq, block_kv=bk, splits=splits, sinks=sinks)

