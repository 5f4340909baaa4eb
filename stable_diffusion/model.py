"""The whole v1 latent diffusion model, laid out exactly as a CompVis checkpoint's `state_dict`."""

from __future__ import annotations

import torch
from torch import nn

from .clip import FrozenCLIPEmbedder
from .config import SDConfig
from .unet import UNetModel
from .vae import AutoencoderKL

# Top-level key prefixes of the three components in a v1 checkpoint.
COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.",
}


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    """Holds `model.diffusion_model` (UNet), `first_stage_model` (VAE), `cond_stage_model` (CLIP text)."""

    def __init__(self, cfg: SDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(cfg.clip)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    def swap_unet(self, module: nn.Module) -> nn.Module:
        """Put in a compressed (or ONNX-backed) UNet with the same call signature; returns the old one.

        (A property setter would not work: nn.Module.__setattr__ registers sub-modules before descriptors.)
        """
        old, self.model.diffusion_model = self.model.diffusion_model, module
        return old

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> FrozenCLIPEmbedder:
        return self.cond_stage_model


def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic, non-trivial random weights (incl. norms and biases) for the embedded tiny default.

    PyTorch's default init leaves norms at 1/0 and is fine for shape checks; here every tensor is
    drawn from one seeded generator so a fresh machine rebuilds the very same file.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
                elif is_norm and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model
