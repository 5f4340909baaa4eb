"""`steps`: the uncompressed FP32 UNet sampled with fewer steps -- the baseline every compression row must beat.

Nothing about the UNet changes; the row asks the runner to sample with `sample_steps` steps
(`Compressed.sampling`), so its `steps` column shows the steps really taken while its quality is still
measured against the baseline images at the sweep's `--steps` (its `reference_steps`). Image latency is
the speed column: the step latency is that of the unchanged UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from stable_diffusion.errors import InputError

from .base import Calibration, Compressed, Setting, Technique, parse_axis


def parse_steps(text: str) -> int:
    """A step count: a positive integer."""
    n = int(text)
    if n < 1:
        raise ValueError(n)
    return n


def step_counts(axis: str, given: Mapping[str, list[Any]], defaults: list[int]) -> list[int]:
    """The step counts asked for on `axis` (defaults when absent), validated, duplicates dropped."""
    values = parse_axis(axis, given[axis], parse_steps) if axis in given else defaults
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise InputError(f"--{axis.replace('_', '-')} takes positive integers, got {bad[0]!r}")
    return list(dict.fromkeys(values))


# The registry contract of issue 10 (bench/registry.py: Axis, Column), as plain tuples until it lands:
# (name, defaults, parser, help, choices) and (column, meaning, label, better).
AXES_SPEC = (("sample_steps", [10, 5, 2], parse_steps, "sampling steps of the FP32 model (quality vs --steps)", None),)
COLUMNS_SPEC = (("steps", "sampling steps really taken", "steps", None),)


class Steps(Technique):
    name = "steps"
    summary = "the FP32 UNet with fewer sampling steps (quality still vs the reference step count)"
    order = 5
    axes: ClassVar = {a[0]: (a[1], a[2]) for a in AXES_SPEC}
    plot_x = "sample_steps"
    needs_calibration = False
    devices = ("cpu", "cuda")

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        if unknown := set(axes) - set(self.axes):
            raise InputError(f"unknown steps axes {sorted(unknown)}; choose from: {', '.join(self.axes)}")
        defaults = self.axes["sample_steps"][0]
        return [Setting(self.name, {"sample_steps": n}) for n in step_counts("sample_steps", axes, defaults)]

    def unsupported(self, setting: Setting, device: str) -> str | None:
        return None

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        n = int(setting.params["sample_steps"])
        return Compressed(unet, {"kernels": "dense fp32"}, sampling={"steps": n})
