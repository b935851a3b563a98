"""The public entry point: :func:`attention` validates, normalizes and dispatches."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from fa_lab import config
from fa_lab.dropout import check_dropout
from fa_lab.reference import causal_alignment, mask_to_bias
from fa_lab.registry import CUDA_KERNELS, KERNELS, Kernel, Request
from fa_lab.scoremod import NONE as NO_MODS
from fa_lab.scoremod import ScoreMods, check_mods


class KernelFallbackWarning(UserWarning):
    """``kernel="auto"`` skipped a faster kernel that cannot serve the call (reason inside)."""


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

#: Half-precision input dtypes: computed in float32, returned in the input dtype.
#: bfloat16 is the ``ml_dtypes`` NumPy extension type (installed with the ``models``
#: extra); it is recognised by name, so fa_lab does not need ml_dtypes itself.
HALF_DTYPES = ("float16", "bfloat16")


def _half_dtype(q) -> np.dtype | None:
    """q's dtype if it is a half-precision float (see :data:`HALF_DTYPES`), else None."""
    dtype = getattr(q, "dtype", None)
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    return dtype if dtype.name in HALF_DTYPES else None


def _widen(name, x, half):
    """A half-precision companion array (k, v, a float mask) as float32."""
    x = np.asarray(x)
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


def _as_float_array(name, x) -> np.ndarray:
    refuse_masked(name, x)
    x = np.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def _check_block(name, value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return int(value)


def _check_shapes(q, k, v):
    """Return (lead, H, H_kv, Nq, Nk, d) or raise naming the argument."""
    if q.ndim < 2:
        raise ValueError(f"q must have shape (..., H, Nq, d) or (Nq, d), got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != q.ndim:
            raise ValueError(f"{name} must have the same rank as q ({q.ndim}): expected "
                             f"{'(Nk, d)' if q.ndim == 2 else '(..., H_kv, Nk, d)'}, "
                             f"got shape {x.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the same shape as k {k.shape}, got {v.shape}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k must have the head dimension d={d} of q, got shape {k.shape}")
    if d == 0:
        raise ValueError(f"q must have a head dimension d >= 1, got shape {q.shape}")
    if q.ndim == 2:
        return (), 1, 1, q.shape[0], k.shape[0], d
    if k.shape[:-3] != q.shape[:-3]:
        raise ValueError(f"k and v must have the leading dims {q.shape[:-3]} of q, got "
                         f"shape {k.shape}")
    H, H_kv = q.shape[-3], k.shape[-3]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the heads of q (H={H}) must be a multiple of the heads of k and "
                         f"v (H_kv={H_kv})")
    return q.shape[:-3], H, H_kv, q.shape[-2], k.shape[-2], d


def _bias(mask, dtype, full_shape, B, H, Nq, Nk):
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


def effective_blocks(Nq: int, Nk: int, block_q=None, block_kv=None,
                     defaults=None) -> tuple[int, int]:
    """The tile sizes a tiled kernel really uses: its defaults (or :mod:`fa_lab.config`'s)
    where none are given, clamped to the problem (tiny inputs do not allocate big tiles)."""
    dq, dk = defaults or (config.BLOCK_Q, config.BLOCK_KV)
    return min(block_q or dq, max(Nq, 1)), min(block_kv or dk, max(Nk, 1))


def choose_kernel(kernel: str, req: Request, table=None) -> tuple[Kernel, list[str]]:
    """Resolve ``kernel`` (a registry name or ``"auto"``) for ``req`` in ``table``
    (default :data:`fa_lab.KERNELS`; :data:`fa_lab.BACKWARD_KERNELS` for gradients).

    Returns the kernel and, for ``"auto"``, the reasons why faster kernels were
    skipped. An explicit kernel that cannot serve the call raises NotImplementedError.
    """
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str (a name in fa_lab.KERNELS or 'auto'), "
                        f"got {kernel!r}")
    table = KERNELS if table is None else table
    if kernel != "auto":
        if table is KERNELS and kernel in CUDA_KERNELS:  # GPU kernels: by name only
            table = CUDA_KERNELS
        if kernel not in table:
            known = sorted(table) + (sorted(CUDA_KERNELS) if table is KERNELS else [])
            raise ValueError(f"kernel must be 'auto' or one of {known}, got {kernel!r}")
        reason = table[kernel].unsupported(req)
        if reason:
            raise NotImplementedError(reason)
        return table[kernel], []
    skipped = []
    for candidate in sorted(table.values(), key=lambda c: -c.rung):
        reason = candidate.unsupported(req)
        if reason is None:
            return candidate, skipped
        skipped.append(reason)
    raise NotImplementedError("no registered kernel supports this call: " + "; ".join(skipped))


def attention(q, k, v, *, causal=False, scale=None, mask=None, kernel="auto",
              block_q=None, block_kv=None, return_lse=False, dropout_p=0.0, seed=None,
              window=None, softcap=0.0, alibi_slopes=None):
    """Scaled dot-product attention ``softmax(Q K^T * scale + mask) V``.

    Parameters
    ----------
    q : array (..., H, Nq, d) or (Nq, d), float32 or float64
    k, v : arrays (..., H_kv, Nk, d) or (Nk, d), the same dtype and leading dims as q.
        ``H % H_kv == 0``: query head ``h`` uses kv head ``h // (H // H_kv)``
        (grouped-query / multi-query attention, as PyTorch's ``enable_gqa``).
        Strided (non-contiguous) views are accepted (copied to contiguous memory).
    causal : False, True, "top_left" or "bottom_right"
        ``True``/``"top_left"``: query ``i`` sees keys ``j <= i`` (PyTorch ``is_causal``).
        ``"bottom_right"``: query ``i`` sees keys ``j <= i + Nk - Nq`` (flash-attn >= 2.1;
        decoding with a KV cache).
    scale : float, optional
        Multiplies ``Q K^T``; defaults to ``1 / sqrt(d)``.
    mask : bool or float array broadcastable to (..., H, Nq, Nk), optional
        bool: True = attend (PyTorch's meaning). float: added to the scaled scores
        (e.g. an ALiBi bias; ``-inf`` hides a key). Combines with ``causal``.
    kernel : str
        A name in :data:`fa_lab.KERNELS` or ``"auto"`` (the highest rung that supports
        the call; if it has to skip one it says why with a :class:`KernelFallbackWarning`).
    block_q, block_kv : int, optional
        Tile sizes ``Br``, ``Bc`` for tiled kernels (defaults: the kernel's own or
        :mod:`fa_lab.config`'s; with ``kernel="auto"``, the autotuner's stored choice
        for this machine when there is one, see :mod:`fa_lab.tune` and :func:`plan`).
    return_lse : bool
        Also return ``lse``, the natural-log logsumexp of each row of the scaled,
        masked scores.
    dropout_p : float in [0, 1)
        Attention dropout on the probabilities (kept ones scaled by ``1/(1-p)``); the
        mask is a hash of ``(seed, b, h, i, j)`` (:mod:`fa_lab.dropout`), so
        :func:`fa_lab.attention_backward` regenerates it. ``lse`` is not affected.
    seed : int, required when ``dropout_p > 0``
    window : (left, right), optional
        flash-attn's sliding window: query ``i`` (at position ``i + offset``, ``offset =
        0`` for ``causal=True``/``"top_left"``, else ``Nk - Nq``) sees keys ``i + offset
        - left <= j <= i + offset + right``; ``-1`` = unbounded on that side. Combines
        with ``causal`` and ``mask``; key tiles outside the band are skipped.
    softcap : float >= 0
        Scores ``c * tanh(scale * q.k / c)`` (Gemma-2), before any bias or mask; 0 = off.
    alibi_slopes : array (H,) or (..., H), optional
        ALiBi: adds ``-slope * |i + offset - j|`` to the (softcapped) scores, computed
        in the kernel (no ``N x N`` bias).

    Returns
    -------
    out : (..., H, Nq, d), q's dtype
    lse : (..., H, Nq), q's dtype, only with ``return_lse``

    Notes
    -----
    A row with no visible key (fully masked) returns zeros and ``lse = -inf``, never
    NaN. NaN in a query row makes that output row NaN and leaves the others exact; NaN
    in a key or value reaches exactly the rows that can see that key (hidden keys are
    selected away, see :mod:`fa_lab.reference`). ``scale`` must be finite; NumPy masked
    arrays are refused.
    ``Nq = 0`` returns an empty result; ``Nk = 0`` gives zeros and ``lse = -inf``.

    Half precision: float16 (and ``ml_dtypes.bfloat16``) inputs are computed in
    float32 by the same kernels and the results rounded to the input dtype; their
    tolerance is the 2x rule against :func:`fa_lab.reference.attention_half`.
    """
    half = _half_dtype(q)
    if half is not None:
        if isinstance(mask, np.ndarray) and mask.dtype == half:
            mask = mask.astype(np.float32)
        res = attention(np.asarray(q).astype(np.float32), _widen("k", k, half),
                        _widen("v", v, half), causal=causal, scale=scale, mask=mask,
                        kernel=kernel, block_q=block_q, block_kv=block_kv,
                        return_lse=return_lse, dropout_p=dropout_p, seed=seed,
                        window=window, softcap=softcap, alibi_slopes=alibi_slopes)
        return tuple(x.astype(half) for x in res) if return_lse else res.astype(half)
    call = _prepare(q, k, v, causal, scale, mask, block_q, block_kv, dropout_p, seed,
                    window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    return_lse = check_bool("return_lse", return_lse)
    chosen = _choose(kernel, call.request, KERNELS)
    if call.empty:
        out, lse = np.zeros(call.q.shape, call.q.dtype), np.zeros(call.q.shape[:-1], call.q.dtype)
        return (out, lse) if return_lse else out
    bq, bk, _ = _blocks(kernel, chosen, call)
    extra = (call.dropout_p, call.seed) if chosen.dropout else ()
    mods = {"mods": call.mods} if call.mods.active else {}
    out, lse = chosen.run(call.q4, call.k4, call.v4, call.bias, call.scale, call.alignment,
                          bq, bk, *extra, **mods)
    out, lse = out.reshape(call.q.shape), lse.reshape(call.q.shape[:-1])
    return (out, lse) if return_lse else out


def _blocks(kernel, chosen, call) -> tuple[int | None, int | None, str]:
    """Tile sizes for a call and where they come from: ``"given"``, ``"tuned"`` (only
    for ``kernel="auto"``, from :mod:`fa_lab.tune`), ``"default"``, or ``"n/a"``."""
    if not chosen.tiled:
        return call.block_q, call.block_kv, "n/a"
    source = "given" if (call.block_q or call.block_kv) else "default"
    bq, bk = call.block_q, call.block_kv
    if kernel == "auto" and source == "default":
        from fa_lab.tune import tuned_blocks

        tuned = tuned_blocks(chosen.name, call.Nq)
        if tuned:
            (bq, bk), source = tuned, "tuned"
    bq, bk = effective_blocks(call.Nq, call.Nk, bq, bk, chosen.default_blocks)
    return bq, bk, source


def plan(q, k, v, *, causal=False, scale=None, mask=None, kernel="auto", block_q=None,
         block_kv=None, dropout_p=0.0, seed=None, window=None, softcap=0.0,
         alibi_slopes=None) -> dict:
    """What :func:`attention` would run for these arguments, without running it.

    Returns ``kernel``, ``block_q``, ``block_kv``, ``blocks_from`` (``"given"``,
    ``"tuned"``, ``"default"`` or ``"n/a"``), ``splits`` (key splits of the ``flash``
    kernel's Flash-Decoding path, 1 = none) and ``skipped`` (why faster kernels could
    not serve the call). Validates the arguments exactly as :func:`attention` does.
    """
    import numba

    half = _half_dtype(q)
    if half is not None:  # computed in float32, as attention() does
        q, k, v = np.asarray(q).astype(np.float32), _widen("k", k, half), _widen("v", v, half)
    call = _prepare(q, k, v, causal, scale, mask, block_q, block_kv, dropout_p, seed,
                    window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    chosen, skipped = choose_kernel(kernel, call.request, KERNELS)
    bq, bk, source = _blocks(kernel, chosen, call)
    splits = 1
    if chosen.name == "flash" and not call.empty:
        from fa_lab.kernels.flash import plan_splits

        splits = plan_splits(call.B, call.H, call.Nq, call.Nk, bq, bk, numba.get_num_threads())
    return {"kernel": chosen.name, "block_q": bq, "block_kv": bk, "blocks_from": source,
            "splits": splits, "skipped": skipped}


@dataclass
class _Call:
    """A validated, normalized attention call (shared by the forward and the backward)."""

    q: np.ndarray
    lead: tuple
    H: int
    H_kv: int
    Nq: int
    Nk: int
    d: int
    q4: np.ndarray
    k4: np.ndarray
    v4: np.ndarray
    bias: np.ndarray | None
    scale: float
    alignment: str | None
    block_q: int | None
    block_kv: int | None
    dropout_p: float
    seed: int
    request: Request
    mods: ScoreMods = NO_MODS

    @property
    def B(self) -> int:
        return math.prod(self.lead)

    @property
    def empty(self) -> bool:
        return self.B == 0 or self.Nq == 0

    def to4(self, name, x, heads):
        """Validate a companion array (out, dout, lse) and reshape it like q or k."""
        x = _as_float_array(name, x)
        if x.dtype != self.q.dtype:
            raise TypeError(f"{name} must have q's dtype {self.q.dtype}, got {x.dtype}")
        return np.ascontiguousarray(x.reshape(heads))


def _prepare(q, k, v, causal, scale, mask, block_q, block_kv, dropout_p, seed, *,
             window=None, softcap=0.0, alibi_slopes=None) -> _Call:
    """Validate every argument and normalize the arrays to (B, H, N, d)."""
    q = _as_float_array("q", q)
    k = _as_float_array("k", k)
    v = _as_float_array("v", v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    lead, H, H_kv, Nq, Nk, d = _check_shapes(q, k, v)
    alignment = causal_alignment(causal)
    scale = check_scale(scale, d)
    block_q = _check_block("block_q", block_q)
    block_kv = _check_block("block_kv", block_kv)
    dropout_p, seed = check_dropout(dropout_p, seed)
    B = math.prod(lead)
    full_shape = (*lead, H, Nq, Nk) if q.ndim > 2 else (Nq, Nk)
    bias = None if mask is None else _bias(mask, q.dtype, full_shape, B, H, Nq, Nk)
    mods = check_mods(window, softcap, alibi_slopes, lead, H, q.dtype)
    req = Request(dtype=q.dtype, causal=alignment is not None, mask=bias is not None,
                  gqa=H != H_kv, blocks=block_q is not None or block_kv is not None,
                  dropout=dropout_p > 0, window=mods.window, softcap=mods.softcap > 0,
                  alibi=mods.slopes is not None)
    q4 = np.ascontiguousarray(q.reshape(B, H, Nq, d))
    k4 = np.ascontiguousarray(k.reshape(B, H_kv, Nk, d))
    v4 = np.ascontiguousarray(v.reshape(B, H_kv, Nk, d))
    return _Call(q, lead, H, H_kv, Nq, Nk, d, q4, k4, v4, bias, scale, alignment,
                 block_q, block_kv, dropout_p, seed, req, mods)


def _choose(kernel, req, table):
    chosen, skipped = choose_kernel(kernel, req, table)
    if skipped:
        warnings.warn(f"kernel='auto' chose {chosen.name!r}: " + "; ".join(skipped),
                      KernelFallbackWarning, stacklevel=3)
    return chosen
