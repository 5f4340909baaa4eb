"""`distilled`: the progressively distilled students of `python -m stable_diffusion.distill` (`distilled[steps=4]`).

A student with N steps replaces the UNet and the row samples with N DDIM steps. The students learned the
guided teacher's update (guidance baked in at `distill_guidance`), so they run with guidance 1: one UNet
pass per step instead of two. The row's `steps`, `sampler` and `guidance` columns show that.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from safetensors import safe_open
from torch import nn

from stable_diffusion.checkpoint import read_state_dict, v1_weights
from stable_diffusion.defaults import TRAINED_NAME, WEIGHTS_DIR
from stable_diffusion.distill import student_path
from stable_diffusion.errors import InputError
from stable_diffusion.model import COMPONENT_PREFIXES

from .base import Calibration, Compressed, Setting, Technique
from .steps import parse_steps, step_counts

# The registry contract of issue 10 as plain tuples until bench/registry.py lands (see steps.py). The axis is
# `steps` (the setting id is distilled[steps=4]); its CLI flag is --distilled-steps, as --steps is taken.
AXES_SPEC = (("steps", [4], parse_steps, "step count of the distilled student to load", None),)
COLUMNS_SPEC = (("distill_guidance", "guidance scale the student learned", "distilled at w", None),)


def student_file(steps: int, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """The shipped student of the embedded model for `steps` DDIM steps."""
    return student_path(weights_dir, TRAINED_NAME, steps)


def _require(path: Path, steps: int) -> None:
    if not path.is_file():
        raise InputError(
            f"no {steps}-step distilled student at {path}; make it with: python -m stable_diffusion.distill "
            f"--end-steps {steps}  (or --start-steps {2 * steps} --end-steps {steps} from an existing teacher)"
        )


class Distilled(Technique):
    name = "distilled"
    summary = "progressive distillation (Salimans & Ho) of the guided DDIM sampler: N-step students"
    order = 70
    axes: ClassVar = {a[0]: (a[1], a[2]) for a in AXES_SPEC}
    plot_x = "steps"
    needs_calibration = False
    devices = ("cpu", "cuda")
    weights_dir: Path = WEIGHTS_DIR

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        if unknown := set(axes) - set(self.axes):
            raise InputError(f"unknown distilled axes {sorted(unknown)}; choose from: {', '.join(self.axes)}")
        counts = step_counts("steps", axes, self.axes["steps"][0])
        for n in counts:  # fail at plan time, before the baseline is sampled
            _require(student_file(n, self.weights_dir), n)
        return [Setting(self.name, {"steps": n}) for n in counts]

    def unsupported(self, setting: Setting, device: str) -> str | None:
        path = student_file(int(setting.params["steps"]), self.weights_dir)
        return None if path.is_file() else f"no student file {path.name}"

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        n = int(setting.params["steps"])
        path = student_file(n, self.weights_dir)
        _require(path, n)
        prefix = COMPONENT_PREFIXES["unet"]
        weights = v1_weights(read_state_dict(path), path)
        p = next(unet.parameters())
        sd = {k[len(prefix) :]: v.to(p.device, p.dtype) for k, v in weights.items() if k.startswith(prefix)}
        try:
            unet.load_state_dict(sd, strict=True)
        except RuntimeError:
            raise InputError(f"{path.name} is a student of another model than this sweep's UNet") from None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        guidance = float(meta.get("distill_guidance", "nan"))
        fields = {"kernels": "dense fp32", "distill_guidance": guidance, "student": path.name}
        return Compressed(unet, fields, sampling={"steps": n, "sampler": "ddim", "guidance": 1.0})
