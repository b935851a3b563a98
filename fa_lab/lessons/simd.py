"""Read what LLVM made of a kernel: its assembly (:func:`assembly`, the one reader in
:mod:`fa_lab.kernels.probes.assembly`) and the vector instructions in it."""

from __future__ import annotations

import re
from collections import Counter

from fa_lab.kernels.probes.assembly import assembly

#: Packed (vector) fused multiply-add on 256- or 512-bit registers, float32 or float64.
PACKED_FMA = re.compile(r"^\s*vfn?m(?:add|sub)\d{3}p[sd]\s+.*%?[yz]mm", re.MULTILINE)
#: Scalar FMA (``...ss``/``...sd``): FMA contraction without vectorization.
SCALAR_FMA = re.compile(r"^\s*vfn?m(?:add|sub)\d{3}s[sd]\s", re.MULTILINE)
_MNEMONIC = re.compile(r"^\s+([a-z][a-z0-9]+)\s", re.MULTILINE)


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
