"""Triton kernels. They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
