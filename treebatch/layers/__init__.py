"""Torch ops the model families share: attention (paged, shared-prefix, windows), linear
(kernel per row count and dtype), and the C kernels in `kernels/` with their loader (`native`)."""
