"""Gradients of attention by recomputation: :func:`attention_backward`, :func:`attention_grad`.

The forward keeps only ``O`` and the row log-sum-exp ``lse``; the backward recomputes
``P = exp(S - lse)`` tile by tile, so training needs no ``N x N`` matrix either. The
kernels live in :mod:`fa_lab.kernels.backward.naive` and
:mod:`fa_lab.kernels.backward.tiled` and are registered in
:data:`fa_lab.BACKWARD_KERNELS`; the float64 reference is
:func:`fa_lab.numerics.reference.attention_backward`.

Canonical driver signature of a jitted backward kernel::

    driver(q, k, v, out, dout, lse, bias, has_bias, scale, causal, offset, block_q,
           block_kv, dropout_p, seed_mixed, dq, dk, dv)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.api import attention, prepare
from fa_lab.numerics.merge import sink_grad
from fa_lab.registry import BACKWARD_KERNELS


def attention_backward(q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike,
                       lse: ArrayLike, dout: ArrayLike, *, causal: bool | str = False,
                       scale: float | None = None, mask: ArrayLike | None = None,
                       dropout_p: float = 0.0, seed: int | None = None, kernel: str = "auto",
                       block_q: int | None = None, block_kv: int | None = None,
                       window: tuple[int, int] | None = None, softcap: float = 0.0,
                       alibi_slopes: ArrayLike | None = None, sinks: ArrayLike | None = None
                       ) -> tuple[np.ndarray, ...]:
    """Gradients ``(dq, dk, dv)`` of ``sum(attention(q, k, v, ...) * dout)``.

    Parameters
    ----------
    q, k, v : as for :func:`fa_lab.attention`
    out, lse : the forward's output ``(..., H, Nq, d)`` and ``lse`` ``(..., H, Nq)``
        (``attention(..., return_lse=True)`` with the same options)
    dout : ``(..., H, Nq, d)``, the gradient of the loss with respect to ``out``
    causal, scale, mask : the forward's options (same conventions)
    dropout_p, seed : the forward's dropout; the mask is regenerated from the seed
    kernel : a name in :data:`fa_lab.BACKWARD_KERNELS` or ``"auto"``
    block_q, block_kv : tile sizes for tiled kernels
    window, softcap, alibi_slopes : the forward's score modifiers (:mod:`fa_lab.numerics.scoremod`);
        with a softcap the gradient goes through ``c tanh(x / c)`` (``1 - tanh^2``)
    sinks : the forward's attention sinks, optional. ``out`` and ``lse`` are then the
        sink-merged ones the forward returned: with them the kernels' gradient is exact
        as it stands (``P = exp(S - lse)`` and ``D = rowsum(dO * O)`` already include
        the sink, whose value is 0), and the sinks' own gradient is
        ``-sum_rows exp(sink - lse) D``.

    Returns
    -------
    dq, dk, dv : the shapes and dtypes of q, k, v. For GQA, ``dk`` and ``dv`` are summed
    over the query heads that share a kv head. A fully masked row has zero gradient.
    dsinks : with ``sinks`` only, the shape of ``sinks`` (summed over the batch when
    ``sinks`` is ``(H,)``).
    """
    call = prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv, dropout_p=dropout_p, seed=seed, window=window,
                   softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    chosen = call.choose(kernel, BACKWARD_KERNELS)
    for name, x, shape in (("out", out, call.out_shape), ("dout", dout, call.out_shape),
                           ("lse", lse, call.q.shape[:-1])):
        if np.shape(x) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {np.shape(x)}")
    B, H, Nq, _ = call.q4.shape
    d_v = call.v4.shape[-1]
    out4 = call.to4("out", out, (B, H, Nq, d_v))
    dout4 = call.to4("dout", dout, (B, H, Nq, d_v))
    lse4 = call.to4("lse", lse, (B, H, Nq))
    kshape, vshape = np.shape(k), np.shape(v)
    dsinks = None
    if call.sinks is not None:
        rows = sink_grad(out4, lse4, dout4, call.sinks[:, :, None]).sum(axis=-1)  # (B, H)
        dsinks = (rows.sum(axis=0) if np.ndim(sinks) == 1 else rows.reshape(np.shape(sinks)))
        dsinks = dsinks.astype(call.q.dtype)
    if call.empty or call.Nk == 0:
        grads = (np.zeros(call.q.shape, call.q.dtype), np.zeros(kshape, call.q.dtype),
                 np.zeros(vshape, call.q.dtype))
        return grads if dsinks is None else (*grads, dsinks)
    bq, bk, _ = call.blocks(chosen.name, chosen)  # a name: the tuning file is forward-only
    dq, dk, dv = chosen.run((call.q4, call.k4, call.v4, out4, dout4, lse4), call.bias,
                            call.scale, call.alignment, bq, bk, dropout_p=call.dropout_p,
                            seed=call.seed, **({"mods": call.mods} if call.mods.active else {}),
                            **({"sinks": call.sinks.reshape(*call.lead, call.H)}
                               if call.sinks is not None and "sinks" in chosen.tags else {}))
    grads = dq.reshape(call.q.shape), dk.reshape(kshape), dv.reshape(vshape)
    return grads if dsinks is None else (*grads, dsinks)


def attention_grad(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, kernel: str = "auto",
                   backward_kernel: str = "auto", **options):
    """Forward now, backward later: returns ``(out, backward)`` with ``backward(dout)``.

    ``options`` (causal, scale, mask, dropout_p, seed, block sizes, window, softcap,
    alibi_slopes, sinks) are shared by both; with ``sinks``, ``backward`` also returns
    ``dsinks``.
    A small autograd-style helper::

        out, backward = fa_lab.attention_grad(q, k, v, causal=True)
        dq, dk, dv = backward(np.ones_like(out))
    """
    out, lse = attention(q, k, v, kernel=kernel, return_lse=True, **options)

    def backward(dout):
        return attention_backward(q, k, v, out, lse, dout, kernel=backward_kernel, **options)

    return out, backward
