"""Benchmarks of the krause project: run each as `python -m benchmarks.NAME` from the repository root."""
