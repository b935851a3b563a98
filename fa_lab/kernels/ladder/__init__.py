"""The float ladder, one module per rung: naive -> online -> tiled (fa1 beside it) ->
tiled_simd -> flash."""
