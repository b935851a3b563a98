"""The single source of truth: attention in plain NumPy, materializing the scores.

Everything here is obviously correct rather than fast. Tests and notebooks compare
every kernel against :func:`attention` in float64; the same function run in float32
(``dtype=np.float32``) is the "straightforward same-precision implementation" whose
error sets the float32 tolerance (see :mod:`fa_lab.numerics.testing`).

Notation (FlashAttention papers): ``S = Q K^T * scale (+ bias)``, ``m = rowmax(S)``,
``P = exp(S - m)``, ``l = rowsum(P)``, ``O = P V / l``, ``lse = m + log(l)``.

Conventions (shared by every kernel, documented in ``docs/API.md``):

* ``causal=True`` or ``"top_left"``: query ``i`` sees keys ``j <= i`` (PyTorch
  ``is_causal``). ``"bottom_right"``: query ``i`` sees keys ``j <= i + Nk - Nq``
  (flash-attn >= 2.1; the KV-cache convention).
* A boolean mask means True = attend. A float mask is added to the scaled scores.
* A row with no visible key (fully masked) gives ``O = 0`` and ``lse = -inf``.
* NaN in a query row (or in that row of a mask) makes that row NaN, and only it.
  NaN in a key or value reaches every row that can see that key, and no other row:
  a hidden key (causal, ``False`` in a bool mask, ``-inf`` in a float mask) is
  *selected* away (its score set to ``-inf``, its value skipped), never multiplied by a
  zero probability (``0 * NaN`` is NaN). A visible key's value is always multiplied by
  its probability, even one that underflowed to 0. With dropout, a dropped key's value
  is skipped the same way. :func:`select_matmul` is that product.
"""

from __future__ import annotations

import math

import numpy as np

from fa_lab.numerics.dropout import keep_mask
from fa_lab.numerics.quant import from_bf16, to_bf16
from fa_lab.numerics.masks import (alibi_bias, apply_mask, causal_alignment, causal_mask,
                                   feature_offset, mask_to_bias, window_mask)

def scores(q, k, *, scale, mask=None, causal=False, window=None, softcap=0.0,
           alibi_slopes=None, dtype=np.float64):
    """The scores a softmax row sees, in the order every kernel applies them.

    ``x = q k^T * scale``; softcap ``s = c tanh(x / c)`` (when ``softcap > 0``); ALiBi
    ``+ alibi_bias``; the mask (:func:`apply_mask`); then the causal and window masks
    (``-inf`` by selection). ``k`` is already repeated for GQA. Returns ``(s, t)`` with
    ``t = tanh(x / c)`` (for softcap's derivative ``1 - t^2``), or ``t = None``.
    """
    Nq, Nk = q.shape[-2], k.shape[-2]
    s = (q @ np.swapaxes(k, -1, -2)) * dtype(scale)  # (..., H, Nq, Nk)
    t = None
    if softcap:
        t = np.tanh(s / dtype(softcap))
        s = dtype(softcap) * t
    alignment = causal_alignment(causal)
    offset = feature_offset(Nq, Nk, alignment)
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, Nq, Nk, offset, dtype)
        s = s + (bias.reshape(Nq, Nk) if q.ndim == 2 else bias)
    if mask is not None:
        s = apply_mask(s, mask, dtype)
    visible = np.ones((Nq, Nk), bool)
    if alignment is not None:
        visible &= causal_mask(Nq, Nk, alignment)
    if window is not None:
        visible &= window_mask(Nq, Nk, window, offset)
    if not visible.all():
        s = np.where(visible, s, dtype(-np.inf))
    return s, t


def select_matmul(w, x, use) -> np.ndarray:
    """``sum_j w[..., i, j] x[..., j, t]`` over the ``j`` with ``use[..., i, j]`` only.

    Equal to ``w @ x`` when ``x`` is finite (an unused ``w`` is 0 there). With NaN or
    inf in ``x``, an unused ``j`` contributes nothing (selection), while a used one
    follows IEEE arithmetic (``0 * inf`` and ``w * NaN`` are NaN, ``w > 0`` times ``inf``
    is ``inf``). The finite part is one matrix product; the non-finite entries are
    counted with three more products of 0/1 matrices.
    """
    bad = ~np.isfinite(x)
    if not bad.any():
        return w @ x
    dtype = np.result_type(w, x)
    out = w @ np.where(bad, dtype.type(0), x)
    use = np.broadcast_to(use, w.shape)
    hits = lambda cond, y: (cond.astype(np.float64) @ y.astype(np.float64)) > 0  # noqa: E731
    nan = hits(use, np.isnan(x)) | hits(use & (w == 0), np.isinf(x))
    pos = hits(use & (w > 0), np.isposinf(x)) | hits(use & (w < 0), np.isneginf(x))
    neg = hits(use & (w > 0), np.isneginf(x)) | hits(use & (w < 0), np.isposinf(x))
    with np.errstate(invalid="ignore"):
        out = np.where(pos, out + dtype.type(np.inf), out)
        out = np.where(neg, out - dtype.type(np.inf), out)
    return np.where(nan, dtype.type(np.nan), out)


def softmax(x, axis=-1) -> np.ndarray:
    """Safe softmax (subtracts the row max). A row of all ``-inf`` gives zeros."""
    x = np.asarray(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    p = np.exp(x - m)
    l = p.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l == 0, 0.0, p / l)


def repeat_kv(k, H: int) -> np.ndarray:
    """Grouped-query attention: repeat each of the ``H_kv`` heads ``H // H_kv`` times."""
    H_kv = k.shape[-3]
    return k if H_kv == H else np.repeat(k, H // H_kv, axis=-3)


#: Work buffers OpenBLAS allocates during one ``np.matmul`` beyond tiny sizes (measured
#: with memray on this project's machine: 524,360 bytes, independent of the shapes).
BLAS_BUFFER_BYTES = 524_360


def flops(B, H, Nq, Nk, d, causal=False) -> float:
    """The FLOP count every benchmark uses: ``4 B H Nq Nk d`` (two matrix products of
    ``2 Nq Nk d``), halved when causal (the convention of FlashAttention's and Triton's
    benchmarks); the softmax's exponentials are not counted."""
    f = 4.0 * B * H * Nq * Nk * d
    return f / 2 if causal else f


def scratch_bytes(*, B, H, H_kv, Nq, Nk, d, itemsize, **_):
    """Byte model of :func:`attention` in float64 (checked against memray in the tests).

    Inputs are first copied to float64 (if float32) and repeated for GQA. The peak is
    the larger of two phases: during the normalization ``p / l``, four ``(B, H, Nq, Nk)``
    arrays are alive (scores, exponentials, the quotient and its ``where`` result);
    during ``out = p @ v``, two of them plus the float64 output and BLAS's work buffer
    (this phase wins when ``Nk`` is small compared with ``d``).
    """
    S = B * H * Nq * Nk * 8
    rows = 2 * B * H * Nq * 8
    items = {}
    if itemsize != 8:
        items["q, k, v cast to float64"] = (B * H * Nq * d + 2 * B * H_kv * Nk * d) * 8
    if H != H_kv:
        items["k, v repeated for GQA (float64)"] = 2 * B * H * Nk * d * 8
    normalize = 4 * S
    product = 2 * S + B * H * Nq * d * 8 + BLAS_BUFFER_BYTES
    if normalize >= product:
        items["scores S, P and 2 temporaries (4 x B H Nq Nk, float64)"] = normalize
    else:
        items["S, P, float64 output and BLAS buffer (during P V)"] = product
    items["row max and sum (float64)"] = rows
    return items


def attention(q, k, v, *, causal=False, scale=None, mask=None, dtype=np.float64,
              return_p=False, dropout_p=0.0, seed=0, window=None, softcap=0.0,
              alibi_slopes=None, sinks=None):
    """Standard attention, computed in ``dtype`` with the full score matrix.

    Parameters
    ----------
    q : array (..., H, Nq, d) or (Nq, d)
    k, v : arrays (..., H_kv, Nk, d) or (Nk, d); ``H % H_kv == 0``
    causal : False, True, "top_left" or "bottom_right"
    scale : float, default ``1 / sqrt(d)``
    mask : bool or float array broadcastable to (..., H, Nq, Nk)
    dtype : compute dtype (float64 for the reference; float32 for the baseline)
    return_p : also return the probabilities P (..., H, Nq, Nk), after dropout
    dropout_p, seed : inverted dropout on P with the mask of :func:`dropout_mask`
    window : (left, right) ints >= -1, optional: the sliding window of :func:`window_mask`
        (query ``i`` at position ``i + offset``, :func:`feature_offset`)
    softcap : float >= 0: scores ``c * tanh(x / c)`` before any bias or mask (0: off)
    alibi_slopes : (H,) or (..., H): adds ``-slope * |i + offset - j|`` after the softcap
    sinks : (H,) or (..., H): attention sinks, written out as gpt-oss's eager attention
        does: one more score column holding the head's sink logit, softmax over all
        columns, the sink's column dropped before ``P V`` (``lse`` includes it)

    Returns
    -------
    out : (..., H, Nq, d) in ``dtype``
    lse : (..., H, Nq), natural-log logsumexp of the scaled, masked scores
    p : (..., H, Nq, Nk), only with ``return_p``
    """
    q, k, v = (np.asarray(x, dtype=dtype) for x in (q, k, v))
    Nq, d = q.shape[-2:]
    Nk = k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if q.ndim >= 3:
        k, v = repeat_kv(k, q.shape[-3]), repeat_kv(v, q.shape[-3])
    s, _ = scores(q, k, scale=scale, mask=mask, causal=causal, window=window,
                  softcap=softcap, alibi_slopes=alibi_slopes, dtype=dtype)
    if sinks is not None:  # the sink's column, per head
        s = np.concatenate([s, sink_column(sinks, s, dtype)], axis=-1)
    if s.shape[-1] == 0:
        out = np.zeros(s.shape[:-1] + (v.shape[-1],), dtype)
        lse = np.full(s.shape[:-1], -np.inf, dtype)
        return (out, lse, s) if return_p else (out, lse)
    m = s.max(axis=-1, keepdims=True)  # NaN propagates
    m = np.where(np.isneginf(m), dtype(0), m)  # fully masked row: avoid -inf - -inf
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    p, s = p[..., :Nk], s[..., :Nk]  # the sink takes its share of l, adds no value
    visible = ~np.isneginf(s)  # hidden keys are selected away, not multiplied by 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(l == 0, dtype(0), p / l)
        if dropout_p > 0:
            z = dropout_mask(p.shape, dropout_p, seed, dtype)
            p, visible = p * z, visible & (z != 0)
        out = select_matmul(p, v, visible)
        lse = np.where(l == 0, dtype(-np.inf), m + np.log(l))[..., 0]
    return (out, lse, p) if return_p else (out, lse)


def sink_column(sinks, s, dtype) -> np.ndarray:
    """The sinks ``(H,)`` or ``(..., H)`` as one more score column beside ``s``
    ``(..., H, Nq, Nk)`` (or ``(Nq, Nk)`` for 2-D inputs, one head)."""
    x = np.asarray(sinks, dtype)
    x = x.reshape(x.shape + (1, 1)) if s.ndim > 2 else x.reshape(1, 1)
    return np.broadcast_to(x, s.shape[:-1] + (1,))


def dropout_mask(shape, dropout_p, seed, dtype=np.float64) -> np.ndarray:
    """``keep / (1 - p)`` for scores of ``shape`` (..., H, Nq, Nk): 0 where dropped.

    Leading dims are flattened into the batch index ``b`` of the hash in
    :mod:`fa_lab.numerics.dropout`, as the kernels see them.
    """
    Nq, Nk = shape[-2:]
    H = shape[-3] if len(shape) >= 3 else 1
    B = math.prod(shape[:-3])
    keep = keep_mask(seed, B, H, Nq, Nk, dropout_p).reshape(shape)
    return keep.astype(dtype) / dtype(1 - dropout_p)


def attention_backward(q, k, v, dout, *, causal=False, scale=None, mask=None,
                       dropout_p=0.0, seed=0, dtype=np.float64, window=None, softcap=0.0,
                       alibi_slopes=None, sinks=None):
    """Gradients ``(dq, dk, dv)`` of ``sum(attention(q, k, v) * dout)``, materializing P.

    The textbook derivation, in ``dtype``: with ``S = Q K^T * scale (+ mask)``,
    ``P = softmax(S)``, ``Pd = P * Z`` (dropout) and ``O = Pd V``::

        dV = Pd^T dO;   dPd = dO V^T;   dP = dPd * Z
        dS = P * (dP - rowsum(P * dP))          (the softmax Jacobian)
        dQ = dS K * scale;   dK = dS^T Q * scale

    For GQA, ``dk`` and ``dv`` are summed over the query heads sharing a kv head.
    A fully masked row has ``P = 0`` and contributes nothing. With a softcap
    ``s = c tanh(x / c)`` the chain rule adds ``dX = dS * (1 - tanh^2(x / c))`` before
    ``dQ``, ``dK``; a window and ALiBi change only ``P``; so do ``sinks`` (the softmax
    runs over one more column, dropped after it: its value is 0, so ``dP`` there is 0).
    """
    q, k, v, dout = (np.asarray(x, dtype=dtype) for x in (q, k, v, dout))
    Nq, d = q.shape[-2:]
    Nk = k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    H = q.shape[-3] if q.ndim >= 3 else 1
    H_kv = k.shape[-3] if k.ndim >= 3 else 1
    kr, vr = (repeat_kv(k, H), repeat_kv(v, H)) if q.ndim >= 3 else (k, v)
    s, t = scores(q, kr, scale=scale, mask=mask, causal=causal, window=window,
                  softcap=softcap, alibi_slopes=alibi_slopes, dtype=dtype)
    visible = ~np.isneginf(s)  # hidden keys: selected away (see the module docstring)
    if sinks is not None and Nk:
        ext = np.concatenate([s, sink_column(sinks, s, dtype)], axis=-1)
        p = np.where(visible, softmax(ext)[..., :Nk], dtype(0))
    else:
        p = np.where(visible, softmax(s), dtype(0)) if Nk else s  # exp(-inf - NaN) is NaN
    z = dropout_mask(p.shape, dropout_p, seed, dtype) if dropout_p > 0 else dtype(1)
    with np.errstate(invalid="ignore"):
        dv = np.swapaxes(np.where(z != 0, p * z, dtype(0)), -1, -2) @ dout  # dropped: skipped
        dp = np.where(visible & (z != 0), (dout @ np.swapaxes(vr, -1, -2)) * z, dtype(0))
        ds = np.where(visible, p * (dp - np.sum(p * dp, axis=-1, keepdims=True)), dtype(0))
        if t is not None:  # softcap: d(c tanh(x / c)) / dx = 1 - tanh^2
            ds = np.where(visible, ds * (dtype(1) - t * t), dtype(0))
    dq = select_matmul(ds, kr, visible) * dtype(scale)
    dk = (np.swapaxes(ds, -1, -2) @ q) * dtype(scale)
    if H != H_kv:  # sum over the query heads of each kv group
        g = H // H_kv
        dk = dk.reshape(*dk.shape[:-3], H_kv, g, Nk, d).sum(axis=-3)
        dv = dv.reshape(*dv.shape[:-3], H_kv, g, Nk, v.shape[-1]).sum(axis=-3)
    return dq, dk, dv


def _masked32(s, mask, causal):
    """float32 scores with the mask added and the causal mask selected (``-inf``), as the
    straightforward half-precision implementations apply them."""
    f32 = np.float32
    if mask is not None:
        s = s + mask_to_bias(mask, f32)
    alignment = causal_alignment(causal)
    if alignment is not None:
        s = np.where(causal_mask(*s.shape[-2:], alignment), s, f32(-np.inf))
    return s


def _unnormalized32(s):
    """``(m, P = exp(s - m), l = rowsum(P))`` in float32; ``m = 0`` on a fully masked row."""
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), np.float32(0), m)
    p = np.exp(s - m)
    return m, p, p.sum(axis=-1, keepdims=True)


def attention_half(q, k, v, *, dtype, causal=False, scale=None, mask=None):
    """The straightforward half-precision implementation (the baseline of the float16
    and bfloat16 tolerance rules, :mod:`fa_lab.numerics.testing`): inputs rounded to ``dtype``,
    products accumulated in float32 (as half-precision matrix units do), the scores
    ``S`` and probabilities ``P`` rounded to ``dtype`` before they are used, the output
    rounded to ``dtype``. Returns ``(out, lse)`` in ``dtype``.
    """
    half, f32 = np.dtype(dtype), np.float32

    def rnd(x):
        return np.asarray(x).astype(half).astype(f32)

    q, k, v = (rnd(x) for x in (q, k, v))
    Nq, d = q.shape[-2:]
    Nk = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if q.ndim >= 3:
        k, v = repeat_kv(k, q.shape[-3]), repeat_kv(v, q.shape[-3])
    s = _masked32(rnd((q @ np.swapaxes(k, -1, -2)) * f32(scale)), mask, causal)
    if Nk == 0:
        return (np.zeros(s.shape[:-1] + (d,), half), np.full(s.shape[:-1], -np.inf, half))
    m, p, l = _unnormalized32(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = rnd(np.where(l == 0, f32(0), p / l))
        lse = np.where(l == 0, f32(-np.inf), m + np.log(l))[..., 0]
    return (p @ v).astype(half), lse.astype(half)


def attention_bf16_pv(q, k, v, *, causal=False, scale=None, mask=None):
    """The straightforward implementation of a bf16 ``P V`` (the baseline of the
    bfloat16 rule for ``attention_int8(pv_dtype="bfloat16")``): float32 scores and
    softmax, the unnormalized ``P`` and ``V`` rounded to bfloat16 (nearest even),
    ``P V`` accumulated in float32 and divided by the float32 row sum of the unrounded
    ``P``. Returns ``out`` in float32."""
    f32 = np.float32

    def rnd(x):  # bf16 rounding, nearest even
        return from_bf16(to_bf16(x))

    q, k, v = (np.asarray(x, f32) for x in (q, k, v))
    Nq, d = q.shape[-2:]
    Nk = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if q.ndim >= 3:
        k, v = repeat_kv(k, q.shape[-3]), repeat_kv(v, q.shape[-3])
    s = _masked32((q @ np.swapaxes(k, -1, -2)) * f32(scale), mask, causal)
    if Nk == 0:
        return np.zeros(s.shape[:-1] + (d,), f32)
    _, p, l = _unnormalized32(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(l == 0, f32(0), (rnd(p) @ rnd(v)) / l)
    return out.astype(f32)


def attention_int8(q8, sq, k8, sk, v, *, causal=False, scale=None, mask=None):
    """INT8 attention's reference: the quantized ``q8``/``k8`` with per-row scales
    ``sq`` (B, H, Nq) / ``sk`` (B, H_kv, Nk) dequantized in float64 (every int8 dot
    product is exact there), then :func:`attention`. ``(out, lse)`` in float64."""
    qd = q8.astype(np.float64) * sq[..., None]
    kd = k8.astype(np.float64) * sk[..., None]
    return attention(qd, kd, v, causal=causal, scale=scale, mask=mask)


def attention_varlen(q, k, v, cu_q, cu_k, *, scale, causal=False, alibi_slopes=None, **mods):
    """Packed variable-length batches (q ``(H, total_q, d)``, k/v ``(H_kv, total_k, d)``,
    sequence ``b`` at rows ``cu[b]:cu[b+1]``), one :func:`attention` call per sequence;
    ``alibi_slopes`` ``(B, H)``, one row per sequence. ``(out, lse)`` in q's dtype."""
    out = np.zeros(q.shape[:2] + v.shape[2:], q.dtype)
    lse = np.full(q.shape[:2], -np.inf, q.dtype)
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        slopes = None if alibi_slopes is None else alibi_slopes[b]
        out[:, rows], lse[:, rows] = attention(q[:, rows], k[:, keys], v[:, keys], scale=scale,
                                               causal=causal, alibi_slopes=slopes, **mods)
    return out, lse


def gather_pages(pages, table_b, L) -> np.ndarray:
    """Sequence ``b``'s first ``L`` keys, ``(H_kv, L, d)``, copied out of a paged cache
    ``(num_blocks, H_kv, page, d)`` through its block-table row ``table_b``."""
    n = -(-L // pages.shape[2])
    if n == 0:
        return np.zeros((pages.shape[1], 0, pages.shape[3]), pages.dtype)
    return np.concatenate([pages[p] for p in table_b[:n]], axis=1)[:, :L]


def attention_paged(q, k_pages, v_pages, block_table, lengths, *, scale, causal=False,
                    alibi_slopes=None, **mods):
    """Attention against a paged KV cache with ragged ``lengths``: each sequence's keys
    gathered (:func:`gather_pages`), then :func:`attention` (causal is bottom-right, the
    KV-cache convention). ``(out, lse)`` in q's dtype."""
    out = np.zeros(q.shape[:3] + v_pages.shape[3:], q.dtype)
    lse = np.full(q.shape[:3], -np.inf, q.dtype)
    for b in range(q.shape[0]):
        slopes = None if alibi_slopes is None else alibi_slopes[b]
        out[b], lse[b] = attention(q[b], gather_pages(k_pages, block_table[b], lengths[b]),
                                   gather_pages(v_pages, block_table[b], lengths[b]),
                                   scale=scale, causal="bottom_right" if causal else False,
                                   alibi_slopes=slopes, **mods)
    return out, lse
