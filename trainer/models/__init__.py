"""Models: loading and building, the repeated blocks, compilation, faster kernels, fused and sparse losses."""
