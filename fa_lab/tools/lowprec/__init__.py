"""Low precision measured: accuracy (`study`), peaks, speed and breakdown (`speed`), and
the micro-kernels against BLAS on the same tiles (`tiles`)."""
