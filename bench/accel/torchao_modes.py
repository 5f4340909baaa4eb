"""torchao weight/activation quantization of the UNet's Linear layers (real kernels once compiled).

torchao 0.18 quantizes `nn.Linear` only: its int8 tensor subclass expects 2-D weights (a Conv2d's 4-D
weight fails in `choose_qparams_affine`), so the convs (~70 % of v1's weights) stay fp32 here; the PT2E
mode (`bench.accel.pt2e`) is the one that quantizes convs. The weights become torchao tensor subclasses
(`Int8Tensor`, `Float8Tensor`); under `torch.compile` the dequant/scale maths fuses around the int8 GEMM.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

# mode -> what the row's `kernels` column says once this mode has run
KERNELS = {
    "int8-dynamic": "int8 GEMM (torchao int8 dynamic act x int8 weight, Linear only)",
    "int8-weight": "int8-weight-only (torchao, Linear only)",
    "int4-weight": "int4-weight-only (torchao, Linear only)",
    "float8": "float8 GEMM (torchao float8 dynamic act x float8 weight, Linear only)",
}
WEIGHT_BITS = {"int8-dynamic": 8, "int8-weight": 8, "int4-weight": 4, "float8": 8}
ACT_BITS = {"int8-dynamic": 8, "int8-weight": None, "int4-weight": None, "float8": 8}


def unavailable(mode: str, device: str) -> str | None:
    """Why `mode` cannot run on `device` with this torchao build (None when it can)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed here (pip install torchao)"
    if mode == "float8":
        if device != "cuda" or not torch.cuda.is_available():
            return "torchao float8 needs a CUDA GPU with compute capability >= 8.9"
        if torch.cuda.get_device_capability() < (8, 9):
            return f"torchao float8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}"
    if mode == "int4-weight":
        try:
            import mslk  # noqa: F401  (torchao's int4 kernels live there)
        except ImportError:
            return "torchao 0.18's int4 weight-only kernels need the mslk package (CUDA); it has no CPU int4 packing"
    return None


def _config(mode: str, group_size: int) -> object:
    from torchao import quantization as q

    if mode == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if mode == "int8-weight":
        return q.Int8WeightOnlyConfig()
    if mode == "int4-weight":
        return q.Int4WeightOnlyConfig(group_size=group_size)
    if mode == "float8":
        return q.Float8DynamicActivationFloat8WeightConfig()
    raise ValueError(f"unknown torchao mode {mode!r}")


def quantize_linears(unet: nn.Module, mode: str, group_size: int = 128) -> list[str]:
    """Quantize every nn.Linear of `unet` in place; returns the names of the layers whose weight changed type."""
    from torchao.quantization import quantize_

    with torch.no_grad():
        quantize_(unet, _config(mode, group_size), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    return quantized_weights(unet)


def quantized_weights(module: nn.Module) -> list[str]:
    """Names of Linear layers whose weight is a torchao tensor subclass (not a plain tensor)."""
    return [
        name
        for name, mod in module.named_modules()
        if isinstance(mod, nn.Linear) and type(mod.weight) not in (torch.Tensor, nn.Parameter)
    ]
