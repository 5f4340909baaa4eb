"""The `quant` modes that run real integer kernels under torch.compile: torchao and PT2E static int8.

* `torchao-int8-dynamic` / `torchao-int8-weight` / `torchao-int4-weight` / `torchao-float8`: torchao
  tensor subclasses on the Linear weights (torchao quantizes no Conv2d; see `bench.accel.torchao_modes`).
* `pt2e-static-int8`: W8A8 on Conv2d and Linear, calibrated on the runner's real trajectories, lowered by
  inductor to oneDNN int8 kernels (`bench.accel.pt2e`); compiled only: eager it is fp32 q/dq maths.

`kernels` is read from what inductor generated: for PT2E the count of oneDNN int8 conv/linear calls in the
compiled graph; a PT2E graph in which none fused would say `simulated`. Unavailable modes (float8 without
a CUDA GPU of compute capability >= 8.9, int4 without torchao's mslk kernels, PT2E x86 on CUDA) are
refused when the sweep is planned.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from bench.accel import torchao_modes
from bench.accel.compile import compile_for_row
from bench.accel.pt2e import int8_op_counts, quantize_pt2e_x86
from bench.cost import PeakRSS
from stable_diffusion.errors import InputError

from ..calibration import Calibration
from .base import Compressed
from .precision import example_inputs

log = logging.getLogger(__name__)

TORCHAO_MODES = {f"torchao-{m}": m for m in torchao_modes.KERNELS}
PT2E = "pt2e-static-int8"
REAL_MODES = [*TORCHAO_MODES, PT2E]


def unavailable(mode: str, device: str) -> str | None:
    """Why `mode` cannot run on `device` (None when it can)."""
    if mode == PT2E:
        return None if device == "cpu" else "pt2e-static-int8 lowers to oneDNN CPU kernels; use --device cpu"
    return torchao_modes.unavailable(TORCHAO_MODES[mode], device)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the module's tensors, counting each torchao subclass by its inner (packed) tensors."""

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    if isinstance(module, torch.fx.GraphModule):  # PT2E: the int8 weights are graph constants; count what runs
        seen: dict[int, torch.Tensor] = {}
        for node in module.graph.nodes:
            if node.op == "get_attr":
                value = module
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    seen[id(value)] = value
    else:
        seen = {id(t): t for t in module.state_dict().values() if isinstance(t, torch.Tensor)}
    return sum(size(t) for t in seen.values())


def pt2e_kernels(ops: dict[str, int]) -> str:
    conv = sum(n for op, n in ops.items() if op.startswith("onednn.qconv"))
    linear = sum(n for op, n in ops.items() if op.startswith("onednn.qlinear"))
    if not conv and not linear:
        return "simulated"  # no int8 kernel fused: the graph runs q/dq maths in fp32
    return f"int8 oneDNN ({conv} qconv, {linear} qlinear; PT2E x86 static, compiled)"


def apply_real(unet: nn.Module, p: dict[str, Any], calibration: Calibration | None) -> Compressed:
    """One real-kernel mode applied to `unet` (a private copy), compiled as `p["compile"]` says; the caller
    (`Quantization.apply`) has checked that the mode runs on the UNet's device."""
    mode, compile = p["mode"], p.get("compile", "eager")
    # no per-layer weight error is computed for these modes; torchao modes take no calibration
    fields: dict[str, Any] = {"mode": mode, "weight_error_max_rel": None, "calib_prompts": None}
    example = example_inputs(calibration)
    if mode == PT2E:
        if compile == "eager":
            raise InputError("pt2e-static-int8 runs int8 kernels only when compiled; use --compile compile")
        calls = calibration.take(p["calib_prompts"]) if calibration else []
        if not calls:
            raise InputError(f"calibration has no UNet calls for the first {p['calib_prompts']} prompt(s)")
        with PeakRSS() as mem:
            module = quantize_pt2e_x86(unet, calls)
        fields.update(
            bits_weights=8, bits_activations=8, layers="conv+linear", calib_prompts=p["calib_prompts"],
            calib_calls=len(calls), quant_peak_rss_mb=mem.peak / 2**20, qdq_nodes=int8_op_counts(module),
            observer="minmax", size_bytes=tensor_bytes(module),
        )  # fmt: skip
        example = (calls[0].x, calls[0].t, calls[0].context)
    else:
        short = TORCHAO_MODES[mode]
        with PeakRSS() as mem:
            names = torchao_modes.quantize_linears(unet, short, p.get("group_size", 128))
        fields.update(
            quant_peak_rss_mb=mem.peak / 2**20,
            bits_weights=torchao_modes.WEIGHT_BITS[short], bits_activations=torchao_modes.ACT_BITS[short],
            layers="linear", quantized_layers=len(names), kernels=torchao_modes.KERNELS[short],
            size_bytes=tensor_bytes(unet),
        )  # fmt: skip
        module = unet
    module = compile_for_row(module, compile, example, fields)
    if mode == PT2E:
        fields["kernels"] = pt2e_kernels(getattr(module, "kernel_ops", {}))
    return Compressed(module, fields)
