"""CUDA sources of the fused kernels, the code that builds them at first use (build.py) and
what each op accepts (support.py)."""
