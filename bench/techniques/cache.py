"""`cache`: DeepCache-style reuse of the UNet's deep features across steps (`bench.feature_cache`), no training.

Speed comes from skipping the deep blocks on `interval - 1` of every `interval` UNet calls, so image
latency is the speed column; the step latency is the median over the real full/shallow cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from stable_diffusion.errors import InputError

from ..feature_cache import CachedUNet
from .base import Calibration, Compressed, Setting, Technique, grid
from .steps import parse_steps, step_counts

# The registry contract of issue 10 as plain tuples until bench/registry.py lands (see steps.py).
AXES_SPEC = (
    ("interval", [2, 3, 5], parse_steps, "a full UNet call every N calls, the shallow path in between", None),
    ("depth", [1], parse_steps, "input blocks on the shallow path (1 = first conv + last up block)", None),
)
COLUMNS_SPEC = ()  # interval and depth are the row's parameters; no measured field of its own


class FeatureCache(Technique):
    name = "cache"
    summary = "DeepCache: full UNet every `interval` steps, only the shallow path with cached deep features between"
    order = 60
    axes: ClassVar = {a[0]: (a[1], a[2]) for a in AXES_SPEC}
    plot_x = "interval"
    needs_calibration = False
    devices = ("cpu", "cuda")

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        if unknown := set(axes) - set(self.axes):
            raise InputError(f"unknown cache axes {sorted(unknown)}; choose from: {', '.join(self.axes)}")
        values = {a: step_counts(a, axes, self.axes[a][0]) for a in ("depth", "interval")}
        return [Setting(self.name, p) for p in grid(values)]

    def unsupported(self, setting: Setting, device: str) -> str | None:
        return None

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        if not hasattr(unet, "input_blocks"):
            raise InputError("cache needs the PyTorch v1 UNet (input/middle/output blocks)")
        interval, depth = int(setting.params["interval"]), int(setting.params["depth"])
        module = CachedUNet(unet, interval=interval, depth=depth)
        return Compressed(module, {"kernels": "dense fp32"})
