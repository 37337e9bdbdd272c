"""Benchmark harness for dataset distillation in text-based sequential recommendation."""

__version__ = "0.1.0"
