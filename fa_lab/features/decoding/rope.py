"""Rotary position embeddings (RoPE).

:func:`rope` rotates pairs of channels by ``position * base^(-2i/d)``: the GPT-NeoX
layout pairs channel ``i`` with ``i + d/2`` (``interleaved=False``), the GPT-J / original
layout pairs ``2i`` with ``2i + 1`` (``interleaved=True``). Apply it to q and k before
caching; then ``rope(q, m) . rope(k, n)`` depends on ``m - n`` only.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.numerics.checks import refuse_masked


def rope(x: ArrayLike, positions: ArrayLike, base: float = 10000.0,
         interleaved: bool = False) -> np.ndarray:
    """Rotary position embedding of ``x`` ``(..., T, d)`` at ``positions`` ``(T,)`` (or
    broadcastable to ``x.shape[:-1]``); ``d`` must be even. Computed in float64,
    returned in ``x``'s dtype. See :mod:`fa_lab.features.decoding.rope` for the two layouts."""
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

