"""Benchmarks and measurement studies, run as ``python -m benchmarks.NAME``."""
