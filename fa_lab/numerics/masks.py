"""Which keys a query sees: causal alignments, sliding windows, ALiBi distances and
user masks, in plain NumPy (the conventions of :mod:`fa_lab.numerics.reference`, shared
by every kernel's wrapper).
"""

from __future__ import annotations

import numpy as np

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def causal_alignment(causal) -> str | None:
    """Normalize the ``causal`` argument to ``None``, ``"top_left"`` or ``"bottom_right"``."""
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top_left"
    if isinstance(causal, str) and causal in CAUSAL_ALIGNMENTS:
        return causal
    raise ValueError(
        f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}"
    )


def causal_offset(Nq: int, Nk: int, alignment: str) -> int:
    """Query ``i`` sees keys ``j <= i + offset``; 0 for top-left, ``Nk - Nq`` for bottom-right."""
    return 0 if alignment == "top_left" else Nk - Nq


def causal_mask(Nq: int, Nk: int, causal=True) -> np.ndarray:
    """Boolean ``(Nq, Nk)`` mask, True where query ``i`` may attend to key ``j``."""
    offset = causal_offset(Nq, Nk, causal_alignment(causal))
    return np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + offset


def feature_offset(Nq: int, Nk: int, alignment) -> int:
    """Where query ``i`` stands among the keys for a window and ALiBi: at ``i + offset``.

    ``0`` for ``causal=True``/``"top_left"``; ``Nk - Nq`` otherwise (flash-attn's
    bottom-right alignment, also without ``causal``). With ``Nq == Nk`` both are 0.
    """
    return 0 if alignment == "top_left" else Nk - Nq


def window_mask(Nq: int, Nk: int, window, offset: int) -> np.ndarray:
    """Boolean ``(Nq, Nk)``: query ``i`` sees key ``j`` iff ``i + offset - left <= j <=
    i + offset + right`` (``window = (left, right)``; ``-1`` is unbounded on that side)."""
    left, right = window
    pos = np.arange(Nq)[:, None] + offset
    j = np.arange(Nk)[None, :]
    ok = np.ones((Nq, Nk), bool)
    if left >= 0:
        ok &= j >= pos - left
    if right >= 0:
        ok &= j <= pos + right
    return ok


def alibi_bias(slopes, Nq: int, Nk: int, offset: int, dtype=np.float64) -> np.ndarray:
    """ALiBi: ``-slope * |i + offset - j|``, shape ``slopes.shape + (Nq, Nk)``."""
    dist = np.abs(np.arange(Nq)[:, None] + offset - np.arange(Nk)[None, :]).astype(dtype)
    return -np.asarray(slopes, dtype)[..., None, None] * dist


def mask_to_bias(mask, dtype=np.float64) -> np.ndarray:
    """A boolean mask becomes ``0`` / ``-inf`` in ``dtype``; a float mask is cast to ``dtype``.

    Built directly in ``dtype`` (no float64 temporary), and a float mask that already
    has ``dtype`` is returned without a copy.
    """
    mask = np.asarray(mask)
    t = np.dtype(dtype).type
    if mask.dtype == np.bool_:
        return np.where(mask, t(0), t(-np.inf))
    return mask.astype(dtype, copy=False)


def apply_mask(s, mask, dtype):
    """Scores with the mask applied by selection: ``-inf`` where the mask hides a key
    (``False``, or ``-inf`` in a float mask), ``s + bias`` elsewhere. Adding ``-inf``
    instead would keep a NaN score (a NaN key) NaN although the key is hidden."""
    bias = mask_to_bias(mask, dtype)
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(bias), dtype(-np.inf), s + bias)
