"""sdbench harness: compression techniques, metrics, sweep runner, reports and benchmarks."""
