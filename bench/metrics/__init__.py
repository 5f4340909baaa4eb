"""Quality metrics, one module each, behind `bench.metrics.base.Metric`."""
