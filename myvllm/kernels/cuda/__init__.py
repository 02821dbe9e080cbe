"""CUDA sources of the fused kernels and the code that builds them at first use."""
