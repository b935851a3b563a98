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
from fa_lab.registry import BACKWARD_KERNELS


def attention_backward(q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike,
                       lse: ArrayLike, dout: ArrayLike, *, causal: bool | str = False,
                       scale: float | None = None, mask: ArrayLike | None = None,
                       dropout_p: float = 0.0, seed: int | None = None, kernel: str = "auto",
                       block_q: int | None = None, block_kv: int | None = None,
                       window: tuple[int, int] | None = None, softcap: float = 0.0,
                       alibi_slopes: ArrayLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    Returns
    -------
    dq, dk, dv : the shapes and dtypes of q, k, v. For GQA, ``dk`` and ``dv`` are summed
    over the query heads that share a kv head. A fully masked row has zero gradient.
    """
    call = prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv, dropout_p=dropout_p, seed=seed, window=window,
                   softcap=softcap, alibi_slopes=alibi_slopes)
    chosen = call.choose(kernel, BACKWARD_KERNELS)
    for name, x, shape in (("out", out, call.q.shape), ("dout", dout, call.q.shape),
                           ("lse", lse, call.q.shape[:-1])):
        if np.shape(x) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {np.shape(x)}")
    B, H, Nq, d = call.q4.shape
    out4 = call.to4("out", out, (B, H, Nq, d))
    dout4 = call.to4("dout", dout, (B, H, Nq, d))
    lse4 = call.to4("lse", lse, (B, H, Nq))
    kshape = np.shape(k)
    if call.empty or call.Nk == 0:
        return (np.zeros(call.q.shape, call.q.dtype), np.zeros(kshape, call.q.dtype),
                np.zeros(kshape, call.q.dtype))
    bq, bk, _ = call.blocks(chosen.name, chosen)  # a name: the tuning file is forward-only
    dq, dk, dv = chosen.run((call.q4, call.k4, call.v4, out4, dout4, lse4), call.bias,
                            call.scale, call.alignment, bq, bk, dropout_p=call.dropout_p,
                            seed=call.seed, **({"mods": call.mods} if call.mods.active else {}))
    return dq.reshape(call.q.shape), dk.reshape(kshape), dv.reshape(kshape)


def attention_grad(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, kernel: str = "auto",
                   backward_kernel: str = "auto", **options):
    """Forward now, backward later: returns ``(out, backward)`` with ``backward(dout)``.

    ``options`` (causal, scale, mask, dropout_p, seed, block sizes, window, softcap,
    alibi_slopes) are shared by both.
    A small autograd-style helper::

        out, backward = fa_lab.attention_grad(q, k, v, causal=True)
        dq, dk, dv = backward(np.ones_like(out))
    """
    out, lse = attention(q, k, v, kernel=kernel, return_lse=True, **options)

    def backward(dout):
        return attention_backward(q, k, v, out, lse, dout, kernel=backward_kernel, **options)

    return out, backward
