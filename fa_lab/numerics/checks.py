"""Argument checks shared by every entry point (attention, backward, int8, decoding,
retrieval, memory): each raises TypeError or ValueError naming the argument.

Below the kernels and the API (``docs/ARCHITECTURE.md``), so that any layer can use them.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fa_lab.numerics.masks import mask_to_bias

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

#: Half-precision input dtypes: computed in float32, returned in the input dtype.
#: bfloat16 is the ``ml_dtypes`` NumPy extension type (installed with the ``models``
#: extra); it is recognised by name, so fa_lab does not need ml_dtypes itself.
HALF_DTYPES = ("float16", "bfloat16")


def half_dtype(q) -> np.dtype | None:
    """q's dtype if it is a half-precision float (see :data:`HALF_DTYPES`), else None."""
    dtype = getattr(q, "dtype", None)
    if dtype is None:
        return None
    if not isinstance(q, np.ndarray):
        dtype = as_array("q", q).dtype  # a torch tensor is refused here, naming q
    return dtype if dtype.name in HALF_DTYPES else None


def widen(name, x, half):
    """A half-precision companion array (k, v, a float mask) as float32."""
    x = as_array(name, x)
    if x.dtype != half:
        raise TypeError(f"q, k and v must share one dtype, got q {half.name} and {name} "
                        f"{x.dtype}")
    return x.astype(np.float32)


def refuse_masked(name, x) -> None:
    """NumPy masked arrays are refused: ``np.asarray`` would drop the mask and use the
    masked-out entries as data."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a plain ndarray, not a numpy masked array (its "
                        f"mask would be ignored): pass {name}.filled(value), or a bool "
                        f"attention mask through mask=")


def check_scale(scale, d) -> float:
    """``scale`` as a float: ``1/sqrt(d)`` for None; a finite real number otherwise."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return value


def check_bool(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_choice(name, value, choices) -> str:
    """``value`` must be one of the strings ``choices`` (ValueError naming ``name``)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def int_array(name, x, shape_hint) -> np.ndarray:
    """``x`` as an int64 array; TypeError naming ``name`` for a masked or non-integer
    array (``shape_hint``, e.g. ``"(B,)"``, goes into the message)."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a plain integer array, not a masked array")
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array {shape_hint} (int32, as "
                        f"flash-attn), got dtype {x.dtype}")
    return x.astype(np.int64)


def as_array(name, x) -> np.ndarray:
    """``x`` as a NumPy array, or a TypeError/ValueError naming ``name`` for what NumPy
    cannot or must not take as one: a masked array, a torch tensor (pointing to the torch
    adapter), a ragged nested list."""
    refuse_masked(name, x)
    if type(x).__module__.split(".")[0] == "torch":
        raise TypeError(f"{name} is a torch tensor: use fa_lab.integrations.torch.attention "
                        f"(CPU tensors, autograd), or pass {name}.detach().numpy()")
    try:
        return np.asarray(x)
    except ValueError as e:  # e.g. "inhomogeneous shape": a ragged nested list
        raise ValueError(f"{name} must be a rectangular array; NumPy could not make one of "
                         f"it: {e}") from None


def as_float_array(name, x) -> np.ndarray:
    x = as_array(name, x)
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def check_block(name, value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return int(value)


def check_shapes(q, k, v):
    """Return (lead, H, H_kv, Nq, Nk, d) or raise naming the argument. ``v``'s head
    dimension ``d_v`` may differ from ``d`` (``v.shape[-1]``; kernels flag support)."""
    if q.ndim < 2:
        raise ValueError(f"q must have shape (..., H, Nq, d) or (Nq, d), got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != q.ndim:
            raise ValueError(f"{name} must have the same rank as q ({q.ndim}): expected "
                             f"{'(Nk, d)' if q.ndim == 2 else '(..., H_kv, Nk, d)'}, "
                             f"got shape {x.shape}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k must have the head dimension d={d} of q, got shape {k.shape}")
    if d == 0:
        raise ValueError(f"q must have a head dimension d >= 1, got shape {q.shape}")
    if v.shape[:-1] != k.shape[:-1] or v.shape[-1] == 0:
        raise ValueError(f"v must have k's shape {k.shape} except its head dimension d_v "
                         f"(>= 1, MLA's value heads may differ from d), got {v.shape}")
    if q.ndim == 2:
        return (), 1, 1, q.shape[0], k.shape[0], d
    if k.shape[:-3] != q.shape[:-3]:
        raise ValueError(f"k and v must have the leading dims {q.shape[:-3]} of q, got "
                         f"shape {k.shape}")
    H, H_kv = q.shape[-3], k.shape[-3]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the heads of q (H={H}) must be a multiple of the heads of k and "
                         f"v (H_kv={H_kv}); arrays in flash-attn's (B, N, H, d) layout need "
                         f"layout='bnhd'")
    return q.shape[:-3], H, H_kv, q.shape[-2], k.shape[-2], d


def bias_view(mask, dtype, full_shape, B, H, Nq, Nk):
    """Validate ``mask`` and return it as a read-only additive (B, H, Nq, Nk) view."""
    refuse_masked("mask", mask)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ and mask.dtype.kind != "f":
        raise TypeError(f"mask must be a bool or float array, got dtype {mask.dtype}")
    try:
        ok = np.broadcast_shapes(mask.shape, full_shape) == tuple(full_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to the scores' "
                         f"shape (..., H, Nq, Nk) = {tuple(full_shape)}")
    bias = np.broadcast_to(mask_to_bias(mask, dtype), full_shape).reshape(B, H, Nq, Nk)
    bias.flags.writeable = False  # one numba type whether reshape copied or not
    return bias


