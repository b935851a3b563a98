"""INT8 attention: Q and K quantized to int8, QK^T in int32, softmax and P V in float.

:func:`attention_int8` is :func:`fa_lab.attention` with quantized scores. Conventions
are the same (shapes, GQA, both causal alignments, masks, fully masked rows -> zeros and
``lse = -inf``) and so are the input checks, plus one: ``q`` and ``k`` must be finite
(INT8 has no NaN or infinity; a ``ValueError`` names the argument). NaN in ``v``
propagates to the rows that see it, as in float attention.

Smoothing K (``smooth_k=True``, SageAttention's trick): K's per-channel mean over the
tokens is subtracted before quantizing. In exact arithmetic this changes nothing:
``q_i . (k_j - mean) = q_i . k_j - q_i . mean``, and the second term is the same for
every key of row ``i``, a constant shift that softmax removes. It matters for INT8
because real keys share a large per-channel offset: without smoothing the offset
dominates ``max|K|``, so the scale is large and the part that differs between keys is
rounded away. Only the LSE moves, by ``scale * q_i . mean``; it is added back when
``return_lse=True`` (with the unquantized ``q``), so the LSE is that of the original
scores.
"""

from __future__ import annotations

import numpy as np

from fa_lab import quant
from fa_lab.api import check_bool, effective_blocks, prepare
from fa_lab.registry import INT8_KERNELS


def quantize_inputs(q4, k4, granularity, block_q, block_kv, smooth):
    """Quantize (B, H, N, d) ``q4`` and ``k4`` as :func:`attention_int8` does.

    Returns ``q8, sq, k8, sk, mean`` with per-row scales ``sq`` (B, H, Nq) and ``sk``
    (B, H_kv, Nk) as float64 and ``mean`` the subtracted K mean (or ``None``).
    """
    for name, x in (("q", q4), ("k", k4)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: must be finite to quantize (INT8 has no NaN or "
                             f"infinity)")
    mean = None
    if smooth:
        k4, mean = quant.smooth_k(k4)
    out = []
    for name, x, block in (("q", q4, block_q), ("k", k4, block_kv)):
        try:
            xq, s = quant.quantize(x, granularity,
                                   block if granularity == "per_block" else None,
                                   scale_dtype=np.float64)  # beyond float32's range too
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        rows = np.ascontiguousarray(np.broadcast_to(s, x.shape[:-1] + (1,))[..., 0],
                                    dtype=np.float64)
        out += [quant.aligned(xq), rows]
    return (*out, mean)


def attention_int8(q, k, v, *, causal=False, scale=None, mask=None,
                   granularity="per_block", smooth_k=True, kernel="auto", block_q=None,
                   block_kv=None, return_lse=False):
    """Attention with INT8 ``Q`` and ``K`` (symmetric, see :mod:`fa_lab.quant`).

    Parameters as :func:`fa_lab.attention`, plus:

    granularity : "per_tensor", "per_token" or "per_block" (default)
        Scale groups of Q and K. ``"per_block"`` uses the kernel's tiles: ``block_q``
        rows of Q and ``block_kv`` rows of K per scale (``Br``, ``Bc``; for the untiled
        ``naive`` kernel, the :mod:`fa_lab.config` defaults).
    smooth_k : bool
        Subtract K's per-channel mean before quantizing (exact for the output; LSE
        corrected).
    kernel : "auto" (``simd``) or a name in :data:`fa_lab.INT8_KERNELS`.

    Returns ``out`` (q's dtype) and, with ``return_lse``, ``lse``.
    """
    call = prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv)
    return_lse = check_bool("return_lse", return_lse)
    chosen = call.choose(kernel, INT8_KERNELS)
    if not isinstance(granularity, str) or granularity not in quant.GRANULARITIES:
        raise ValueError(f"granularity must be one of {quant.GRANULARITIES}, "
                         f"got {granularity!r}")
    if not isinstance(smooth_k, (bool, np.bool_)):
        raise TypeError(f"smooth_k must be a bool, got {smooth_k!r}")
    if call.empty:
        out, lse = np.zeros(call.q.shape, call.q.dtype), np.zeros(call.q.shape[:-1], call.q.dtype)
        return (out, lse) if return_lse else out
    bq, bk = effective_blocks(call.Nq, call.Nk, call.block_q, call.block_kv,
                              chosen.default_blocks)
    q8, sq, k8, sk, mean = quantize_inputs(call.q4, call.k4, granularity, bq, bk, smooth_k)
    out, lse = chosen.run((q8, sq, k8, sk, call.v4), call.bias, call.scale, call.alignment,
                          bq if chosen.tiled else None, bk if chosen.tiled else None)
    if return_lse and mean is not None and call.Nk:
        group = call.H // call.H_kv
        shift = np.einsum("bhnd,bhd->bhn", call.q4.astype(np.float64),
                          np.repeat(mean[:, :, 0, :].astype(np.float64), group, axis=1))
        lse = (lse + call.scale * shift).astype(lse.dtype)
    out, lse = out.reshape(call.q.shape), lse.reshape(call.q.shape[:-1])
    return (out, lse) if return_lse else out
