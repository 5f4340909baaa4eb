"""`cache`: DeepCache-style reuse of the UNet's deep features across steps (`bench.feature_cache`), no training.

Speed comes from skipping the deep blocks on `interval - 1` of every `interval` UNet calls, so image
latency is the speed column; the step latency is the median over the real full/shallow cycle.
"""

from __future__ import annotations

from torch import nn

from stable_diffusion.errors import InputError

from ..feature_cache import CachedUNet
from ..registry import TECHNIQUES, Axis, positive_int
from .base import Calibration, Compressed, Setting, Technique


@TECHNIQUES.register
class FeatureCache(Technique):
    name = "cache"
    summary = "DeepCache: full UNet every `interval` steps, only the shallow path with cached deep features between"
    order = 60
    axes = (
        Axis("interval", [2, 3, 5], positive_int, "a full UNet call every N calls, the shallow path in between"),
        Axis("depth", [1], positive_int, "input blocks on the shallow path (1 = first conv + last up block)"),
    )
    plot_x = "interval"
    needs_calibration = False
    devices = ("cpu", "cuda")

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        if not hasattr(unet, "input_blocks"):
            raise InputError("cache needs the PyTorch v1 UNet (input/middle/output blocks)")
        interval, depth = int(setting.params["interval"]), int(setting.params["depth"])
        module = CachedUNet(unet, interval=interval, depth=depth)
        return Compressed(module, {"kernels": "dense fp32"})
