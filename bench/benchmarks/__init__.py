"""Benchmark scripts (`python -m bench.benchmarks.<name>`): speed and quality figures printed from one run."""
