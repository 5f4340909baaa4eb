"""Speed and quality benchmark scripts (`python -m bench.benchmarks.<name>`): they print ratios measured in
one run and share `bench.cost.time_calls` / `percentiles`, so their p50/p90 mean what the CSV's do. Those
that need a device (gpu_check) are run by hand or by scripts/gpu_check.sh, never by the tests."""
