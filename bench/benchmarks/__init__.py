"""Speed and quality benchmark scripts (`python -m bench.benchmarks.<name>`): they print ratios measured in
one run and share `bench.cost.time_calls` / `percentiles`, so their p50/p90 mean what the CSV's do."""
