"""Triton kernels, each beside its PyTorch reference (tests run them under TRITON_INTERPRET=1 on CPU)."""
