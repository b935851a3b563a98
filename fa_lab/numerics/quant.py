"""Symmetric INT8 quantization: per tensor, per token, or per block of rows.

``quantize(x)`` returns ``(xq, scales)``: ``xq`` int8, ``scales`` float32 shaped to
broadcast against ``xq``, so that ``dequantize(xq, scales) == xq * scales`` (in float32).
Symmetric: ``scale = max|x| / 127`` over the group, ``xq = clip(round(x / scale), -127,
127)`` (round half to even, NumPy's ``rint``; -128 is never used, so negation is exact).

Granularities (``x`` is ``(..., N, d)``: tokens along ``-2``, channels along ``-1``):

* ``"per_tensor"``: one scale for the whole array (what one popular CPU FlashAttention
  crate offers); ``scales.shape == (1,) * x.ndim``.
* ``"per_token"``: one scale per row (token); ``scales.shape == x.shape[:-1] + (1,)``.
* ``"per_block"``: one scale per ``block`` consecutive rows, matched to a kernel's tiles
  (``Br`` for Q, ``Bc`` for K, as SageAttention does). To broadcast, scales come back
  per row, ``x.shape[:-1] + (1,)``, each row holding its block's scale; the kernels
  read one value per row either way.

A group that is all zeros gets scale 1 (its values quantize to 0 and dequantize to 0).
Non-finite input raises ``ValueError``: INT8 has no NaN or infinity.

Scales are computed in float64 (``max|x|`` of a float64 input may exceed float32's
range, ``max|x| / 127`` of a subnormal one may underflow it) and returned in
``scale_dtype``: float32 by default, where a scale that float32 cannot hold (0 or inf
for a nonzero group: ``max|x|`` above ~4.3e40 or below ~1.8e-43) raises ``ValueError``
naming ``x`` (pass ``scale_dtype=np.float64``). :func:`fa_lab.attention_int8` uses
float64 scales, so float64 inputs beyond float32's range work there.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.settings.config import BLOCK_KV

GRANULARITIES = ("per_tensor", "per_token", "per_block")

#: Largest magnitude used: symmetric range [-127, 127].
QMAX = 127


_SCALE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check(x, granularity, block):
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError("x must be a plain ndarray, not a numpy masked array (its mask "
                        "would be ignored): pass x.filled(value)")
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, d), got shape {x.shape}")
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_block":
        if block is None:
            block = BLOCK_KV
        if isinstance(block, (bool, np.bool_)) or not isinstance(block, numbers.Integral):
            raise TypeError(f"block must be a positive int for granularity='per_block', "
                            f"got {block!r}")
        if block <= 0:
            raise ValueError(f"block must be a positive int, got {block}")
        block = int(min(block, max(x.shape[-2], 1)))  # a block never needs more than N rows
    elif block is not None:
        raise ValueError(f"block applies only to granularity='per_block', not {granularity!r}")
    if not np.isfinite(x).all():
        raise ValueError("x must be finite to quantize (INT8 has no NaN or infinity)")
    return x, block


def _absmax(x, granularity, block) -> np.ndarray:
    """``max|x|`` per group in float64, shaped as the scales (see :func:`quantize`)."""
    a = np.abs(x).astype(np.float64, copy=False)
    if granularity == "per_tensor":
        return np.full((1,) * x.ndim, a.max(initial=0.0))
    if granularity == "per_token":
        return a.max(axis=-1, keepdims=True, initial=0.0)
    rows = a.max(axis=-1, initial=0.0)  # (..., N)
    N = rows.shape[-1]
    nb = -(-N // block) if N else 0
    pad = np.zeros(rows.shape[:-1] + (nb * block - N,))
    blocks = np.concatenate([rows, pad], axis=-1).reshape(rows.shape[:-1] + (nb, block))
    return np.repeat(blocks.max(axis=-1, initial=0.0), block, axis=-1)[..., :N, None]


def absmax_scales(x, granularity="per_block", block=None, *, scale_dtype=np.float32):
    """``max|x| / 127`` per group in ``scale_dtype``, shaped as :func:`quantize` returns
    them; all-zero groups get 1. ``ValueError`` (naming ``x``) if a nonzero group's scale
    is 0 or inf in ``scale_dtype``."""
    x, block = _check(x, granularity, block)
    scale_dtype = np.dtype(scale_dtype)
    if scale_dtype not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be float32 or float64, got {scale_dtype}")
    amax = _absmax(x, granularity, block)
    with np.errstate(over="ignore", under="ignore"):
        scales = (amax / QMAX).astype(scale_dtype)
    bad = (amax > 0) & ((scales == 0) | ~np.isfinite(scales))
    if bad.any():
        worst = amax[bad].flat[0]
        hint = ("pass scale_dtype=np.float64 (or rescale x)" if scale_dtype == np.float32
                else "rescale x")
        raise ValueError(f"x: a group with max|x| = {worst:.3g} needs the scale "
                         f"{worst / QMAX:.3g}, which {scale_dtype.name} cannot hold; {hint}")
    return np.where(scales > 0, scales, scale_dtype.type(1.0))


def quantize(x: ArrayLike, granularity: str = "per_block", block: int | None = None, *,
             scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(xq, scales)``: int8 values and scales (see the module docstring).

    ``block``: rows per scale for ``"per_block"`` (default :data:`fa_lab.settings.config.BLOCK_KV`,
    64, the tiled kernels' default tile; clamped to the number of rows N); refused for
    the other granularities. ``scale_dtype``: float32 (default) or float64.
    """
    scales = absmax_scales(x, granularity, block, scale_dtype=scale_dtype)
    x = np.asarray(x)
    xq = np.rint(x.astype(np.float64, copy=False) / scales.astype(np.float64))
    return np.clip(xq, -QMAX, QMAX).astype(np.int8), scales


def dequantize(xq: ArrayLike, scales: ArrayLike, dtype=np.float32) -> np.ndarray:
    """``xq * scales`` in ``dtype`` (float32, or float64 for scales or values beyond
    float32's range: a float32 result that would overflow raises ``ValueError``).

    ``scales`` must be finite, positive and broadcast against ``xq``.
    """
    if isinstance(xq, np.ma.MaskedArray) or isinstance(scales, np.ma.MaskedArray):
        raise TypeError("xq and scales must be plain arrays, not numpy masked arrays")
    xq = np.asarray(xq)
    if xq.dtype != np.int8:
        raise TypeError(f"xq must be an int8 array, got dtype {xq.dtype}")
    dtype = np.dtype(dtype)
    if dtype not in _SCALE_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    s = np.asarray(scales)
    if s.dtype.kind not in "fiu" or s.dtype == np.bool_:
        raise TypeError(f"scales must be a float array (as quantize returns), got dtype "
                        f"{s.dtype}")
    s = s.astype(np.float64)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("scales must be finite and positive (as quantize returns them)")
    try:
        shape = np.broadcast_shapes(xq.shape, s.shape)
    except ValueError:
        shape = None
    if shape != xq.shape:
        raise ValueError(f"scales of shape {s.shape} do not broadcast to xq's shape "
                         f"{xq.shape}")
    out = xq.astype(np.float64) * s
    if dtype == np.float32 and np.abs(out).max(initial=0.0) > np.finfo(np.float32).max:
        raise ValueError("dequantize: xq * scales exceeds float32's range; pass "
                         "dtype=np.float64")
    return out.astype(dtype)


def smooth_k(k):
    """Subtract each channel's mean over the tokens: ``(k - mean, mean)``.

    ``mean`` has shape ``(..., 1, d)`` (one per batch, head and channel). Exact for
    attention: ``q . (k_j - mean) = q . k_j - q . mean``, and ``q . mean`` is the same for
    every key ``j`` of a row, a shift that softmax ignores. Only the LSE moves, by
    ``scale * q . mean`` (added back by :func:`fa_lab.attention_int8`).
    """
    k = np.asarray(k)
    mean = k.mean(axis=-2, keepdims=True, dtype=np.float64).astype(k.dtype)
    return k - mean, mean


def to_bf16(x) -> np.ndarray:
    """The bf16 bits (uint16) of ``x`` as float32, rounded to nearest even; NaN becomes
    the quiet NaN 0x7FC0. The one NumPy bf16 rounding (the compiled kernels' twin is
    ``bf16_bits`` in the micro-kernels)."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where((b & 0x7FFFFFFF) > 0x7F800000, np.uint16(0x7FC0), r)


def from_bf16(u) -> np.ndarray:
    """The float32 values of bf16 bits ``u`` (exact)."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
