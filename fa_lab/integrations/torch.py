"""fa_lab's attention on CPU torch tensors, with autograd.

``attention(q, k, v, ...)`` has :func:`fa_lab.attention`'s arguments and conventions
(layout ``(..., H, N, d)``, GQA, both causal alignments, bool/float masks, dropout
with a seed, LSE) and takes and returns ``torch.Tensor``:

* dtypes float32 and float64 are computed in their own precision; float16 and
  bfloat16 in float32, the result rounded back (as :func:`fa_lab.attention` does for
  NumPy half types). Inference on bfloat16 (no input requires a gradient) on a CPU with
  AMX runs both products in bf16 on the matrix engine instead, fed the tensors' bits
  without a copy (:func:`fa_lab.api.attention_bf16_bits`; fp32 softmax and
  accumulation, as PyTorch's bf16 SDPA), unless an option that path lacks (dropout,
  window, softcap, ALiBi), a named float kernel, or a decode step measured faster in
  float32 on this machine (as :func:`fa_lab.attention` decides) sends it to float32;
* the tensors are shared with NumPy, not copied, where the layout allows
  (``Tensor.numpy()`` and ``torch.from_numpy`` are views): a contiguous float32 q
  costs no copy; a strided view (transformers hands q over as ``(B, N, H, d)``
  transposed) is copied once by the kernel's contiguity rule, and half types once by
  the widening to float32;
* ``loss.backward()`` works: a ``torch.autograd.Function`` whose backward is
  :func:`fa_lab.attention_backward` (``O`` and ``lse`` are kept from the forward, ``P``
  is recomputed). Gradients flow to q, k, v and the attention ``sinks`` (gpt-oss's
  learned per-head logits), not to a float mask. ``lse`` is returned as a constant (no
  gradient through it).

Only CPU tensors: a CUDA tensor raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import numpy as np
import torch

from fa_lab.api import attention as _attention
from fa_lab.api import attention_bf16_bits, bf16_kernels_serve
from fa_lab.features.backward import attention_backward

#: torch dtype -> the NumPy dtype fa_lab computes in.
COMPUTE = {torch.float32: np.float32, torch.float64: np.float64,
           torch.float16: np.float32, torch.bfloat16: np.float32}


def _check(name, t, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype not in COMPUTE:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {dtype} and {name} {t.dtype}")


def to_numpy(t: torch.Tensor, dtype=None) -> np.ndarray:
    """A NumPy view of a CPU tensor (no copy) when its dtype is ``dtype`` (default: its
    own), else a converted copy. bfloat16 has no NumPy dtype: converted to float32."""
    t = t.detach()
    want = COMPUTE[t.dtype] if dtype is None else dtype
    if t.dtype in (torch.float16, torch.bfloat16) or np.dtype(want) != np.dtype(
            str(t.dtype).removeprefix("torch.")):
        return t.to(torch.float32 if want == np.float32 else torch.float64).numpy()
    return t.numpy()


def _mask(mask, dtype):
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    if mask.device.type != "cpu":
        raise ValueError(f"mask must be a CPU tensor, got device {mask.device}")
    if mask.dtype == torch.bool:
        return mask.numpy()
    if not mask.is_floating_point():
        raise TypeError(f"mask must be a bool or float tensor, got {mask.dtype}")
    return to_numpy(mask, dtype)


class _Attention(torch.autograd.Function):
    """Forward: fa_lab's kernels; backward: :func:`fa_lab.attention_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, mask, sinks, opts):
        dtype = COMPUTE[q.dtype]
        qn, kn, vn = (to_numpy(x, dtype) for x in (q, k, v))
        maskn = _mask(mask, dtype)
        sinksn = None if sinks is None else to_numpy(sinks, dtype)
        out, lse = _attention(qn, kn, vn, mask=maskn, sinks=sinksn, return_lse=True, **opts)
        ctx.saved = (qn, kn, vn, maskn, sinksn, out, lse, opts, q.dtype,
                     None if sinks is None else sinks.dtype)
        out_t = torch.from_numpy(out).to(q.dtype)
        lse_t = torch.from_numpy(lse).to(q.dtype)
        ctx.mark_non_differentiable(lse_t)
        return out_t, lse_t

    @staticmethod
    def backward(ctx, dout, _dlse):
        qn, kn, vn, maskn, sinksn, out, lse, opts, dtype, sinks_dtype = ctx.saved
        backward_opts = {key: opts[key] for key in ("causal", "scale", "dropout_p", "seed",
                                                    "window", "softcap", "alibi_slopes")}
        grads = attention_backward(qn, kn, vn, out, lse, to_numpy(dout, qn.dtype.type),
                                   mask=maskn, sinks=sinksn, **backward_opts)
        dsinks = None if sinksn is None else torch.from_numpy(grads[3]).to(sinks_dtype)
        return (torch.from_numpy(grads[0]).to(dtype), torch.from_numpy(grads[1]).to(dtype),
                torch.from_numpy(grads[2]).to(dtype), None, dsinks, None)


def _bf16_tiles(q, k, v, mask, sinks, opts):
    """bfloat16 tensors on the bf16 kernels (AMX), their bits shared with NumPy:
    float32 ``(out, lse)``, or None when that path does not serve the call."""
    if q.dtype != torch.bfloat16 or not bf16_kernels_serve(opts["kernel"], q.shape):
        return None
    bits = [x.detach().contiguous().view(torch.int16).numpy() for x in (q, k, v)]
    return attention_bf16_bits(*bits, mask=_mask(mask, np.float32),
                               sinks=None if sinks is None else to_numpy(sinks, np.float32),
                               **opts)


def attention(q, k, v, *, causal=False, scale=None, mask=None, kernel="auto", block_q=None,
              block_kv=None, return_lse=False, dropout_p=0.0, seed=None, window=None,
              softcap=0.0, alibi_slopes=None, sinks=None):
    """:func:`fa_lab.attention` on CPU torch tensors; differentiable in q, k and v.

    Parameters and conventions are those of :func:`fa_lab.attention`; ``q``, ``k``,
    ``v`` are tensors of one dtype (float32, float64, float16 or bfloat16), ``mask`` a
    bool or float tensor (or NumPy array), ``sinks`` a float tensor ``(H,)`` or
    ``(..., H)`` (its gradient is computed when it requires one). Returns ``out`` (and
    ``lse`` with ``return_lse``) as tensors of q's dtype.
    """
    _check("q", q)
    _check("k", k, q.dtype)
    _check("v", v, q.dtype)
    if isinstance(alibi_slopes, torch.Tensor):
        alibi_slopes = to_numpy(alibi_slopes, COMPUTE[q.dtype])
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        sinks = torch.as_tensor(np.asarray(sinks, dtype=COMPUTE[q.dtype]))
    if sinks is not None:
        if sinks.device.type != "cpu":
            raise ValueError(f"sinks must be a CPU tensor, got device {sinks.device}")
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a float tensor, got {sinks.dtype}")
    opts = {"causal": causal, "scale": scale, "kernel": kernel, "block_q": block_q,
            "block_kv": block_kv, "dropout_p": dropout_p, "seed": seed, "window": window,
            "softcap": softcap, "alibi_slopes": alibi_slopes}
    tracked = (q, k, v) if sinks is None else (q, k, v, sinks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        out, lse = _Attention.apply(q, k, v, mask, sinks, opts)
    elif (res := _bf16_tiles(q, k, v, mask, sinks, opts)) is not None:
        out, lse = (torch.from_numpy(x).to(torch.bfloat16) for x in res)
    else:  # inference (decoding): no autograd node, nothing kept for a backward
        dtype = COMPUTE[q.dtype]
        out, lse = _attention(*(to_numpy(x, dtype) for x in (q, k, v)), mask=_mask(mask, dtype),
                              sinks=None if sinks is None else to_numpy(sinks, dtype),
                              return_lse=True, **opts)
        out, lse = torch.from_numpy(out).to(q.dtype), torch.from_numpy(lse).to(q.dtype)
    return (out, lse) if return_lse else out


__all__ = ["attention", "to_numpy", "COMPUTE"]
