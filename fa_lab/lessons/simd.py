"""Read what LLVM made of a kernel: its assembly and the vector instructions in it.

A function loaded from numba's on-disk cache has no assembly to show, so
:func:`assembly` recompiles a fresh copy with the same options (``fastmath``,
``error_model``, ...) for each signature the original has been called with.
"""

from __future__ import annotations

import re
from collections import Counter

import numba

#: Packed (vector) fused multiply-add on 256- or 512-bit registers, float32 or float64.
PACKED_FMA = re.compile(r"^\s*vfn?m(?:add|sub)\d{3}p[sd]\s+.*%?[yz]mm", re.MULTILINE)
#: Scalar FMA (``...ss``/``...sd``): FMA contraction without vectorization.
SCALAR_FMA = re.compile(r"^\s*vfn?m(?:add|sub)\d{3}s[sd]\s", re.MULTILINE)
_MNEMONIC = re.compile(r"^\s+([a-z][a-z0-9]+)\s", re.MULTILINE)


def assembly(fn, signature=None) -> str:
    """Assembly of a jitted function, for one signature (default: the first it was called with).

    ``fn`` must have been called (or compiled) at least once so its signatures are known.
    """
    sigs = fn.signatures
    if not sigs:
        raise ValueError(f"{fn.__name__} has not been compiled yet: call it once first")
    sig = sigs[0] if signature is None else signature
    options = {k: v for k, v in fn.targetoptions.items() if k != "nopython"}
    fresh = numba.njit(**options)(fn.py_func)
    fresh.compile(sig)
    return fresh.inspect_asm(sig)


def vector_report(fn, signature=None) -> dict:
    """Count packed FMAs, scalar FMAs and the register widths used by ``fn``."""
    asm = assembly(fn, signature)
    return {
        "function": fn.__name__,
        "packed_fma": len(PACKED_FMA.findall(asm)),
        "scalar_fma": len(SCALAR_FMA.findall(asm)),
        "zmm_lines": len(re.findall(r"%zmm\d", asm)),
        "ymm_lines": len(re.findall(r"%ymm\d", asm)),
        "instructions": sum(Counter(_MNEMONIC.findall(asm)).values()),
    }
