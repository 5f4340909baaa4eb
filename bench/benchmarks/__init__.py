"""Benchmark scripts (`python -m bench.benchmarks.<name>`): figures printed from one run, never timed tests."""
