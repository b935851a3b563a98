"""What the benchmarks time: registry kernels through :func:`fa_lab.attention`, and the
baselines that are not kernels: ``numpy_standard`` (float32 NumPy materializing the
scores, the textbook implementation) and ``torch_sdpa``
(``torch.nn.functional.scaled_dot_product_attention``) when torch is installed.
"""

from __future__ import annotations

import numpy as np

from fa_lab.numerics import masks, reference
from fa_lab.api import attention
from fa_lab.tools.bench.harness import Contender
from fa_lab.registry import KERNELS


def torch_module():
    try:
        import torch
    except ImportError:
        return None
    return torch


def contenders(names, *, causal=False, block_q=None, block_kv=None,
               with_baselines=True) -> list[Contender]:
    """Registry kernels by name (plus the NumPy and torch baselines)."""
    out = []
    for name in names:
        if name not in KERNELS:
            raise ValueError(f"kernels: unknown kernel {name!r}; known: {sorted(KERNELS)}")
        kw = {"block_q": block_q, "block_kv": block_kv} if KERNELS[name].tiled else {}
        out.append(Contender(name, lambda q, k, v, _n=name, _kw=kw: attention(
            q, k, v, causal=causal, kernel=_n, **_kw), "kernel"))
    if with_baselines:
        out.append(Contender("numpy_standard", lambda q, k, v: reference.attention(
            q, k, v, causal=causal, dtype=np.float32)[0], "baseline"))
        torch = torch_module()
        if torch is not None:
            F = torch.nn.functional

            alignment = masks.causal_alignment(causal)

            def sdpa(q, k, v):
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
                gqa = tq.shape[-3] != tk.shape[-3]
                Nq, Nk = q.shape[-2], k.shape[-2]
                mask, is_causal = None, alignment is not None
                if alignment == "bottom_right" and Nq != Nk:
                    # torch's is_causal is top-left; bottom-right needs a mask (none
                    # at all for one query row, which sees every key).
                    is_causal = False
                    if Nq > 1:
                        mask = torch.from_numpy(masks.causal_mask(Nq, Nk, alignment))
                with torch.no_grad():
                    o = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask,
                                                       is_causal=is_causal, enable_gqa=gqa)
                return o.numpy()

            out.append(Contender("torch_sdpa", sdpa, "baseline"))
    return out

