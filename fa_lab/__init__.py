"""fa_lab: learn and profile FlashAttention on the CPU, with every number measured here.

Public API (stable; later work builds on it):

* :func:`attention` -- scaled dot-product attention with a choice of kernel
* :func:`attention_backward`, :func:`attention_grad` -- gradients by recomputation
* :func:`attention_int8`, :func:`quantize`, :func:`dequantize` -- INT8 attention
* :class:`KVCache`, :func:`decode`, :func:`rope` -- incremental decoding
* :func:`attention_varlen` -- packed variable-length batches (flash-attn's varlen)
* :func:`attention_with_kvcache` -- a contiguous or paged KV cache with ragged lengths
* :func:`quantize_kv`, :func:`dequantize_kv` -- int8 and int4 KV caches (read in place)
* :func:`topk_attention` -- attention as top-K retrieval; :mod:`fa_lab.tools.presets`
* :func:`merge_states` -- the exact merge of partial attentions over disjoint keys
* :func:`cascade_attention` -- many sequences over one shared prefix (read once)
* :mod:`fa_lab.distributed` -- ring attention across processes (``torch.distributed``)
* :func:`flex_attention`, :func:`create_block_mask`, :func:`and_masks`, :func:`or_masks`
  -- attention programmed with Python ``score_mod``/``mask_mod`` functions (FlexAttention)
* :func:`plan` -- which kernel, tile sizes and key splits a call would use
* :data:`KERNELS` -- the kernel registry (the ladder ``reference`` .. ``flash``)
* :mod:`fa_lab.numerics.reference` -- the float64 NumPy source of truth
"""

from fa_lab.api import KernelFallbackWarning, attention, choose_kernel, plan
from fa_lab.features.backward import attention_backward, attention_grad
from fa_lab.features.cascade import cascade_attention
from fa_lab.features.decoding import KVCache, decode, rope
from fa_lab.features.flex import flex_attention
from fa_lab.features.int8 import attention_int8
from fa_lab.features.kvcache import attention_with_kvcache
from fa_lab.features.varlen import attention_varlen
from fa_lab.numerics.flex import and_masks, create_block_mask, or_masks
from fa_lab.numerics.kvquant import dequantize_kv, quantize_kv
from fa_lab.numerics.merge import merge_states
from fa_lab.numerics.quant import dequantize, quantize
from fa_lab.registry import BACKWARD_KERNELS, INT8_KERNELS, KERNELS, Kernel, ladder
from fa_lab.features.retrieval import topk_attention

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)


def __getattr__(name):
    """``fa_lab.presets`` loads on first use: it measures with the benchmark tools, which
    import pandas, and ``import fa_lab`` stays light (the kernels and the API only)."""
    if name == "presets":
        import importlib

        return importlib.import_module("fa_lab.tools.presets")
    raise AttributeError(f"module 'fa_lab' has no attribute {name!r}")

__all__ = ["attention", "merge_states", "cascade_attention", "flex_attention",
           "create_block_mask", "and_masks", "or_masks", "attention_varlen", "attention_with_kvcache", "quantize_kv", "dequantize_kv", "plan", "KVCache", "decode", "rope", "topk_attention", "presets", "attention_int8", "quantize", "dequantize", "INT8_KERNELS", "attention_backward", "attention_grad", "choose_kernel", "KERNELS",
           "BACKWARD_KERNELS", "Kernel", "KernelFallbackWarning", "ladder", "__version__"]
