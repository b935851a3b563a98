"""fa_lab as an attention implementation of Hugging Face transformers.

::

    from fa_lab.integrations.transformers import register
    register()                                  # name "fa_lab", kernel "auto"
    model = AutoModel.from_pretrained(path, attn_implementation="fa_lab")

:func:`register` registers two things under one name, both needed:

* the **attention function** (``AttentionInterface``): transformers calls it with
  ``query`` ``(B, H, Nq, d)`` (a transposed view), ``key``/``value`` ``(B, H_kv, Nk, d)``
  (GQA heads passed unrepeated: fa_lab reads kv head ``h // (H // H_kv)``), the mask,
  ``scaling`` and ``dropout``; it returns ``(B, Nq, H, d)`` and no weights;
* the **mask function** (``AttentionMaskInterface``: transformers' ``sdpa_mask``, a
  bool mask, True = attend). Without it transformers passes ``attention_mask=None``
  to an unknown implementation and silently ignores padding.

The causal rule is SDPA's, so both give the same answer: causal (top-left) only when no
mask is passed, there is more than one query and the layer is causal (decoder
self-attention); a mask, when given, already holds causality and padding. A prefill into
a preallocated static cache passes keys beyond the queries: as SDPA does, they are cut
to the first ``Nq`` (top-left causal sees none of them anyway).

What transformers sends besides the tensors, keyword by keyword:

* passed through: ``scaling`` (scale), ``dropout`` (in training), ``sliding_window`` ``W``
  (fa_lab's ``window=(W - 1, W - 1)``, exactly as transformers hands it to flash-attn;
  causality still comes from the mask or the causal flag, so a decoder sees the ``W``
  most recent keys), ``softcap`` (Gemma-2's logit softcapping), ``s_aux`` (gpt-oss's
  learned attention sinks, one logit per query head: fa_lab's ``sinks``, with their
  gradient);
* ignored, because the mask already holds what they say or they do not touch attention:
  :data:`IGNORED` (``position_ids``, ``use_cache``, packing's ``cu_seq_lens_*``, ...);
* refused with a clear error: ``output_attentions=True`` (fa_lab never forms the
  weights), :data:`REFUSED` (``position_bias``, head masks) when set, and **any other
  keyword**: a keyword fa_lab does not understand is never
  dropped, since a dropped one can change the answer silently.

``int8=True`` registers :func:`fa_lab.attention_int8` instead (inference only: no
gradient), for INT8 attention inside a real model (lesson 11).
"""

from __future__ import annotations

import torch

from fa_lab.features.int8 import attention_int8
from fa_lab.integrations.torch import attention as torch_attention
from fa_lab.integrations.torch import to_numpy

#: Keywords whose value changes attention and that fa_lab does not compute (yet).
REFUSED = ("position_bias", "head_mask", "layer_head_mask")
#: Keywords passed through to fa_lab (besides ``scaling`` and ``dropout``).
PASSED = ("sliding_window", "softcap", "s_aux")
#: Keywords transformers passes that change nothing here: the mask function
#: (``sdpa_mask``) already encodes positions and packed sequences, the rest is
#: bookkeeping of the model's forward.
IGNORED = frozenset({
    "position_ids", "cache_position", "use_cache", "past_key_values", "output_hidden_states",
    "output_router_logits", "num_items_in_batch", "return_dict", "encoder_hidden_states",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "output_attentions",
})


def _attentions_requested(kwargs) -> bool:
    """Did the caller ask for the attention weights? transformers 5 no longer passes
    ``output_attentions`` to the attention function; it collects weights through hooks
    while a context variable names what to collect (read here; older versions pass the
    keyword)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _causal(module, query, attention_mask, is_causal) -> bool:
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and attention_mask is None and is_causal)


def make_attention(kernel="auto", *, int8=False, granularity="per_block", smooth_k=True):
    """The attention function transformers calls (see the module docstring)."""

    def fa_lab_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         is_causal=None, **kwargs):
        if _attentions_requested(kwargs):
            raise ValueError("output_attentions=True: fa_lab never forms the attention "
                             "weights; use attn_implementation='eager' to get them")
        for name in REFUSED:
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"{name}: not supported by the fa_lab attention "
                                          "function registered with transformers (its "
                                          "answer would be wrong without it); use "
                                          "attn_implementation='eager' for this model")
        unknown = sorted(set(kwargs) - IGNORED - set(REFUSED) - set(PASSED))
        if unknown:
            raise TypeError(f"{unknown[0]}: a keyword the fa_lab attention function does not "
                            f"understand (all unknown: {unknown}); it refuses rather than "
                            "drop it, since that could change the answer silently")
        mods = {}
        if kwargs.get("sliding_window") is not None:
            w = int(kwargs["sliding_window"])
            mods["window"] = (w - 1, w - 1)
        if kwargs.get("softcap"):
            mods["softcap"] = float(kwargs["softcap"])
        if kwargs.get("s_aux") is not None:
            mods["sinks"] = kwargs["s_aux"]
        causal = _causal(module, query, attention_mask, is_causal)
        if causal and key.shape[2] > query.shape[2]:  # static-cache prefill (SDPA does this)
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        if int8:
            if set(mods) - {"sinks"}:
                raise NotImplementedError(f"{sorted(set(mods) - {'sinks'})[0]}: not "
                                          "supported with int8=True")
            sinks = mods.get("sinks")
            out = attention_int8(to_numpy(query), to_numpy(key), to_numpy(value),
                                 causal=causal, scale=scaling,
                                 mask=None if attention_mask is None else to_numpy(
                                     attention_mask) if attention_mask.is_floating_point()
                                 else attention_mask.numpy(),
                                 granularity=granularity, smooth_k=smooth_k,
                                 sinks=None if sinks is None else to_numpy(sinks))
            out = torch.from_numpy(out).to(query.dtype)
        else:
            p = float(dropout) if module is None or module.training else 0.0
            seed = int(torch.randint(0, 2 ** 31 - 1, ())) if p > 0 else None
            out = torch_attention(query, key, value, causal=causal, scale=scaling,
                                  mask=attention_mask, kernel=kernel, dropout_p=p, seed=seed,
                                  **mods)
        return out.transpose(1, 2).contiguous(), None

    return fa_lab_attention


def register(name: str = "fa_lab", kernel: str = "auto", *, int8: bool = False,
             granularity: str = "per_block", smooth_k: bool = True) -> str:
    """Register fa_lab's attention and its mask function under ``name``; returns it.

    ``kernel``: a name in :data:`fa_lab.KERNELS` or ``"auto"``. With ``int8=True``,
    :func:`fa_lab.attention_int8` (``granularity``, ``smooth_k``) runs instead.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(f"name must not contain 'flash', got {name!r}: transformers treats "
                         "such names as flash-attn packages or hub kernels and tries to load them")
    AttentionInterface.register(name, make_attention(kernel, int8=int8,
                                                     granularity=granularity,
                                                     smooth_k=smooth_k))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


__all__ = ["register", "make_attention", "REFUSED", "IGNORED", "PASSED"]
