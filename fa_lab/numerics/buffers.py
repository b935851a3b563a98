"""Aligned NumPy buffers: the one allocator of arrays whose data starts on a 64-byte
boundary (a cache line, and one zmm register).

NumPy aligns large arrays to 16 bytes only (numba's ``np.empty`` to 32), so a 64-byte
load or store of such a row straddles two cache lines: the int8 score loop over a 1024 x
1024 head measured 2.9 ms aligned and 3.2 ms at offsets 8-32, and every zmm access of
sage's packed operands did the same. The compiled twin, for scratch inside a kernel, is
``align64`` in the 512-bit vector module.
"""

from __future__ import annotations

import numpy as np

#: Bytes: a cache line, and one 512-bit register.
ALIGN = 64


def empty64(n, dtype) -> np.ndarray:
    """``np.empty(n, dtype)`` (1-D) whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    buf = np.empty(n * dtype.itemsize + ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ALIGN
    return buf[start:start + n * dtype.itemsize].view(dtype)


def aligned(x) -> np.ndarray:
    """A C-contiguous copy of ``x`` whose data starts on a 64-byte boundary."""
    x = np.asarray(x)
    out = empty64(x.size, x.dtype).reshape(x.shape)
    out[...] = x
    return out
