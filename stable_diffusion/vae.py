"""The KL autoencoder of Stable Diffusion v1 (the `first_stage_model`): image <-> 8x smaller latent.

Mirrors CompVis `ldm/modules/diffusionmodules/model.py` names (`encoder.down.0.block.1.conv1`,
`decoder.up.3.upsample.conv`, `mid.attn_1.q`, ...), so v1 checkpoint keys load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .unet import Upsample  # the same nearest-x2 + 3x3 conv, with the same `conv` key


def normalize(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = normalize(ch, groups)
        self.conv1 = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2 = normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if ch != out_ch:
            self.nin_shortcut = nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (v1 layout)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = normalize(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as CompVis


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: `block` (ResnetBlocks) then an optional `downsample` or `upsample`."""

    def __init__(self, chans: list[tuple[int, int]], groups: int, resample: type[nn.Module] | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in chans)
        if resample is Downsample:
            self.downsample = Downsample(chans[-1][1])
        elif resample is Upsample:
            self.upsample = Upsample(chans[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, out in enumerate(chans):
            pairs = [(ch if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(pairs, cfg.groups, Downsample if i < len(chans) - 1 else None))
            ch = out
        self.mid = Mid(ch, cfg.groups)
        self.norm_out = normalize(ch, cfg.groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, cfg.groups)
        levels = []
        for i in reversed(range(len(chans))):
            pairs = [(ch if j == 0 else chans[i], chans[i]) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(pairs, cfg.groups, Upsample if i > 0 else None))
            ch = chans[i]
        self.up = nn.ModuleList(levels)  # up[i] is resolution level i, run from the deepest level up
        self.norm_out = normalize(ch, cfg.groups)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> (mean, std) of the diagonal Gaussian posterior."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
