"""Dense precision rungs: the UNet in fp32, bf16 or fp16, eager or compiled (real kernels, no quantization).

These are the baselines a compression technique must beat: `speedup_vs_best_dense` divides by the
fastest of them. fp32 eager is the sweep's `baseline` row, so it is not repeated here. Only the UNet is
cast (`bench.accel.precision.CastUNet`): the text encoder, VAE and sampler run as configured. On a CPU
without AVX512-FP16 the fp16 rows run slow conversion paths; they are reported as measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from bench.accel.compile import AXIS as COMPILE_CHOICES
from bench.accel.compile import compile_for_row
from bench.accel.precision import DTYPES, cast_unet
from bench.cost import dense_size_bytes

from ..calibration import Calibration
from ..registry import TECHNIQUES, Axis, Column, text
from .base import Compressed, Setting, Technique, grid

RUNGS = [d for d in ("fp32", "bf16", "fp16") if d in DTYPES]  # sweep order: fp32, then the 16-bit rungs
# shared with the torchao / PT2E modes of `quant`
COMPILE = Column("compile", "eager, or compile / max-autotune (torch.compile, inductor)", plot=False)
COMPILE_S = Column("compile_s", "torch.compile time: the first (warm) call, compile plus one run",
                   label="compile time (s)", better="lower")  # fmt: skip


def example_inputs(calibration: Calibration | None) -> tuple | None:
    """One real UNet call (the sweep's shapes) for a warm compile call, when calibration recorded any."""
    if calibration is None or not calibration.calls:
        return None
    call = calibration.calls[0]
    return call.x, call.t, call.context


def with_compile(params: dict[str, Any], compile: str) -> dict[str, Any]:
    """The `compile` modifier adds nothing to a setting id at its default (eager)."""
    return params if compile == "eager" else {**params, "compile": compile}


@TECHNIQUES.register
class Precision(Technique):
    """UNet dtype x torch.compile; see the module docstring."""

    name = "precision"
    summary = "dense UNet in fp32/bf16/fp16, eager or torch.compile'd: the baselines compression must beat"
    order = 10
    plot_x = "unet_dtype"
    devices = ("cpu", "cuda")
    needs_calibration = True  # only for one real call to warm-compile with (the sweep's exact shapes)
    axes = (
        Axis("unet_dtype", RUNGS, text, "UNet dtype (the text encoder and VAE stay in --dtype)", RUNGS),
        Axis("compile", ["eager", "compile"], text, "torch.compile (inductor) of the UNet", list(COMPILE_CHOICES)),
    )
    # `unet_dtype` is this setting's UNet dtype; the row's `dtype` stays the pipeline's (--dtype)
    columns = (Column("unet_dtype", "UNet dtype of a precision row (the rest of the pipeline: `dtype`)", plot=False),
               COMPILE, COMPILE_S)  # fmt: skip

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        out = []
        for point in grid(self.axis_values(axes)):
            if point == {"unet_dtype": "fp32", "compile": "eager"}:
                continue  # that is the sweep's baseline row (of an fp32 pipeline)
            out.append(Setting(self.name, with_compile({"unet_dtype": point["unet_dtype"]}, point["compile"])))
        return out

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        dtype = self.axis("unet_dtype").check(setting.params.get("unet_dtype"))
        compile = self.axis("compile").check(setting.params.get("compile", "eager"))
        fields: dict[str, Any] = {
            "kernels": f"dense {dtype}",
            "cast": "UNet only; text encoder and VAE in the pipeline dtype",
        }
        cast = cast_unet(unet, dtype)
        fields["size_bytes"] = dense_size_bytes(cast.state_dict())
        module = compile_for_row(cast, compile, example_inputs(calibration), fields)
        return Compressed(module, fields)
