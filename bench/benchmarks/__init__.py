"""Benchmark scripts that need a device (run by hand or by scripts/gpu_check.sh, never by the tests)."""
