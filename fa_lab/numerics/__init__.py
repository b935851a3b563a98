"""Layer 1, numerics: the float64 truth (`reference`), tolerances and checkers
(`testing`), verdicts (`verdict`), argument checks (`checks`), score modifiers (`scoremod`),
dropout, tile classes (`tiling`) and NumPy quantization (`quant`). No numba kernels."""
