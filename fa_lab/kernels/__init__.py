"""The kernel ladder, one module per rung: naive -> online -> tiled -> tiled_simd.

Every driver has the same canonical signature, so the registry can call any of them::

    driver(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse)

    q     (B, H, Nq, d)      C-contiguous, float32 or float64
    k, v  (B, H_kv, Nk, d)   same dtype; query head h reads kv head h // (H // H_kv)
    bias  (B, H, Nq, Nk)     additive float mask (broadcast view), read only if has_bias
    scale                    scalar of q's dtype
    causal, offset           query i sees keys j <= i + offset when causal
    block_q, block_kv        Br, Bc (ignored by the untiled rungs)
    out   (B, H, Nq, d)      written
    lse   (B, H, Nq)         written; -inf for rows that see no key

Neighbouring rungs repeat their loop skeletons (the ``(b, h, i)`` drivers of ``naive``
and ``online``; ``_q_block`` of ``tiled`` and ``tiled_simd``) on purpose, so a learner
can diff them. Sharing one skeleton would mean passing the block steps as jitted
function arguments, and numba then embeds Python object pointers in the compiled code
and refuses to cache it ("uses dynamic globals"): every process would recompile.
"""
