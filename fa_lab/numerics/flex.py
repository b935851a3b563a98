"""Programmable attention, PyTorch FlexAttention's way: ``score_mod`` and ``mask_mod`` are
plain Python functions, compiled by numba and called inside the tiles.

* ``score_mod(score, b, h, q_idx, kv_idx) -> score``: changes one scaled score (a bias,
  a softcap, ALiBi ...). It may use arithmetic, comparisons, ``math`` functions and read
  NumPy arrays it closes over (a bias table, document ids): numba freezes those arrays
  into the compiled code, so each function object compiles once (a new closure over
  other data compiles again).
  Reads are bounds-checked (an index past an array's end raises ``IndexError``).
* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True = attend (causal, a window, prefix-LM,
  packed documents ...).
* :func:`create_block_mask` evaluates a ``mask_mod`` once over the whole ``Q_LEN x
  KV_LEN`` grid and records, per (query tile, key tile), whether the tile is **empty**
  (skipped by the kernel), **partial** (``mask_mod`` called per element) or **full**
  (no ``mask_mod`` call): a :class:`BlockMask`, as PyTorch's.
* :func:`and_masks`, :func:`or_masks` combine mask functions;
  :func:`reference_flex_attention` is the float64 truth (the Python functions called
  element by element, no numba).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from numba.core.errors import NumbaError

#: BlockMask tile kinds.
EMPTY, PARTIAL, FULL = 0, 1, 2


def compile_mod(name: str, fn, arity: int):
    """``fn`` compiled by numba (``@njit``), checked on scalars of the kernel's types; a
    TypeError naming ``name`` says what numba could not compile."""
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"{name} must be a function, got {type(fn).__name__}")
    target = getattr(fn, "py_func", fn)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and len(params) != arity:
        want = ("(score, b, h, q_idx, kv_idx)" if arity == 5 else "(b, h, q_idx, kv_idx)")
        raise TypeError(f"{name} must take {arity} arguments {want}, got "
                        f"{len(params)}: {list(params)}")
    # bounds checked: an index outside an array the function closes over raises
    # IndexError instead of reading whatever lies beyond it
    jitted = fn if hasattr(fn, "py_func") else njit(boundscheck=True)(fn)
    args = ((0.5, 0, 0, 0, 0) if arity == 5 else (0, 0, 0, 0))
    try:
        _probe(jitted, args)
    except NumbaError as exc:
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[:6] if line.strip())
        raise TypeError(f"{name}: numba cannot compile {target.__name__!r}: {detail}") from None
    return jitted


def _probe(fn, args):
    """Call the compiled function once with the kernel's argument types."""
    if len(args) == 5:
        return _call5(fn, np.float64(args[0]), 0, 0, 0, 0)
    return _call4(fn, 0, 0, 0, 0)


@njit
def _call5(fn, s, b, h, i, j):
    return float(fn(s, b, h, i, j))


@njit
def _call4(fn, b, h, i, j):
    return bool(fn(b, h, i, j))


@dataclass(frozen=True)
class BlockMask:
    """Per (batch, head, query tile, key tile): :data:`EMPTY`, :data:`PARTIAL` or
    :data:`FULL` (``kinds``, shape ``(B or 1, H or 1, Tq, Tk)``), the tile sizes, the
    lengths and the ``mask_mod`` partial tiles call."""

    kinds: np.ndarray
    Q_LEN: int
    KV_LEN: int
    BLOCK_SIZE: tuple
    mask_mod: object
    #: the partial tiles' element masks, evaluated once (``(n_partial, bq, bk)`` bool) and
    #: ``partial_index`` (``kinds``' shape, int32, -1 elsewhere) pointing into them; the
    #: kernel then reads a tile's mask instead of calling ``mask_mod`` per element, head
    #: and call. Empty (``(0, bq, bk)``) when they would exceed :data:`STORED_MASK_BYTES`.
    partial_masks: np.ndarray = None
    partial_index: np.ndarray = None

    @property
    def shape(self) -> tuple:
        return self.kinds.shape

    def sparsity(self) -> float:
        """The share of tiles that are empty (skipped), in percent, as PyTorch reports."""
        return 100.0 * float(np.mean(self.kinds == EMPTY))

    def computed(self) -> float:
        """The share of tiles the kernel computes (partial or full)."""
        return float(np.mean(self.kinds != EMPTY))

    def counts(self) -> dict:
        return {k: int(np.sum(self.kinds == v)) for k, v in
                (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}

    def dense(self) -> np.ndarray:
        """The element mask ``(B or 1, H or 1, Q_LEN, KV_LEN)`` (for pictures and tests)."""
        Bm, Hm = self.kinds.shape[:2]
        out = np.zeros((Bm, Hm, self.Q_LEN, self.KV_LEN), np.bool_)
        with index_errors("mask_mod"):
            _dense(self.mask_mod, out)
        return out


@njit(parallel=True)
def _dense(mask_mod, out):
    Bm, Hm, Nq, Nk = out.shape
    for row in prange(Bm * Hm * Nq):
        b, h, i = row // (Hm * Nq), (row // Nq) % Hm, row % Nq
        for j in range(Nk):
            out[b, h, i, j] = mask_mod(b, h, i, j)


@njit(parallel=True)
def _classify(mask_mod, Bm, Hm, Nq, Nk, bq, bk, kinds):
    Tq, Tk = kinds.shape[2], kinds.shape[3]
    for task in prange(Bm * Hm * Tq):
        b, h, t = task // (Hm * Tq), (task // Tq) % Hm, task % Tq
        i0, i1 = t * bq, min(t * bq + bq, Nq)
        for u in range(Tk):
            j0, j1 = u * bk, min(u * bk + bk, Nk)
            seen = 0
            for i in range(i0, i1):
                for j in range(j0, j1):
                    if mask_mod(b, h, i, j):
                        seen += 1
            total = (i1 - i0) * (j1 - j0)
            kinds[b, h, t, u] = 0 if seen == 0 else (2 if seen == total else 1)


def _size(name, x, allow_none=False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {x!r}")
    return int(x)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE=128) -> BlockMask:
    """Evaluate ``mask_mod`` on every ``(b, h, q_idx, kv_idx)`` and classify each tile.

    ``B`` or ``H`` ``None``: the mask does not depend on it (one entry, broadcast), as in
    PyTorch. ``BLOCK_SIZE``: an int or ``(block_q, block_kv)``; the kernel then uses these
    tiles."""
    fn = compile_mod("mask_mod", mask_mod, 4)
    if fn is None:
        raise TypeError("mask_mod must be a function of (b, h, q_idx, kv_idx), got None")
    Bm, Hm = _size("B", B, True) or 1, _size("H", H, True) or 1
    Nq, Nk = _size("Q_LEN", Q_LEN), _size("KV_LEN", KV_LEN)
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if not isinstance(BLOCK_SIZE, tuple) else BLOCK_SIZE
    bq, bk = _size("BLOCK_SIZE", bq), _size("BLOCK_SIZE", bk)
    kinds = np.zeros((Bm, Hm, math.ceil(Nq / bq), math.ceil(Nk / bk)), np.int8)
    with index_errors("mask_mod"):
        _classify(fn, Bm, Hm, Nq, Nk, bq, bk, kinds)
    index = np.full(kinds.shape, -1, np.int32)
    n_partial = int(np.sum(kinds == PARTIAL))
    if n_partial * bq * bk <= STORED_MASK_BYTES:
        index[kinds == PARTIAL] = np.arange(n_partial, dtype=np.int32)
        stored = np.zeros((n_partial, bq, bk), np.bool_)
        with index_errors("mask_mod"):
            _store(fn, index, Nq, Nk, bq, bk, stored)
    else:
        stored = np.zeros((0, bq, bk), np.bool_)
        index[:] = -1
    return BlockMask(kinds, Nq, Nk, (bq, bk), fn, stored, index)


#: Largest total size of the stored partial-tile masks (bytes); above it, partial tiles
#: call ``mask_mod`` per element instead.
STORED_MASK_BYTES = 256 * 2**20


@njit(parallel=True)
def _store(mask_mod, index, Nq, Nk, bq, bk, stored):
    Bm, Hm, Tq, Tk = index.shape
    for task in prange(Bm * Hm * Tq):
        b, h, t = task // (Hm * Tq), (task // Tq) % Hm, task % Tq
        for u in range(Tk):
            p = index[b, h, t, u]
            if p < 0:
                continue
            for i in range(t * bq, min(t * bq + bq, Nq)):
                for j in range(u * bk, min(u * bk + bk, Nk)):
                    stored[p, i - t * bq, j - u * bk] = mask_mod(b, h, i, j)


@contextmanager
def index_errors(name: str):
    """A bounds-checked read that failed inside a parallel loop reaches Python as a
    ``SystemError`` whose context is the ``IndexError``: raise that, naming ``name``."""
    try:
        yield
    except SystemError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, IndexError):
            raise IndexError(f"{name} read past the end of an array it uses ({cause}): "
                             "check its indices against the lengths") from None
        raise


def and_masks(*mask_mods):
    """A ``mask_mod`` that attends where every one of ``mask_mods`` does."""
    return _fold("and_masks", mask_mods, _and)


def or_masks(*mask_mods):
    """A ``mask_mod`` that attends where any one of ``mask_mods`` does."""
    return _fold("or_masks", mask_mods, _or)


def _fold(name, mask_mods, pair):
    """Compile each mask function and combine them left to right with ``pair``."""
    fns = [compile_mod("mask_mods", m, 4) for m in mask_mods]
    if not fns:
        raise ValueError(f"{name} needs at least one mask_mod")
    out = fns[0]
    for nxt in fns[1:]:
        out = pair(out, nxt)
    return out


def _and(f, g):
    def both(b, h, q_idx, kv_idx):
        return f(b, h, q_idx, kv_idx) and g(b, h, q_idx, kv_idx)
    return njit(boundscheck=True)(both)


def _or(f, g):
    def either(b, h, q_idx, kv_idx):
        return f(b, h, q_idx, kv_idx) or g(b, h, q_idx, kv_idx)
    return njit(boundscheck=True)(either)


def reference_flex_attention(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """The float64 truth: scores ``q k^T * scale``, ``score_mod`` and ``mask_mod`` called
    in Python on every element (tiny shapes only), softmax, ``P V``. GQA by repeating
    k/v heads. A row with no visible key: zeros and ``lse = -inf``. ``(out, lse)``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, Nq, d = q.shape
    group = H // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    py_score = getattr(score_mod, "py_func", score_mod)
    py_mask = getattr(mask_mod, "py_func", mask_mod)
    for b, h, i, j in np.ndindex(s.shape):
        if py_score is not None:
            s[b, h, i, j] = py_score(s[b, h, i, j], b, h, i, j)
        if py_mask is not None and not py_mask(b, h, i, j):
            s[b, h, i, j] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(l > 0, (p / np.where(l > 0, l, 1)) @ v, 0.0)
        lse = np.where(l > 0, m + np.log(np.where(l > 0, l, 1)), -np.inf)[..., 0]
    return out, lse


__all__ = ["BlockMask", "create_block_mask", "and_masks", "or_masks", "compile_mod",
           "index_errors",
           "reference_flex_attention", "EMPTY", "PARTIAL", "FULL"]
