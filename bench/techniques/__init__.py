"""Compression techniques, one module each, behind `bench.techniques.base.Technique`."""

from __future__ import annotations

from importlib import import_module

from stable_diffusion.errors import InputError

from .base import Technique

# name -> "module:Class"; imported on use so a sweep only loads what it runs.
REGISTRY = {
    "prune": "bench.techniques.prune:Pruning",
    "quant": "bench.techniques.quant:Quantization",
    "onnx": "bench.techniques.onnx:OnnxRuntime",
    "structured": "bench.techniques.structured:Structured",
}


def technique_class(name: str) -> type[Technique]:
    if name not in REGISTRY:
        raise InputError(f"unknown technique {name!r}; choose from: {', '.join(REGISTRY)} (or all)")
    module, cls = REGISTRY[name].split(":")
    return getattr(import_module(module), cls)
