"""flash-attn's score modifiers: a sliding window, a logit softcap, ALiBi slopes.

Validation and the normalized form every kernel receives. The math is in
:func:`fa_lab.numerics.reference.scores` (the float64 source of truth); the kernels compute the
same thing tile by tile (:mod:`fa_lab.kernels.common`), never as an ``N x N`` bias.

Conventions (flash-attn's, in fa_lab's ``(B, H, N, d)`` layout):

* query ``i`` stands at position ``i + offset`` among the keys, ``offset = 0`` for
  ``causal=True``/``"top_left"`` and ``Nk - Nq`` otherwise
  (:func:`fa_lab.numerics.masks.feature_offset`);
* ``window=(left, right)``: keys ``i + offset - left <= j <= i + offset + right``;
  ``-1`` is unbounded on that side; intersected with ``causal`` and any mask;
* ``softcap=c > 0``: ``s = c * tanh(scale * q.k / c)``, before any bias or mask;
* ``alibi_slopes`` ``(H,)`` or ``(B, H)``: ``-slope * |i + offset - j|`` added to the
  (softcapped) scores.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreMods:
    """The validated modifiers of one call, as kernels take them.

    ``left``/``right``: the window (``-1`` unbounded); ``softcap``: 0.0 for none;
    ``slopes``: a contiguous ``(B, H)`` array of q's dtype, or None.
    """

    left: int = -1
    right: int = -1
    softcap: float = 0.0
    slopes: np.ndarray | None = None

    @property
    def window(self) -> bool:
        return self.left >= 0 or self.right >= 0

    @property
    def active(self) -> bool:
        return self.window or self.softcap > 0 or self.slopes is not None

    def reference_kwargs(self) -> dict:
        """The same modifiers as keyword arguments of :func:`fa_lab.numerics.reference.attention`."""
        return {"window": (self.left, self.right) if self.window else None,
                "softcap": self.softcap, "alibi_slopes": self.slopes}

    def kernel_args(self, dtype) -> tuple:
        """``(left, right, softcap, slopes, has_alibi)`` for a jitted driver."""
        t = np.dtype(dtype).type
        slopes = self.slopes if self.slopes is not None else np.zeros((1, 1), dtype)
        return (int(self.left), int(self.right), t(self.softcap),
                np.ascontiguousarray(slopes, dtype), self.slopes is not None)


NONE = ScoreMods()


def check_window(window) -> tuple[int, int]:
    """``window`` as ``(left, right)``: None -> ``(-1, -1)``; two ints >= -1 otherwise."""
    if window is None:
        return -1, -1
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints >= -1, got "
                        f"{window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {side} must be an int >= -1, got {w!r}")
        if w < -1:
            raise ValueError(f"window {side} must be >= -1 (-1 = unbounded), got {w}")
        out.append(int(w))
    return out[0], out[1]


def check_softcap(softcap) -> float:
    """``softcap`` as a float >= 0 (0: off); finite."""
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number >= 0, got {softcap!r}")
    value = float(softcap)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return value


def check_slopes(alibi_slopes, lead: tuple, H: int, dtype) -> np.ndarray | None:
    """``alibi_slopes`` of shape ``(H,)`` or ``(*lead, H)`` as a ``(B, H)`` array."""
    if alibi_slopes is None:
        return None
    if isinstance(alibi_slopes, np.ma.MaskedArray):
        raise TypeError("alibi_slopes must be a plain array, not a numpy masked array")
    x = np.asarray(alibi_slopes)
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise TypeError(f"alibi_slopes must be a real array, got dtype {x.dtype}")
    B = math.prod(lead)
    if x.shape not in ((H,), (*lead, H)):
        raise ValueError(f"alibi_slopes must have shape ({H},) or {(*lead, H)}, got "
                         f"{x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("alibi_slopes must be finite")
    return np.ascontiguousarray(np.broadcast_to(x.reshape(-1, H), (B, H)).astype(dtype))


def check_mods(window, softcap, alibi_slopes, lead: tuple, H: int, dtype) -> ScoreMods:
    """Validate the three arguments; :data:`NONE` when none is used."""
    left, right = check_window(window)
    cap = check_softcap(softcap)
    slopes = check_slopes(alibi_slopes, lead, H, dtype)
    if left < 0 and right < 0 and cap == 0 and slopes is None:
        return NONE
    return ScoreMods(left, right, cap, slopes)
