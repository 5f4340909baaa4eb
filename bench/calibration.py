"""Calibration data: real UNet inputs recorded while the FP32 model samples calibration prompts.

Shared by the runner (which records), the techniques and the ONNX backend (which consume): it imports
nothing from `bench`, so nothing has to import upward to reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UNetCall:
    """One recorded UNet call from a real sampling trajectory (for calibration)."""

    x: torch.Tensor  # [B, 4, h, w] latent input (already scaled by the sampler)
    t: torch.Tensor  # scalar timestep
    context: torch.Tensor  # [B, 77, d] text conditioning


@dataclass
class Calibration:
    """Real UNet inputs recorded while sampling calibration prompts with the FP32 model.

    `calls` are grouped by prompt set size on demand: `take(n_prompts)` keeps the calls of the first
    n prompts only, so "number of calibration prompts" can be a sweep axis without resampling.
    """

    calls: list[UNetCall]
    prompts_per_call: list[int]  # index of the calibration prompt each call belongs to

    def take(self, n_prompts: int) -> list[UNetCall]:
        return [c for c, p in zip(self.calls, self.prompts_per_call, strict=True) if p < n_prompts]


class Recorder(torch.nn.Module):
    """Wraps the FP32 UNet and records every call's inputs: real trajectories for calibration."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.calls: list[UNetCall] = []
        self.prompt_of_call: list[int] = []
        self.prompt = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append(UNetCall(x.detach().cpu().clone(), torch.as_tensor(t).cpu().clone(), context.cpu().clone()))
        self.prompt_of_call.append(self.prompt)
        return self.unet(x, t, context)
