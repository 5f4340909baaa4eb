"""`distilled`: the progressively distilled students of `python -m stable_diffusion.distill` (`distilled[steps=4]`).

A student with N steps replaces the UNet and the row samples with N DDIM steps. The students learned the
guided teacher's update (guidance baked in at `distill_guidance`), so they run with guidance 1: one UNet
pass per step instead of two. The row's `steps`, `sampler` and `guidance` columns show that.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from stable_diffusion.checkpoint import read_state_dict, v1_weights
from stable_diffusion.defaults import TRAINED_NAME, WEIGHTS_DIR
from stable_diffusion.distill import student_path, unet_fingerprint
from stable_diffusion.errors import InputError
from stable_diffusion.model import COMPONENT_PREFIXES

from ..registry import TECHNIQUES, Axis, Column, positive_int
from .base import Calibration, Compressed, Setting, Technique


def student_file(steps: int, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """The shipped student of the embedded model for `steps` DDIM steps."""
    return student_path(weights_dir, TRAINED_NAME, steps)


def _require(path: Path, steps: int) -> None:
    if not path.is_file():
        raise InputError(
            f"no {steps}-step distilled student at {path}; make it with: python -m stable_diffusion.distill "
            f"--end-steps {steps}  (or --start-steps {2 * steps} --end-steps {steps} from an existing teacher)"
        )


@TECHNIQUES.register
class Distilled(Technique):
    name = "distilled"
    summary = "progressive distillation (Salimans & Ho) of the guided DDIM sampler: N-step students"
    order = 70
    # the setting id is distilled[steps=4]; its CLI flag is --distilled-steps, as --steps is taken
    axes = (Axis("steps", [4], positive_int, "step count of the distilled student to load"),)
    columns = (Column("distill_guidance", "guidance scale the student learned", label="distilled at w"),)
    plot_x = "steps"
    needs_calibration = False
    devices = ("cpu", "cuda")
    weights_dir: Path = WEIGHTS_DIR

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        out = super().settings(axes)
        for s in out:  # fail at plan time, before the baseline is sampled
            _require(student_file(int(s.params["steps"]), self.weights_dir), int(s.params["steps"]))
        return out

    def unsupported(self, setting: Setting, device: str) -> str | None:
        path = student_file(int(setting.params["steps"]), self.weights_dir)
        return super().unsupported(setting, device) or (None if path.is_file() else f"no student file {path.name}")

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        n = int(setting.params["steps"])
        path = student_file(n, self.weights_dir)
        _require(path, n)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        base = meta.get("distill_base_unet")
        if base is not None and base != unet_fingerprint(unet):  # same shapes, other weights: a wrong pairing
            raise InputError(
                f"{path.name} was distilled from {meta.get('distill_teacher', 'another model')}, not this sweep's "
                f"UNet; distil a student of this model with: python -m stable_diffusion.distill --checkpoint FILE"
            )
        prefix = COMPONENT_PREFIXES["unet"]
        weights = v1_weights(read_state_dict(path), path)
        p = next(unet.parameters())
        sd = {k[len(prefix) :]: v.to(p.device, p.dtype) for k, v in weights.items() if k.startswith(prefix)}
        try:
            unet.load_state_dict(sd, strict=True)
        except RuntimeError:
            raise InputError(f"{path.name} is a student of another model than this sweep's UNet") from None
        guidance = float(meta.get("distill_guidance", "nan"))
        fields = {"kernels": "dense fp32", "distill_guidance": guidance, "student": path.name}
        return Compressed(unet, fields, sampling={"steps": n, "sampler": "ddim", "guidance": 1.0})
