"""The GPU rung: FlashAttention-2's forward in numba.cuda (`cuda_fa2`)."""
