"""``acc = alpha acc + P Vj``, the ``P V`` step of ``flash``'s tile, two ways:

* ``"blas"``: ``np.dot(P, Vj)`` into a reused buffer (SciPy's BLAS, one thread per
  task), then the rescale, row by row;
* ``"microkernel"``: fa_lab's own float32 micro-kernel
  (:func:`fa_lab.kernels.lowprec.microkernels.pv_tile`: 8 rows x 32 channels of the
  accumulator in registers, the rescale fused into its first load), after copying ``Vj``
  to a contiguous scratch (``Bc x d``, from any layout: ``Bc d`` copies against ``Br Bc
  d`` multiply-adds). Rows past the last multiple of 8 take a plain loop. It needs float32
  and ``d`` a multiple of 32 (:func:`serves`).

Which is faster depends on the CPU and on its BLAS, so ``attention(kernel="auto")`` runs
the one measured faster on this machine (:mod:`fa_lab.tools.tune`, ``flash_pv``), and
``pv=`` names one. The scratch's size says which runs: a ``Vpack`` of size 0 means BLAS
(:func:`fa_lab.kernels.ladder.flash.row_state` allocates it for ``"microkernel"`` only).
"""

from __future__ import annotations

import numpy as np
from numba import config as numba_config, njit, types
from numba.extending import overload

from fa_lab.settings.config import CACHE, FASTMATH, FLASH_PV_CHANNELS, FLASH_PV_PATHS
from fa_lab.kernels.lowprec.microkernels import MR, pv_tile

#: The two ways, by name (``pv=`` of ``flash``).
PATHS = FLASH_PV_PATHS
#: Channels per micro-kernel call (two zmm of float32), and keys per panel of V that
#: every strip of 8 rows runs over while it stays in L1 (128 x 32 floats: 16 KiB).
CHANNELS = FLASH_PV_CHANNELS
KEYS = 128


def serves(pv: str, dtype, d: int) -> str | None:
    """Why ``pv`` cannot run a call of this dtype and head dim (None if it can)."""
    if pv not in PATHS:
        return f"pv: one of {PATHS}, got {pv!r}"
    if pv == "microkernel" and (np.dtype(dtype) != np.float32 or d % CHANNELS):
        return (f"pv='microkernel' needs float32 and d a multiple of {CHANNELS} (got "
                f"{np.dtype(dtype).name}, d={d}); pv='blas' serves every call")
    if pv == "microkernel" and numba_config.DISABLE_JIT:
        return "pv='microkernel' needs the JIT (NUMBA_DISABLE_JIT is set); pv='blas' runs"
    return None


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def rescale_add(acc, alpha, PV):
    """``acc = alpha acc + PV`` row by row."""
    br, d = acc.shape
    for r in range(br):
        a = alpha[r]
        acc_r, pv_r = acc[r], PV[r]
        for t in range(d):
            acc_r[t] = a * acc_r[t] + pv_r[t]


def pv_product(P_buf, P, Vj, PV, Vpack, alpha, acc):
    """``acc = alpha acc + P Vj`` (``P`` the ``Br x Bc`` view of ``P_buf``); by the
    micro-kernel when ``Vpack`` holds ``Bc x d`` floats, else by BLAS into ``PV``. (This
    body runs only with ``NUMBA_DISABLE_JIT``; compiled, the overload below does.)"""
    if Vpack.shape[0]:
        raise NotImplementedError("pv='microkernel' needs the JIT (NUMBA_DISABLE_JIT is set)")
    np.dot(P, Vj, PV)
    rescale_add(acc, alpha, PV)


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _blas(P_buf, P, Vj, PV, Vpack, alpha, acc):
    np.dot(P, Vj, PV)  # finite Vj: a hidden key's P = 0 adds exactly 0
    rescale_add(acc, alpha, PV)


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _own(P_buf, P, Vj, PV, Vpack, alpha, acc):
    br, bc = P.shape
    d = Vj.shape[1]
    if Vpack.shape[0] == 0:  # no packed tile: the BLAS path
        _blas(P_buf, P, Vj, PV, Vpack, alpha, acc)
        return
    if Vpack.shape[0] < bc * d or d % CHANNELS:  # serves() refuses such calls first
        raise ValueError("pv_product: Vpack smaller than the tile, or d not a multiple of 32")
    for c in range(bc):  # V's rows, contiguous (any layout in)
        Vc = Vj[c]
        for t in range(d):
            Vpack[c * d + t] = Vc[t]
    flat = acc.reshape(br * d)
    ones = PV.reshape(PV.shape[0] * PV.shape[1])[:br]  # PV is free on this path
    ones[:] = 1.0
    r8 = br - br % MR
    for t0 in range(0, d, CHANNELS):  # a panel of V (KEYS x 32 channels) stays in L1
        for c0 in range(0, bc, KEYS):  # while every strip of 8 rows runs over it
            a = alpha if c0 == 0 else ones  # the rescale once, with the first panel
            for r0 in range(0, r8, MR):
                pv_tile(P_buf, r0 * bc + c0, bc, min(KEYS, bc - c0), Vpack, c0 * d + t0, d, a,
                        r0, flat, r0 * d + t0, d)
    for r in range(r8, br):  # the last rows, fewer than 8
        a = alpha[r]
        acc_r, P_r = acc[r], P[r]
        for t in range(d):
            acc_r[t] *= a
        for c in range(bc):
            p = P_r[c]
            for t in range(d):
                acc_r[t] += p * Vpack[c * d + t]


@overload(pv_product, jit_options={"error_model": "numpy", "fastmath": FASTMATH})
def _pv_product_overload(P_buf, P, Vj, PV, Vpack, alpha, acc):
    if P_buf.dtype == types.float32:
        return _own.py_func
    return _blas.py_func
