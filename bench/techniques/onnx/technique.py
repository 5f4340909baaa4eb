"""ONNX Runtime as a sweep backend: export the UNet (optionally pruned first), quantize it with ORT, sample.

Each setting exports its copy of the FP32 UNet (`export`, cached by content hash, so the
settings of one sweep share one export per prune ratio), makes the `onnx_mode` version of it
(`backend.quantize`) and hands the runner an `OrtUNet`; the text encoder and VAE stay in
PyTorch, so rows differ from the baseline by the UNet only and share its prompts, seeds and metrics.

Axes: `onnx_mode` (fp32, dynamic-int8, dynamic-int8-conv, static-int8, int4), `onnx_prune` (global L1
pruning ratio of all UNet Linear/Conv2d weights before export, `bench.techniques.prune.prune`),
`calib_prompts` (static-int8 only) and `onnx_provider` (cpu, or cuda with onnxruntime-gpu).
Defaults: every mode unpruned (int4 only if this ORT can make it) plus dynamic-int8 at onnx_prune 0.5.

Row fields: backend=onnxruntime, kernels (ort-fp32, ort-int8-dynamic, ort-int8-dynamic-conv, ort-int8-qdq,
ort-int4), mode, bits, sparsity, size_bytes (.onnx + external data on disk), provider, opset,
export_cached, export_peak_rss_mb / export_seconds (empty when the export was reused), quant_peak_rss_mb /
quant_seconds, quantized_nodes (integer op counts), gflops_per_step (of the PyTorch UNet: the runner's
FlopCounterMode cannot see inside ORT; empty when no calibration call tells the latent size). The runner
finds no torch weights in an `OrtUNet`, so `nonzeros` stays empty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_diffusion.errors import InputError

from ... import cost
from ...calibration import Calibration, UNetCall
from ...registry import TECHNIQUES, Axis, Column, positive_int, text
from ...schema import CORE
from ..base import Compressed, Setting, Technique
from ..layers import linear_and_conv, zero_fraction
from ..prune import parse_ratio, prune
from .backend import (
    MODES,
    OrtUNet,
    cpu_has_vnni,
    int4_unavailable,
    new_workdir,
    provider_unavailable,
    quantize,
    quantized_nodes,
)
from .export import cache_root, export_unet, model_size_bytes

log = logging.getLogger(__name__)

PROVIDERS = ["cpu", "cuda"]
KERNELS = {
    "fp32": "ort-fp32",
    "dynamic-int8": "ort-int8-dynamic",
    "dynamic-int8-conv": "ort-int8-dynamic-conv",
    "static-int8": "ort-int8-qdq",
    "int4": "ort-int4",
}
BITS = {  # mode -> (weight bits, activation bits); None = fp32
    "fp32": (None, None),
    "dynamic-int8": (8, 8),
    "dynamic-int8-conv": (8, 8),
    "static-int8": (8, 8),
    "int4": (4, None),
}
PRUNED_DEFAULT = ("dynamic-int8", 0.5)  # the sparsity x INT8 row of the default sweep


@TECHNIQUES.register
class OnnxRuntime(Technique):
    """UNet exported to ONNX and run by ONNX Runtime in FP32, INT8 (dynamic, static QDQ) or INT4."""

    name = "onnx"
    summary = "UNet exported to ONNX, run by ONNX Runtime in FP32, INT8 (dynamic, static QDQ) or INT4"
    order = 40
    needs_calibration = True  # only static-int8 settings ask for prompts (`calib_prompts`)
    axes = (
        Axis("onnx_mode", MODES, text, "ONNX Runtime mode (int4 only where this ORT can make it)", MODES),
        Axis("onnx_prune", [0.0], parse_ratio, "global L1 pruning ratio applied before export"),
        Axis("calib_prompts", [4], positive_int, "calibration prompts (static-int8)"),
        Axis("onnx_provider", ["cpu"], text, "ONNX Runtime execution provider (cuda needs onnxruntime-gpu)",
             PROVIDERS),
    )  # fmt: skip
    columns = (
        Column("mode", "quantization mode", plot=False),
        Column("bits_weights", "weight bit width (empty = fp32)", plot=False),
        Column("bits_activations", "activation bit width (empty = fp32)", plot=False),
        Column("sparsity", "measured fraction of zeros among the targeted weights",
               label="sparsity of targeted weights (fraction)"),
        Column("sparsity_unet", "measured fraction of zeros among all UNet Linear/Conv weights",
               label="sparsity of all UNet weights (fraction)"),
        Column("calib_prompts", "calibration prompts used", plot=False),
        CORE["gflops_per_step"],  # of the PyTorch UNet: FlopCounterMode cannot see inside ORT
    )  # fmt: skip

    def unsupported(self, setting: Setting, device: torch.device | str) -> str | None:
        return provider_unavailable(setting.params.get("onnx_provider", "cpu")) or super().unsupported(setting, device)

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_root(cache_dir)

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        given = self.axis_values(axes)
        modes = given["onnx_mode"] if "onnx_mode" in axes else []
        reason = int4_unavailable()
        if "int4" in modes and reason:
            raise InputError(f"onnx_mode int4 is unavailable: {reason}")
        if not modes:  # the default: every mode this ORT can make
            if reason:
                log.info("onnx: leaving int4 out of the default modes: %s", reason)
            modes = [m for m in MODES if m != "int4" or reason is None]
        ratios, calib, providers = given["onnx_prune"], given["calib_prompts"], given["onnx_provider"]
        combos = [(m, r) for r in ratios for m in modes]
        if "onnx_mode" not in axes and "onnx_prune" not in axes:
            combos.append(PRUNED_DEFAULT)
        out: list[Setting] = []
        for (mode, ratio), provider in ((c, p) for c in combos for p in providers):
            base = {"onnx_mode": mode, "onnx_prune": ratio, "onnx_provider": provider}
            extra = [{"calib_prompts": n} for n in calib] if mode == "static-int8" else [{}]
            out += [Setting(self.name, {**base, **e}) for e in extra]
        return list({s.id: s for s in out}.values())

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        p = self._params(setting)
        mode, ratio, provider = p["onnx_mode"], p["onnx_prune"], p["onnx_provider"]
        if reason := provider_unavailable(provider):
            raise InputError(reason)
        if next(unet.parameters()).dtype != torch.float32:
            raise InputError("the onnx technique exports and quantizes FP32 models: run the sweep with --dtype fp32")
        device = next(unet.parameters()).device
        calls = calibration.take(p["calib_prompts"]) if calibration and mode == "static-int8" else []
        fields: dict[str, Any] = {"gflops_per_step": _gflops(unet, calibration.calls if calibration else [])}
        if ratio > 0:
            fields["sparsity"] = fields["sparsity_unet"] = _prune(unet.cpu(), ratio)

        # always external data: the tiny UNet takes the same path as v1-5 (> 2 GB), which must use it
        exported = export_unet(unet.cpu(), cache_dir=self.cache_dir, external_data=True)
        del unet  # the ORT session is all the row needs from here on: free the PyTorch copy before quantizing
        workdir = new_workdir(self.cache_dir)
        start = time.perf_counter()
        with cost.PeakRSS() as mem:
            path = quantize(exported.path, mode, Path(workdir.name), calls)
        quant_seconds = time.perf_counter() - start
        module = OrtUNet(path, provider, device=device, keep=workdir)
        bits_w, bits_a = BITS[mode]
        fields.update({
            "backend": "onnxruntime",
            "kernels": KERNELS[mode],
            "mode": mode,
            "bits_weights": bits_w,
            # 7-bit weight range on CPUs without VNNI (int8 storage): see onnx_backend.cpu_has_vnni
            "reduce_range": (not cpu_has_vnni()) if bits_w == 8 else None,
            "bits_activations": bits_a,
            "size_bytes": model_size_bytes(path),
            "export_peak_rss_mb": exported.peak_rss_bytes / 2**20 if exported.peak_rss_bytes else None,
            "export_seconds": exported.seconds,
            "export_cached": exported.cached,
            "quant_peak_rss_mb": mem.peak / 2**20 if mode != "fp32" else None,
            "quant_seconds": quant_seconds if mode != "fp32" else None,
            "quantized_nodes": quantized_nodes(path),
            "provider": provider,
            "opset": exported.opset,
            "onnx_key": exported.key[:24],
            "calib_prompts": p.get("calib_prompts"),
            "calib_calls": len(calls) if mode == "static-int8" else None,
        })  # fmt: skip
        return Compressed(module, fields)

    @staticmethod
    def _params(setting: Setting) -> dict[str, Any]:
        params = {"onnx_prune": 0.0, "onnx_provider": "cpu", **setting.params}
        params = {k: OnnxRuntime.axis(k).check(v) for k, v in params.items()}
        if "onnx_mode" not in params:
            raise InputError(f"onnx setting {setting.id} names no onnx_mode")
        if params["onnx_mode"] == "static-int8":
            params.setdefault("calib_prompts", 4)
        elif "calib_prompts" in params:
            raise InputError("calib_prompts applies to onnx_mode static-int8 only")
        return params


def _prune(unet: nn.Module, ratio: float) -> float:
    """Global L1 pruning of every Linear/Conv2d weight (the prune technique's defaults), in place; returns
    the measured fraction of zeros among those weights."""
    prune(unet, ratio, method="l1", scope="global", target="all")
    return zero_fraction([m.weight for _, m in linear_and_conv(unet)])


def _gflops(unet: nn.Module, calls: list[UNetCall]) -> float | None:
    """GFLOPs of one dense PyTorch UNet call with batch 2 (the runner's cost probe) at the sweep's latent size,
    which only the calibration calls tell us: the runner's FlopCounterMode sees no torch op inside an ORT
    session. None (not measured) when the sweep recorded no call, i.e. has no static-int8 setting."""
    if not calls:
        return None
    x, t, context = (v.to(next(unet.parameters()).device) for v in (calls[0].x, calls[0].t, calls[0].context))
    return cost.flops_per_call(lambda: unet(x, t, context)) * 2 / x.shape[0] / 1e9
