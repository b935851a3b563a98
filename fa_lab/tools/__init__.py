"""Layer 6, tools: benchmarks (`bench`), low-precision studies (`lowprec`), memory,
traffic and hierarchy models, the autotuner, presets, the GPU rung's study, real models,
and the batch report. They call the API and the features, never a kernel module."""
