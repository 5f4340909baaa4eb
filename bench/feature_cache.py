"""DeepCache-style feature caching (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free") for
our v1 UNet (`stable_diffusion.unet.UNetModel`), training-free.

Adjacent denoising steps change the UNet's deep, low-resolution features little. Every `interval`-th call
runs the whole UNet and keeps the feature that enters the up path at `depth`: the output of the deep
part (middle block and the up blocks below) that is concatenated with the skip of input block `depth - 1`.
The calls in between run only the shallow path -- input blocks `0 .. depth-1`, then the last `depth` up
blocks fed with the cached feature -- and skip everything deeper. `depth=1` is DeepCache's shallowest
branch (the first conv and the last up block). With `interval=1` every call is a full call, computed with
the same operations in the same order as `UNetModel.forward`, so the output is bit-identical.

The cache is per image: the runner calls `reset_sampling_state()` before each one. With classifier-free
guidance the conditional and unconditional halves travel in one batch, so they share the call count.
"""

from __future__ import annotations

import torch
from torch import nn

from stable_diffusion.errors import InputError
from stable_diffusion.unet import UNetModel, timestep_embedding


class CachedUNet(nn.Module):
    """A UNet that recomputes its deep features every `interval` calls and reuses them in between."""

    def __init__(self, unet: UNetModel, interval: int, depth: int) -> None:
        super().__init__()
        n = len(unet.input_blocks)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise InputError(f"cache interval must be a positive integer, got {interval!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= n:
            raise InputError(f"cache depth must be an integer from 1 to {n} (input blocks of this UNet), got {depth!r}")
        self.unet, self.interval, self.depth = unet, interval, depth
        self.full_calls = self.shallow_calls = 0
        self.reset_sampling_state()

    def reset_sampling_state(self) -> None:
        """Forget the cached feature: the next call is a full one (call before every image)."""
        self._calls = 0
        self._cached: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        u, d = self.unet, self.depth
        full = self._calls % self.interval == 0 or self._cached is None or self._cached.shape[0] != x.shape[0]
        self._calls += 1
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = u.time_embed(timestep_embedding(t, u.cfg.model_channels).to(x.dtype))
        skips = []
        for block in u.input_blocks if full else u.input_blocks[:d]:
            x = block(x, emb, context)
            skips.append(x)
        first_shallow = len(u.output_blocks) - d
        if full:
            self.full_calls += 1
            x = u.middle_block(x, emb, context)
            for block in u.output_blocks[:first_shallow]:
                x = block(torch.cat([x, skips.pop()], dim=1), emb, context)
            self._cached = x
        else:
            self.shallow_calls += 1
            x = self._cached
        for block in u.output_blocks[first_shallow:]:
            x = block(torch.cat([x, skips.pop()], dim=1), emb, context)
        return u.out(x)
