"""Layer 2, kernels: jitted code only, grouped by family.

* ``ladder/``: the float ladder, one module per rung: naive -> online -> tiled (fa1,
  FA-1's loop order, beside it) -> tiled_simd -> flash;
* ``layouts/``: packed varlen batches and a paged KV cache, on flash's tiles;
* ``backward/``: naive and tiled (FlashAttention-2's two passes);
* ``lowprec/``: 512-bit intrinsics, micro-kernels, the vector softmax, quantization, the
  INT8 kernels and the SageAttention-style kernel;
* ``gpu/``: FlashAttention-2's forward in numba.cuda;
* ``probes/``: loops that measure the machine and the kernels' parts (peaks, streams,
  tiles): the one door from the tools to jitted code besides the API.

Shared helpers are in ``common``. Kernels never import the registry
(docs/ARCHITECTURE.md); :class:`fa_lab.kernels.runner.Runner` adapts them.

Every forward driver has the same canonical signature, so one adapter calls any of them::

    driver(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse)

    q     (B, H, Nq, d)      C-contiguous, float32 or float64
    k, v  (B, H_kv, Nk, d)   same dtype; query head h reads kv head h // (H // H_kv)
    bias  (B, H, Nq, Nk)     additive float mask (broadcast view), read only if has_bias
    scale                    scalar of q's dtype
    causal, offset           query i sees keys j <= i + offset when causal
    block_q, block_kv        Br, Bc (ignored by the untiled rungs)
    out   (B, H, Nq, d)      written
    lse   (B, H, Nq)         written; -inf for rows that see no key

``tiled_simd`` adds ``(dropout_p, seed_mixed)`` after ``lse``; ``flash`` adds
``(stage, kv_len)``, and its Flash-Decoding driver takes ``splits`` before ``out``. Both
(and the tiled backward) end with flash-attn's score modifiers ``(left, right, softcap,
slopes, has_alibi)`` (:mod:`fa_lab.numerics.scoremod`). ``varlen`` (packed variable-length
batches) and ``paged`` (a paged KV cache read through its block table) run ``flash``'s
tiles over their own task lists.

Neighbouring rungs repeat their loop skeletons (the ``(b, h, i)`` drivers of ``naive``
and ``online``; ``_q_block`` of ``tiled`` and ``tiled_simd``) on purpose, so a learner
can diff them. Sharing one skeleton would mean passing the block steps as jitted
function arguments, and numba then embeds Python object pointers in the compiled code
and refuses to cache it ("uses dynamic globals"): every process would recompile.
"""
