"""Comparison: streaming kernels, element-wise and distribution metrics, and the one catalogue of metrics."""
