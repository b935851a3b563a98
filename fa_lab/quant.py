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
"""

from __future__ import annotations

import numbers

import numpy as np

GRANULARITIES = ("per_tensor", "per_token", "per_block")

#: Largest magnitude used: symmetric range [-127, 127].
QMAX = 127


def _check(x, granularity, block):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, d), got shape {x.shape}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_block":
        if block is None:
            from fa_lab.config import BLOCK_KV

            block = BLOCK_KV
        if isinstance(block, (bool, np.bool_)) or not isinstance(block, numbers.Integral):
            raise TypeError(f"block must be a positive int for granularity='per_block', "
                            f"got {block!r}")
        if block <= 0:
            raise ValueError(f"block must be a positive int, got {block}")
    elif block is not None:
        raise ValueError(f"block applies only to granularity='per_block', not {granularity!r}")
    if not np.isfinite(x).all():
        raise ValueError("x must be finite to quantize (INT8 has no NaN or infinity)")
    return x, block


def absmax_scales(x, granularity="per_block", block=None) -> np.ndarray:
    """``max|x| / 127`` per group, float32, shaped as :func:`quantize` returns them."""
    x, block = _check(x, granularity, block)
    a = np.abs(x).astype(np.float32, copy=False)
    if granularity == "per_tensor":
        amax = np.full((1,) * x.ndim, a.max(initial=0.0), np.float32)
    elif granularity == "per_token":
        amax = a.max(axis=-1, keepdims=True, initial=0.0)
    else:
        rows = a.max(axis=-1, initial=0.0)  # (..., N)
        N = rows.shape[-1]
        nb = -(-N // block) if N else 0
        pad = np.zeros(rows.shape[:-1] + (nb * block - N,), np.float32)
        blocks = np.concatenate([rows, pad], axis=-1).reshape(rows.shape[:-1] + (nb, block))
        amax = np.repeat(blocks.max(axis=-1, initial=0.0), block, axis=-1)[..., :N, None]
    scales = (amax / QMAX).astype(np.float32)
    return np.where(scales > 0, scales, np.float32(1.0))


def quantize(x, granularity="per_block", block=None):
    """``(xq, scales)``: int8 values and float32 scales (see the module docstring).

    ``block``: rows per scale for ``"per_block"`` (default :data:`fa_lab.config.BLOCK_KV`,
    64, the tiled kernels' default tile); refused for the other granularities.
    """
    scales = absmax_scales(x, granularity, block)
    xq = np.clip(np.rint(np.asarray(x, np.float32) / scales), -QMAX, QMAX).astype(np.int8)
    return xq, scales


def dequantize(xq, scales) -> np.ndarray:
    """``xq * scales`` in float32."""
    xq = np.asarray(xq)
    if xq.dtype != np.int8:
        raise TypeError(f"xq must be an int8 array, got dtype {xq.dtype}")
    return xq.astype(np.float32) * np.asarray(scales, np.float32)


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


def aligned(x, align=64) -> np.ndarray:
    """A C-contiguous copy of ``x`` whose data starts on an ``align``-byte boundary.

    The int8 kernels load 64-byte rows (d = 64) into zmm registers; NumPy aligns small
    arrays to 16 bytes only, and a row that straddles two cache lines measured ~10%
    slower here (the int8 score loop over a 1024 x 1024 head: 2.9 ms aligned, 3.2 ms
    at offsets 8-32).
    """
    x = np.asarray(x)
    buf = np.empty(x.nbytes + align, dtype=np.uint8)
    start = (-buf.ctypes.data) % align
    out = buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out
