"""Backward kernels: `naive` (one row at a time) and `tiled` (FlashAttention-2's two passes)."""
