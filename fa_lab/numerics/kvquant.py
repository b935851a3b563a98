"""Quantized KV caches: the formats, their NumPy rules, their byte counts.

:func:`quantize_kv` turns float keys and values ``(..., N, d)`` (tokens along ``-2``,
channels along ``-1``) into one of two formats; the compiled kernels
(:mod:`fa_lab.kernels.layouts.quantized`) read both in place and follow these rules.

* **int8**: ``x_q`` int8 ``(..., N, d)``, values in ``[-127, 127]``.
* **int4**: ``x_q`` uint8 ``(..., N, d // 2)``, two signed 4-bit values per byte in
  ``[-7, 7]`` (two's complement nibbles). llama.cpp's ``q4_0`` order: within each group
  of ``g`` channels, byte ``j`` holds channel ``j`` in its low nibble and channel
  ``j + g / 2`` in its high nibble, so unpacking writes two contiguous halves.

Scales are symmetric, per token and per group of ``group`` channels (``group=None``: one
group of all ``d`` channels, a scale per token): ``scale = max|x| / 127`` (int8) or
``/ 7`` (int4) over the group, ``x_q = clip(rint(x / scale))``; a group of zeros gets
scale 1. ``scale`` is float32 ``(..., N, d // group)``. Dequantization is ``x_q * scale``
in float32; :func:`dequantize_kv` is the one NumPy version, the kernels' twin.

Keys and values use the same rule, per token: a new token is quantized when it is
written, and nothing already in the cache changes (KIVI's per-channel key scales would
need a group of tokens before a scale exists; lesson 14 measures what per-token scales
cost on keys with per-channel offsets).
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

#: ``kv_dtype`` name -> (bits, stored dtype, largest magnitude)
FORMATS = {"float32": (32, np.dtype(np.float32), None),
           "int8": (8, np.dtype(np.int8), 127),
           "int4": (4, np.dtype(np.uint8), 7)}


def check_bits(bits) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral) \
            or bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return int(bits)


def check_group(group, d: int, bits: int, what: str = "d") -> int:
    """The channels per scale: ``d`` for ``None``; else a positive divisor of ``d`` (even
    for int4, whose bytes pair channels inside a group); ``what`` names ``d`` in errors."""
    if group is None:
        group = d
    elif isinstance(group, (bool, np.bool_)) or not isinstance(group, numbers.Integral):
        raise TypeError(f"group must be a positive int or None, got {group!r}")
    group = int(group)
    if group <= 0 or d % group:
        raise ValueError(f"group must be a positive divisor of the head dimension "
                         f"{what}={d}, got {group}")
    if bits == 4 and group % 2:
        raise ValueError(f"int4 packs two channels of a group per byte: group (and d) must "
                         f"be even, got group={group}")
    return group


def quantize_rows(x: ArrayLike, bits: int, group: int | None, name: str = "x"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(x_q, scale)`` for one array ``(..., N, d)`` (:func:`quantize_kv`'s rule);
    errors name ``name``."""
    bits = check_bits(bits)
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a plain ndarray, not a numpy masked array")
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., N, d) with d >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite to quantize (integers have no NaN or inf)")
    d = x.shape[-1]
    g = check_group(group, d, bits, f"{name}.shape[-1]")
    qmax = FORMATS[f"int{bits}"][2]
    xs = x.astype(np.float64).reshape(x.shape[:-1] + (d // g, g))
    amax = np.abs(xs).max(axis=-1)
    with np.errstate(over="ignore", under="ignore"):
        scale = (amax / qmax).astype(np.float32)
    if not np.isfinite(scale).all():
        raise ValueError(f"{name}: a group's scale max|x|/{qmax} overflows float32 (a "
                         f"float64 input beyond float32's range): rescale {name}")
    # a group of zeros, or of values so small that max|x|/qmax underflows float32: scale
    # 1, values 0 (the error is at most max|x|, below 1e-41)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(xs / scale[..., None]), -qmax, qmax).astype(np.int8)
    if bits == 4:  # group halves into the low and high nibbles of one byte
        lo, hi = q[..., :g // 2], q[..., g // 2:]
        q = ((lo.view(np.uint8) & 0xF) | ((hi.view(np.uint8) & 0xF) << 4)).astype(np.uint8)
    return np.ascontiguousarray(q.reshape(x.shape[:-1] + (d * bits // 8,))), scale


def quantize_kv(k: ArrayLike, v: ArrayLike, *, bits: int = 8, group: int | None = None,
                smooth_k: bool = False) -> tuple:
    """``(k_q, k_scale, v_q, v_scale)``: keys and values in the int8 or int4 format;
    with ``smooth_k``, ``(k_q, k_scale, v_q, v_scale, k_mean)``.

    Parameters
    ----------
    k, v : float arrays ``(..., N, d)`` and ``(..., N, d_v)`` (tokens, then channels),
        finite
    bits : 8 (int8 ``(..., N, d)``) or 4 (uint8 ``(..., N, d // 2)``, two values a byte)
    group : channels per scale (a divisor of ``d`` and ``d_v``, even for int4), or None
        for one scale per token
    smooth_k : subtract each channel's mean over the tokens from the keys first
        (SageAttention's smoothing): ``k_mean`` float32 ``k.shape[:-2] + (d,)``. A key
        channel with a large offset (common in real models) otherwise sets every token's
        scale and drowns the other channels; removing it is exact for attention (each
        query's scores all lose ``q . k_mean``, which softmax ignores); pass ``k_mean`` to
        :func:`fa_lab.attention_with_kvcache` to get the LSE back.

    See the module docstring for the layout. ``ValueError``/``TypeError`` name the
    argument for bad bits, groups, shapes, dtypes or non-finite input.
    """
    bits = check_bits(bits)
    if not isinstance(smooth_k, (bool, np.bool_)):
        raise TypeError(f"smooth_k must be a bool, got {smooth_k!r}")
    k_mean = None
    if smooth_k:
        kk = np.asarray(k)
        if kk.dtype.kind == "f" and kk.ndim >= 2 and kk.shape[-2] > 0:
            k_mean = kk.mean(axis=-2, dtype=np.float64).astype(np.float32)
            k = kk - k_mean[..., None, :]
        elif kk.ndim >= 2:
            k_mean = np.zeros(kk.shape[:-2] + kk.shape[-1:], np.float32)
    kq, ks = quantize_rows(k, bits, group, "k")
    vq, vs = quantize_rows(v, bits, group, "v")
    if kq.shape[:-1] != vq.shape[:-1]:
        raise ValueError(f"k and v must have the same leading shape (..., N), got "
                         f"{np.shape(k)} and {np.shape(v)}")
    return (kq, ks, vq, vs) if k_mean is None else (kq, ks, vq, vs, k_mean)


def format_of(x_q: np.ndarray, scale: np.ndarray | None) -> str:
    """``"float32"``, ``"int8"`` or ``"int4"`` from a cache's dtype (and its scales)."""
    kind = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "int4"}.get(x_q.dtype)
    if kind is None:
        if scale is not None:
            raise TypeError(f"scales are given for a cache of dtype {x_q.dtype}: only "
                            f"int8 and packed int4 (uint8) caches take k_scale/v_scale")
        return "float32" if x_q.dtype == np.float32 else x_q.dtype.name
    if scale is None:
        raise ValueError(f"an {kind} cache needs its scales (k_scale/v_scale from "
                         f"fa_lab.quantize_kv)")
    return kind


def channels(x_q: np.ndarray) -> int:
    """The head dimension a quantized row holds (``d``; twice the bytes for int4)."""
    return x_q.shape[-1] * (2 if x_q.dtype == np.uint8 else 1)


def dequantize_kv(x_q: ArrayLike, scale: ArrayLike) -> np.ndarray:
    """``x_q * scale`` in float32 ``(..., N, d)``, for either format (the dtype says
    which: int8, or uint8 for packed int4)."""
    x_q, scale = np.asarray(x_q), np.asarray(scale, dtype=np.float32)
    if x_q.dtype not in (np.int8, np.uint8):
        raise TypeError(f"x_q must be int8 or packed int4 (uint8), got dtype {x_q.dtype}")
    d = channels(x_q)
    G = scale.shape[-1] if scale.ndim else 0
    if scale.shape[:-1] != x_q.shape[:-1] or G == 0 or d % G or (
            x_q.dtype == np.uint8 and (d // G) % 2):
        raise ValueError(f"scale must have shape {x_q.shape[:-1]} + (groups,) with groups "
                         f"dividing d={d} (an even number of channels each for int4), got "
                         f"{scale.shape}")
    g = d // G
    if x_q.dtype == np.uint8:
        b = x_q.reshape(x_q.shape[:-1] + (G, g // 2)).astype(np.int16)
        lo, hi = ((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8
        vals = np.concatenate([lo, hi], axis=-1)
    else:
        vals = x_q.reshape(x_q.shape[:-1] + (G, g))
    return (vals.astype(np.float32) * scale[..., None]).reshape(x_q.shape[:-1] + (d,))


def bytes_per_token(d: int, d_v: int | None = None, *, kv_dtype: str = "float32",
                    group: int | None = None) -> int:
    """Bytes one token takes in one kv head's K and V (values plus float32 scales)."""
    d_v = d if d_v is None else d_v
    if kv_dtype not in FORMATS:
        raise ValueError(f"kv_dtype must be one of {sorted(FORMATS)}, got {kv_dtype!r}")
    bits = FORMATS[kv_dtype][0]
    total = 0
    for n in (d, d_v):
        total += n * bits // 8
        if bits < 32:
            total += 4 * (n // check_group(group, n, bits))
    return total


__all__ = ["FORMATS", "quantize_kv", "quantize_rows", "dequantize_kv", "bytes_per_token",
           "format_of",
           "channels", "check_bits", "check_group"]
