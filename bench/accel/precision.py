"""A UNet cast to bf16/fp16 behind a wrapper that keeps the pipeline's dtypes.

Only the UNet is cast: inputs are cast to its dtype and its output back to the caller's, so the text
encoder, the VAE and the sampler run exactly as configured (fp32 by default).
"""

from __future__ import annotations

import torch
from torch import nn

from stable_diffusion.pipeline import DTYPES


class CastUNet(nn.Module):
    """Runs `unet` in `dtype`; the timestep stays as given (its embedding is computed in fp32, then cast)."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.unet = unet.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t, context.to(self.dtype)).to(x.dtype)


def cast_unet(unet: nn.Module, dtype: str) -> nn.Module:
    """The UNet in `dtype` (`fp32`, `bf16`, `fp16`); unchanged when it already is (an fp16 pipeline's fp32 casts)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return unet if next(unet.parameters()).dtype == DTYPES[dtype] else CastUNet(unet, DTYPES[dtype])
