"""Fused Triton kernels (issue E)."""
