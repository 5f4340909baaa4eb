"""Compression techniques, one module each, behind `bench.techniques.base.Technique`."""
