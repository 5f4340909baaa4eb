"""`steps`: the uncompressed FP32 UNet sampled with fewer steps -- the baseline every compression row must beat.

Nothing about the UNet changes; the row asks the runner to sample with `sample_steps` steps
(`Compressed.sampling`), so its `steps` column shows the steps really taken while its quality is still
measured against the baseline images at the sweep's `--steps` (its `reference_steps`). Image latency is
the speed column: the step latency is that of the unchanged UNet.
"""

from __future__ import annotations

from torch import nn

from ..registry import TECHNIQUES, Axis, positive_int
from .base import Calibration, Compressed, Setting, Technique


@TECHNIQUES.register
class Steps(Technique):
    name = "steps"
    summary = "the FP32 UNet with fewer sampling steps (quality still vs the reference step count)"
    order = 5
    axes = (Axis("sample_steps", [10, 5, 2], positive_int, "sampling steps of the FP32 model (quality vs --steps)"),)
    plot_x = "sample_steps"
    needs_calibration = False
    devices = ("cpu", "cuda")

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        n = int(setting.params["sample_steps"])
        return Compressed(unet, {"kernels": "dense fp32"}, sampling={"steps": n})
