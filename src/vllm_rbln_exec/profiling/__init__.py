"""Profiling: where traces go, the torch profiler inside a worker, and reading saved traces."""
