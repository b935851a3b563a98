"""Read what LLVM made of a jitted function: the one assembly reader of fa_lab.

A function loaded from numba's on-disk cache has no assembly to show, so
:func:`assembly` recompiles a fresh copy with the same options (``fastmath``,
``error_model``, ...), for a signature the original was called with or for the types of
``args`` it is called with here.
"""

from __future__ import annotations

import numba


def assembly(fn, signature=None, *, args=None) -> str:
    """Assembly of ``fn`` (a jitted function, or a plain one to jit): for ``signature``
    (default: the first it was called with), or, with ``args``, for a fresh call on them
    (``fn`` need not have run)."""
    options = {k: v for k, v in getattr(fn, "targetoptions", {}).items() if k != "nopython"}
    fresh = numba.njit(**options)(getattr(fn, "py_func", fn))
    if args is not None:
        fresh(*args)
        return "\n".join(fresh.inspect_asm().values())
    sigs = fn.signatures
    if not sigs:
        raise ValueError(f"{fn.__name__} has not been compiled yet: call it once first")
    sig = sigs[0] if signature is None else signature
    fresh.compile(sig)
    return fresh.inspect_asm(sig)
